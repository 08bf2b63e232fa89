"""The command line's folders and a sweep's jobs, checked before Hydra or any job runs."""

import pytest
from hydra import initialize_config_dir
from pipeline_cli import run_cli
from test_configs import CONF

from operators.errors import UserError
from pipeline.cli_args import hydra_folders, preflight
from pipeline.sweep_check import check_jobs

BASE = ("cluster.local_cpus=2", "mlflow.enabled=false", "pipeline.until=prepare")


def test_an_explicit_output_dir_is_also_hydras_folder():
    """(Hydra wrote its .hydra record to outputs/<date>/<time> in the current folder.)"""
    assert hydra_folders(["a=1", "output_dir=/r/x"]) == ["a=1", "output_dir=/r/x",
                                                         "hydra.run.dir=/r/x"]
    assert hydra_folders(["output_dir=/r/x", "hydra.run.dir=/h"]) == ["output_dir=/r/x",
                                                                      "hydra.run.dir=/h"]
    # a sweep: its folder, one job per subfolder (one output_dir overwrote job after job)
    assert hydra_folders(["-m", "influence.alpha=0.5,0.8", "output_dir=/r/s"]) == [
        "-m", "influence.alpha=0.5,0.8", "hydra.sweep.dir=/r/s"]
    swept = ["-m", "output_dir=/r/a,/r/b"]
    assert hydra_folders(swept) == swept
    assert hydra_folders(["x=1"]) == ["x=1"]


@pytest.mark.parametrize("key", ["output_dir", "cluster.storage_path", "hydra.run.dir"])
def test_a_folder_key_where_a_file_stands_is_refused_naming_it(tmp_path, key):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=rf"^{key}={tmp_path}/f/sub: a file, not a folder "
                                        rf"\({tmp_path}/f is a file\)"):
        preflight([f"{key}={tmp_path / 'f' / 'sub'}"])
    preflight([f"{key}={tmp_path / 'new' / 'dir'}", "cluster.storage_path=s3://bucket/x"])
    assert (tmp_path / "new" / "dir").is_dir() and not list((tmp_path / "new" / "dir").iterdir())


def test_a_literal_output_dir_shared_by_the_jobs_of_a_sweep_is_refused(tmp_path):
    jobs = [[f"influence.alpha={a}", f"output_dir={tmp_path}", f"cache_dir={tmp_path}"]
            for a in (0.5, 0.8)]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(UserError, match=rf"^output_dir={tmp_path}: every job of this sweep"):
            check_jobs(jobs)
        check_jobs(jobs[:1])  # one job: its own folder


@pytest.mark.ray
def test_a_bad_value_among_good_ones_refuses_the_sweep_before_any_job(tmp_path):
    """(The jobs before the bad one ran; with the bad one first, the good ones never ran and
    nothing said so.)"""
    proc = run_cli("-m", *BASE, "influence.alpha=0.5,2.0", f"output_dir={tmp_path / 'sweep'}",
                   f"cache_dir={tmp_path / 'cache'}", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("error: sweep job 1 (influence.alpha=2.0): influence.alpha=2.0: must be in (0, 1]; "
            "no job of the sweep was run") in proc.stderr
    assert not (tmp_path / "cache").exists()
    assert (tmp_path / "sweep" / "multirun.yaml").is_file()  # the sweep's folder: output_dir


@pytest.mark.ray
def test_a_storage_path_where_a_file_stands_ends_with_one_line(tmp_path):
    """(Hydra's NotADirectoryError traceback while creating its run folder.)"""
    (tmp_path / "f").write_text("x")
    proc = run_cli(*BASE, f"cluster.storage_path={tmp_path / 'f'}", check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == f"error: cluster.storage_path={tmp_path / 'f'}: a file, not a folder"
