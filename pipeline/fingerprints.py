"""Cheap, stable fingerprints of a model directory and of a data file (for factor metadata)."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def _file_digest(path: Path, digest) -> None:
    """Size plus the first and last MiB: catches a changed file without reading 15 GB."""
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(CHUNK))
        if size > 2 * CHUNK:
            handle.seek(size - CHUNK)
            digest.update(handle.read(CHUNK))


def model_fingerprint(model_dir: str | Path) -> str:
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(root.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors", ".model", ".txt")):
            _file_digest(path, digest)
    return digest.hexdigest()[:16]


def data_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    _file_digest(Path(path), digest)
    return digest.hexdigest()[:16]
