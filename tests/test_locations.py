"""Default output and cache locations: stable under ``ray job submit`` (pipeline/locations.py)."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from pipeline.config import register
from pipeline.locations import JOB_ENV, lancet_home

CONF = Path(__file__).resolve().parents[1] / "conf"
register()


def test_a_plain_local_run_keeps_the_current_folder(monkeypatch, tmp_path):
    for name in ("LANCET_HOME", JOB_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    assert lancet_home("") == str(tmp_path)


def test_a_ray_job_defaults_to_a_stable_home_not_its_working_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LANCET_HOME", raising=False)
    monkeypatch.setenv(JOB_ENV, "{}")
    monkeypatch.setenv("HOME", str(tmp_path))
    work = tmp_path / "ray" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert lancet_home("") == str(tmp_path / ".lancet")
    assert lancet_home("s3://bucket/x") == str(tmp_path / ".lancet")  # a URI is no folder
    assert lancet_home(str(tmp_path / "shared")) == str(tmp_path / "shared")
    monkeypatch.setenv("LANCET_HOME", str(tmp_path / "mine"))
    assert lancet_home(str(tmp_path / "shared")) == str(tmp_path / "mine")


def test_the_cache_and_run_dirs_follow_the_home(monkeypatch, tmp_path):
    monkeypatch.setenv("LANCET_HOME", str(tmp_path))
    monkeypatch.delenv("LANCET_CACHE_DIR", raising=False)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["output_dir=/tmp/o"], return_hydra_config=True)
        assert cfg.cache_dir == f"{tmp_path}/.lancet_cache"
        assert cfg.hydra.run.dir.startswith(f"{tmp_path}/outputs/")
        assert cfg.hydra.sweep.dir.startswith(f"{tmp_path}/multirun/")
