"""A sweep's jobs are checked before the first one runs.

Hydra's basic sweeper composes each job's config only when that job starts, so a bad value among
good ones (``-m influence.alpha=0.5,2.0``) was found by its own job, after the jobs before it had
run, and a bad first value stopped the sweep before the good ones ran, without a word about them.
The first job of a multirun now composes every job's config from the sweep's own record
(``<sweep dir>/multirun.yaml``: the command line and ``hydra.sweeper.params``), expands it as
the basic sweeper does and validates each, so one bad job refuses the sweep before any job runs.
"""

from __future__ import annotations

from pathlib import Path

from operators.errors import UserError

DEFAULT_OUTPUT = "${hydra:runtime.output_dir}"


def sweep_jobs(sweep_dir: Path) -> list[list[str]]:
    """Every job's overrides, in the order the basic sweeper launches them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    hydra = OmegaConf.load(sweep_dir / "multirun.yaml").hydra
    params = [f"{k}={v}" for k, v in (hydra.sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *hydra.overrides.task])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_jobs(jobs: list[list[str]]) -> None:
    """Compose and validate each job's config; refuse a literal ``output_dir`` that several
    jobs would share (each would overwrite the one before)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from pipeline import specs
    from pipeline.config import to_typed
    outputs = []
    for num, job in enumerate(jobs):
        try:
            cfg = compose(config_name="config", overrides=job)
            specs.validate(to_typed(cfg))
        except (UserError, HydraException, OmegaConfBaseException) as err:
            own = [o for o in job if not all(o in other for other in jobs)] or job
            raise UserError(f"sweep job {num} ({' '.join(own) or 'no overrides'}): {err}; no "
                            "job of the sweep was run") from err
        outputs.append(OmegaConf.to_container(cfg, resolve=False).get("output_dir"))
    shared = [o for o in outputs if o != DEFAULT_OUTPUT and "${" not in str(o)]
    if len(jobs) > 1 and len(shared) > len(set(shared)):
        raise UserError(f"output_dir={shared[0]}: every job of this sweep would write the same "
                        "folder; leave output_dir unset (each job gets <sweep dir>/<job number>) "
                        "or give the sweep's folder as output_dir on the command line")


def check_sweep() -> None:
    """In the first job of a multirun, check every job of the sweep (elsewhere: nothing)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    hydra = HydraConfig.get()
    if hydra.mode != RunMode.MULTIRUN or int(hydra.job.num) != 0:
        return
    record = Path(hydra.sweep.dir) / "multirun.yaml"
    if record.is_file():
        check_jobs(sweep_jobs(record.parent))
