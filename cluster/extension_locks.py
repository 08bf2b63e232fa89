"""Stale build locks of torch's JIT extensions (DeepSpeed compiles its CPU ops on first use).

torch guards a build folder with a ``lock`` file and every later build waits, without a timeout,
until it disappears. A build killed half-way (a killed run, a lost node) leaves the file behind,
and every later IBO job then waits for it forever. A lock older than any real build of these
small ops is stale: it is removed, with a warning naming it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("lancet")
STALE_AFTER_S = 900.0  # DeepSpeed's CPU ops build in well under a minute on 2 cores


def extensions_root() -> Path:
    """Where torch builds JIT extensions (``TORCH_EXTENSIONS_DIR``, else its default)."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    if configured:
        return Path(configured)
    from torch.utils.cpp_extension import get_default_build_root
    return Path(get_default_build_root())


def clear_stale_locks(root: Path | None = None, stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the build locks under ``root`` older than ``stale_after_s``; the ones removed."""
    root = extensions_root() if root is None else root
    if not root.is_dir():
        return []
    removed = []
    now = time.time()
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = now - lock.stat().st_mtime
            if age > stale_after_s:
                lock.unlink()
                removed.append(lock)
                log.warning(f"removed a stale build lock left by a killed build ({age:.0f} s "
                            f"old): {lock}")
        except FileNotFoundError:
            continue  # its build just finished
    return removed
