"""A built wheel carries the configs and DeepSpeed JSON, and `python -m pipeline` finds them from
the installed location, run from another folder (no checkout on the path)."""

import shutil
import subprocess
import sys
import zipfile

from pipeline_cli import ROOT, env

SOURCES = ("pyproject.toml", "README.md", "conf", "operators", "cluster", "pipeline")


def build_wheel(tmp_path):
    src = tmp_path / "src"  # a copy: the build writes build/ and egg-info next to the sources
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300,
                   capture_output=True)
    return next((tmp_path / "dist").glob("lancet-*.whl"))


def test_the_wheel_carries_the_configs_and_runs_from_elsewhere(tmp_path):
    (tmp_path / "src").mkdir()
    wheel = build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = {p.relative_to(ROOT / "conf").as_posix() for p in (ROOT / "conf").rglob("*")
            if p.suffix in (".yaml", ".json")}
    assert {f"lancet_conf/{c}" for c in conf} <= names
    assert {"pipeline/stages/prepare.py", "pipeline/demo/corpus.py"} <= names
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    zipfile.ZipFile(wheel).extractall(site)  # what `pip install` puts in site-packages
    elsewhere.mkdir()
    run = dict(cwd=elsewhere, env=env(PYTHONPATH=str(site)), capture_output=True, text=True,
               timeout=300)
    job = subprocess.run([sys.executable, "-m", "pipeline", "--cfg", "job"], **run)
    assert job.returncode == 0, job.stderr[-2000:]
    assert "method: linfac" in job.stdout and "deepspeed_config: conf/deepspeed/zero0.json" in job.stdout
    found = subprocess.run([sys.executable, "-c", "import pipeline.config as c, pipeline.specs as s;"
                            "print(s.deepspeed_path(c.LancetConf()), c.conf_dir())"], **run)
    ds, conf_dir = found.stdout.split()
    assert ds.startswith(str(site)) and conf_dir.startswith(str(site))
    refused = subprocess.run([sys.executable, "-m", "pipeline", "influence.damping=-1.0",
                              f"output_dir={tmp_path / 'o'}", f"cache_dir={tmp_path / 'c'}"], **run)
    assert refused.returncode == 2 and "influence.damping=-1.0: must be >= 0" in refused.stderr
