"""Content fingerprints of the files a stage reads (data files, the model folder, DeepSpeed JSON).

A stage's cache key holds these, so a ``train.jsonl`` or model folder edited in place is never
silently reused. Hashing a 15 GB model on every run would be slow, so each file's sha256 is
remembered under ``cache_dir`` keyed by (path, size, mtime_ns): an unchanged file is not read
again, a changed size or modification time makes the content hash decide.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cluster.atomic import atomic
from cluster.dataio import resolve_files

CACHE_FILE = ".content_hashes.json"
CHUNK = 1 << 22


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


class HashCache:
    """(path, size, mtime_ns) → sha256, kept in one JSON file (last writer wins: harmless)."""

    def __init__(self, cache_dir: str | Path) -> None:
        self.file = Path(cache_dir) / CACHE_FILE
        try:
            self.known = json.loads(self.file.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        stat = path.stat()
        key, seen = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
        hit = self.known.get(key)
        if hit and hit[:2] == seen:
            return hit[2]
        self.known[key] = [*seen, file_sha256(path)]
        self.changed = True
        return self.known[key][2]

    def save(self) -> None:
        if not self.changed:
            return
        with atomic(self.file) as tmp:
            tmp.write_text(json.dumps(self.known))
        self.changed = False


def _files(key: str, spec: str) -> list[tuple[str, Path]]:
    """(name, path) of every file behind one config value: a folder's files (recursively, not
    hidden ones), or a data file / directory / glob as the readers resolve it."""
    path = Path(spec)
    if key.startswith("data."):
        return [(p.name, p) for p in resolve_files(spec, key)]
    if path.is_dir():
        return [(str(p.relative_to(path)), p) for p in sorted(path.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in
                                           p.relative_to(path).parts)]
    return [(path.name, path)] if path.is_file() else []


def content_fingerprints(paths: dict[str, str], cache_dir: str | Path) -> dict[str, str]:
    """``{config key: path}`` → ``{config key: sha256 of its files' names and contents}``;
    empty paths are left out (the config slice already says they are empty)."""
    cache = HashCache(cache_dir)
    out = {}
    for key, spec in sorted(paths.items()):
        if not spec:
            continue
        digest = hashlib.sha256()
        for name, path in _files(key, spec):
            digest.update(f"{name}\0{cache.sha256(path)}\n".encode())
        out[key] = digest.hexdigest()[:16]
    cache.save()
    return out
