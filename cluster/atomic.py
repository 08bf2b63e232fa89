"""Publish a file or folder under its final name only when it is complete.

The one write-to-temporary-then-rename of the project: the temporary sibling carries a unique
suffix (two writers never share it), is renamed over ``path`` when the block ends normally and
removed when it raises, so a reader sees the old version, the new one, or nothing; never half.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """``with atomic(path) as tmp:`` write ``tmp`` (a file, or a folder you create); it then
    replaces ``path`` (a folder being replaced is removed first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
