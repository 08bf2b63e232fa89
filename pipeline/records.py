"""The stage record (``stage.json``): what a stage published and what its files looked like.

The record is written last, after every file of the stage, so its presence means the stage
finished. It holds each file's size and, for files up to ``HASH_LIMIT`` bytes (every file with
``pipeline.verify=full``), its sha256. A stage reused from the cache is checked against it first:
sizes always (free), hashes where recorded and the file is small or ``verify=full``. A record
written before files were recorded (no ``files`` key) is trusted as it is: unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

DONE = "stage.json"
HASH_LIMIT = 64 << 20  # 64 MiB: hashing this takes ~0.1 s, so small files are always hashed
VERIFY_MODES = ("off", "quick", "full")


class CacheError(RuntimeError):
    """A cached stage is damaged and cannot be recomputed."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(folder: Path, full: bool) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"?}}`` of every file under ``folder`` but the record."""
    files: dict[str, dict] = {}
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if rel == DONE or path.is_symlink():
                continue
            entry: dict = {"size": path.stat().st_size}
            if full or entry["size"] <= HASH_LIMIT:
                entry["sha256"] = sha256(path)
            files[rel] = entry
    return dict(sorted(files.items()))


def write(folder: Path, record: dict, verify: str) -> None:
    """Describe ``folder``'s files into ``record`` and write it as the stage's last file."""
    record = {**record, "files": describe(folder, verify == "full")}
    (folder / DONE).write_text(json.dumps(record, default=str))


def load(folder: Path) -> dict | None:
    """The stage record, or None when it is unreadable (cut short, hand-edited)."""
    try:
        record = json.loads((folder / DONE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "metrics" in record else None


def problem(folder: Path, record: dict | None, verify: str) -> str:
    """The first way ``folder`` differs from its record, naming the file; "" when intact."""
    if record is None:
        return f"{folder / DONE}: unreadable stage record"
    if verify == "off" or "files" not in record:
        return ""
    for rel, want in record["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path}: {size} bytes, the record says {want['size']}"
        hashed = "sha256" in want and (verify == "full" or size <= HASH_LIMIT)
        if hashed and sha256(path) != want["sha256"]:
            return f"{path}: content differs from the record (sha256)"
    return ""


def discard(folder: Path, why: str) -> None:
    """Move a damaged stage out of the cache so it is recomputed under the same name.

    Renamed aside first (one atomic step, so a concurrent job sees either the old folder or
    none), then deleted; a folder another job already moved is fine.
    """
    aside = folder.parent / f".{folder.name}.damaged-{os.getpid()}"
    try:
        folder.rename(aside)
    except FileNotFoundError:
        return
    except OSError as err:
        raise CacheError(f"{why}; it cannot be recomputed: cannot move {folder} aside "
                         f"({err.strerror or err})") from err
    shutil.rmtree(aside, ignore_errors=True)
