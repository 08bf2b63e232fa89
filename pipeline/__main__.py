"""``python -m pipeline [overrides…]``: the only Hydra entry point (see conf/config.yaml)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from operators.errors import UserError
from pipeline.cli_args import hydra_folders, preflight
from pipeline.config import conf_dir, register
from pipeline.faults import EXIT_CODE, write_fault

register()


STARTED = []  # set once Hydra has composed a config and handed it to LANCET
BAD_INPUT = 2


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    from pipeline.run import run_from_hydra
    STARTED.append(True)
    code = run_from_hydra(cfg)
    if code:
        sys.exit(code)


def cli() -> None:
    """``main``, with Hydra's own refusals of the command line (an unknown key, a value of the
    wrong type: it prints the key and exits 1) reported as bad input, exit 2, like LANCET's."""
    try:
        sys.argv[1:] = hydra_folders(sys.argv[1:])
        preflight(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(BAD_INPUT)
    except OSError as err:  # a folder Hydra would create first, on a read-only or full disk
        print(f"error: {write_fault(err) or err}", file=sys.stderr)
        sys.exit(EXIT_CODE)
    try:
        main()
    except SystemExit as stop:
        if stop.code == 1 and not STARTED:
            sys.exit(BAD_INPUT)
        raise


if __name__ == "__main__":
    cli()
