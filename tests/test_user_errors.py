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


def _out_of_memory_on_rank_0(config: dict) -> None:
    import ray.train
    import torch
    rank = ray.train.get_context().get_world_rank()
    with open(Path(config["calls"]), "a") as calls:
        calls.write(f"{rank}\n")
    if rank == 0:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; "
                                     "79.10 GiB total capacity)")


def test_out_of_memory_in_a_worker_is_not_retried_and_says_what_to_lower(local_ray, tmp_path):
    """A GPU out of memory fails every try the same way (each try reloads the model): it ends
    the run like bad input, with the allocator's words and the settings that lower the peak."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig

    from cluster.user_errors import DeviceMemoryError
    calls = tmp_path / "calls"
    with pytest.raises(DeviceMemoryError, match=r"^out of memory \(CUDA out of memory\. Tried to "
                                                r"allocate 2\.00 GiB .*\): lower the rows per "
                                                r"batch \(cluster\.batch_size .*pipeline\.plan"):
        fit_torch_trainer(
            _out_of_memory_on_rank_0, {"calls": str(calls)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
            run_config=RunConfig(name="oom", storage_path=str(tmp_path),
                                 failure_config=FailureConfig(max_failures=2)))
    assert sorted(calls.read_text().split()) == ["0", "1"]


@pytest.mark.parametrize("error", [
    "torch", "cpu", "wrapped", "text"])
def test_out_of_memory_is_recognised_however_it_arrives(error):
    """torch's CUDA error, the CPU allocator's RuntimeError, either inside another error, or
    only as the text Ray passes on from a Ray Data actor."""
    import torch

    from cluster.user_errors import as_memory_error
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not "
                       "enough memory: you tried to allocate 80000000000 bytes.")
    wrapped = RuntimeError("scoring failed")
    wrapped.__cause__ = cuda
    text = RuntimeError("ray.exceptions.RayTaskError(OutOfMemoryError): ray::MapWorker("
                        "Scorer).submit()\n  File x\ntorch.OutOfMemoryError: CUDA out of memory."
                        " Tried to allocate 20.00 MiB")
    err = {"torch": cuda, "cpu": cpu, "wrapped": wrapped, "text": text}[error]
    got = as_memory_error(err)
    assert got is not None and str(got).startswith("out of memory (")
    assert ("DefaultCPUAllocator" if error == "cpu" else "CUDA out of memory. Tried") in str(got)
    assert as_memory_error(ValueError("bad value")) is None


def test_the_driver_reports_out_of_memory_in_one_line(capsys):
    """What the CLI prints when a stage's workers ran out of memory: one line, exit 2."""
    from pipeline.run import _report
    err = RuntimeError("ray.exceptions.RayTaskError(OutOfMemoryError): ray::MapWorker(Scorer)\n"
                       "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB")
    assert _report(err) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: out of memory (CUDA out of memory. Tried to allocate 20.00 MiB): lower the rows")
