"""The command line before Hydra sees it: the folders Hydra creates itself.

Hydra creates its run (or sweep) folder before LANCET's own checks run, so a folder it cannot
create ended in its traceback; and with an explicit ``output_dir`` its ``.hydra`` record still
went to ``outputs/<date>/<time>`` under the current folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.locations import check_folder

MULTIRUN_FLAGS = ("-m", "--multirun")
# Folders given on the command line that Hydra (or Ray Train's storage) creates.
FOLDER_KEYS = ("output_dir", "cluster.storage_path", "hydra.run.dir", "hydra.sweep.dir")


def _sweeps(arg: str) -> bool:
    """``arg`` sweeps its key (``a,b``, ``range(…)``); an override Hydra cannot parse is left
    for Hydra to refuse, naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    try:
        return OverridesParser.create().parse_override(arg).is_sweep_override()
    except Exception:  # noqa: BLE001 - Hydra's own refusal is the message the user gets
        return True


def hydra_folders(args: list[str]) -> list[str]:
    """The command line with an explicit ``output_dir=V`` also naming Hydra's folder: in a run
    ``hydra.run.dir=V`` (its ``.hydra`` record lands beside the run it describes); in a sweep
    ``output_dir=V`` becomes ``hydra.sweep.dir=V``, the sweep's folder, so job n writes
    ``V/n`` (one output_dir for every job: each job overwrote the one before). A folder the
    user gave Hydra is kept, and so is a swept output_dir (one folder per value)."""
    multirun = any(a in MULTIRUN_FLAGS for a in args)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a for a in args if a.startswith("output_dir=")]
    if len(given) != 1 or any(a.startswith(f"{key}=") for a in args):
        return args
    value = given[0].split("=", 1)[1]
    if not multirun:
        return [*args, f"{key}={value}"]
    if _sweeps(given[0]):
        return args
    return [f"{key}={value}" if a == given[0] else a for a in args]


def preflight(args: list[str]) -> None:
    """Each folder of ``FOLDER_KEYS`` given as a plain path can be a folder and be written:
    a file standing at or above it is bad input (UserError naming the key); a folder that
    cannot be created or written raises the OSError (a read-only or full disk)."""
    for arg in args:
        key, _, value = arg.partition("=")
        if key not in FOLDER_KEYS or not value or "${" in value or "://" in value:
            continue
        if _sweeps(arg):
            continue
        # as it is used: only the storage path's "~" is expanded (pipeline.locations)
        path = Path(value).expanduser() if key == "cluster.storage_path" else Path(value)
        check_folder(key, path)
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=path).cleanup()  # writable, not only present
