"""A user error in a Ray Train worker ends the run: the retries Ray Train makes for a lost
worker do not run the job again (a diverging lr ran the correction job three times)."""

import sys
from pathlib import Path

import pytest

from cluster.dataio import DataError
from cluster.user_errors import fit_torch_trainer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    import ray
    from ray import cloudpickle
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _fails_on_rank_0(config: dict) -> None:
    """A train func that records each call, and whose rank 0 meets bad input."""
    import ray.train
    rank = ray.train.get_context().get_world_rank()
    with open(Path(config["calls"]), "a") as calls:
        calls.write(f"{rank}\n")
    if rank == 0:
        raise DataError("train.jsonl, line 3, column 'prompt': null or empty")


def _fit(tmp_path: Path, max_failures: int):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    calls = tmp_path / f"calls-{max_failures}"
    with pytest.raises(DataError, match="line 3, column 'prompt': null or empty"):
        fit_torch_trainer(
            _fails_on_rank_0, {"calls": str(calls)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name=f"fails-{max_failures}", storage_path=str(tmp_path),
                                 failure_config=FailureConfig(max_failures=max_failures)))
    return sorted(calls.read_text().split())


def test_a_user_error_in_a_worker_runs_once_and_reaches_the_driver_as_itself(
        local_ray, tmp_path):
    """Ray Train retries (cluster.max_failures=2, the default) but each rank ran the job once:
    the retry ended at once; the driver raises the worker's own error, subclass and message.
    (With no retry, Ray Train's own failure carries it: tests/test_bad_input_cli.py.)"""
    assert _fit(tmp_path, 2) == ["0", "1"]
