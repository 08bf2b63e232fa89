"""bench/RESULTS.md, written section by section by several benchmarks, possibly at once.

Each benchmark (``bench.suite``, ``bench.correction_suite``, ``bench.lds``, …) replaces its own
section of the one file: a read, an edit and a write. Two of them finishing together (they run
side by side on a 2-core machine) used to lose one section, the later write built on a copy
read before the earlier one landed. Every edit now holds an exclusive lock on a sibling lock
file for its read-modify-write, and the new text replaces the file in one rename, so a reader
never sees half of it.
"""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.atomic import atomic

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@contextmanager
def locked(path: Path = RESULTS) -> Iterator[None]:
    """Hold the exclusive edit lock of ``path`` (``.<name>.lock`` beside it) for the block."""
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def edit(change: Callable[[str], str], path: Path = RESULTS) -> None:
    """Replace ``path``'s text (empty if absent) by ``change(text)``, under the lock."""
    with locked(path):
        old = path.read_text() if path.exists() else ""
        with atomic(path) as tmp:
            tmp.write_text(change(old))


def with_section(old: str, text: str, begin: str, end: str) -> str:
    """``old`` with the section between ``begin`` and ``end`` replaced by ``text`` (appended
    when absent)."""
    section = f"{begin}\n{text}{end}\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        return head + section + rest.split(end, 1)[1].lstrip("\n")
    return old.rstrip("\n") + "\n\n" + section


def write_section(text: str, begin: str, end: str, path: Path = RESULTS) -> None:
    """Replace (or append) one section of ``path``, other writers' sections kept."""
    edit(lambda old: with_section(old, text, begin, end), path)
