"""Where a run's outputs and the stage cache live by default (``conf/config.yaml``).

Under ``ray job submit --working-dir .`` the driver runs in a temporary copy of the working
directory that Ray deletes with the job, so a default relative to the current folder would lose
every output and the cache. The home folder is, in order: ``LANCET_HOME``; ``cluster.storage_path``
when it is a local folder; ``~/.lancet`` when running as a Ray job; else the current folder (a
plain local run keeps ``outputs/`` and ``.lancet_cache/`` next to where it was started).
"""

from __future__ import annotations

import os
from pathlib import Path

JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint
JOB_DIRS = ("runtime_resources", "working_dir_files")  # Ray's unpacked --working-dir


def in_ray_job() -> bool:
    """True when this process is the entrypoint of a submitted Ray job."""
    cwd = Path.cwd().parts
    return JOB_ENV in os.environ or all(part in cwd for part in JOB_DIRS)


def lancet_home(storage_path: str = "") -> str:
    """The folder under which ``outputs/``, ``multirun/`` and ``.lancet_cache/`` go."""
    if os.environ.get("LANCET_HOME"):
        return str(Path(os.environ["LANCET_HOME"]).expanduser().resolve())
    if storage_path and "://" not in storage_path:
        return str(Path(storage_path).expanduser().resolve())
    if in_ray_job():
        return str(Path("~/.lancet").expanduser())
    return os.getcwd()


def check_folder(key: str, path: Path) -> None:
    """``path`` is, or can become, a folder: no file stands at it or above it."""
    from operators.errors import UserError
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                where = "" if part == path else f" ({part} is a file)"
                raise UserError(f"{key}={path}: a file, not a folder{where}")
            return


def register_resolvers() -> None:
    """``${lancet_home:${cluster.storage_path}}`` in the YAML."""
    from omegaconf import OmegaConf
    if not OmegaConf.has_resolver("lancet_home"):
        OmegaConf.register_new_resolver("lancet_home", lancet_home)


def ray_storage(cfg) -> str:
    """Ray Train's storage: the configured shared storage (a folder or a URI), or the cache's."""
    return cfg.cluster.storage_path or str(Path(cfg.cache_dir) / "_ray_train")
