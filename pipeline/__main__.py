"""``python -m pipeline [overrides…]``: the only Hydra entry point (see conf/config.yaml)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipeline.config import conf_dir, register

register()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.run import run_from_hydra
    code = run_from_hydra(cfg)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
