import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from pipeline_cli import RAY_TRAIN_QUICK  # noqa: E402  (the path is set above)

for _key, _value in RAY_TRAIN_QUICK.items():  # in-process Ray too
    os.environ.setdefault(_key, _value)
# Under pytest-xdist (`make test` runs two workers) each worker's own math gets its share.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, 2 // WORKERS))
SHARED = "demo_run"  # the session's shared run: every test that uses it goes to one worker


def _group(item) -> str:
    return SHARED if SHARED in item.fixturenames else item.module.__name__


@pytest.hookimpl(tryfirst=True)  # before xdist's hook reads the groups
def pytest_collection_modifyitems(config, items):
    """The GPU tier skips, saying why, where there is no CUDA. For `--dist loadgroup`: a test
    module runs in one worker (its module fixtures are made once), the tests of the shared run
    in one worker, and the longest groups start first (the shared run, then Ray's modules)."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group(_group(item)))
    heavy = {_group(i) for i in items if "ray" in i.keywords}
    items.sort(key=lambda i: (_group(i) != SHARED, _group(i) not in heavy))  # stable
    if torch.cuda.is_available():
        return
    reason = pytest.mark.skip(reason="no CUDA device here (torch.cuda.is_available() is False): "
                                     "the gpu tier runs on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(reason)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One `python -m pipeline` run of the embedded demo at its defaults (`make demo`'s run),
    shared: (cache, output_dir, process). Its cache lets later runs reuse its stages; at the
    demo's size Ray's fixed costs, not the model, set its time (about 2 min)."""
    from pipeline_cli import DEMO, run_cli
    cache = tmp_path_factory.mktemp("shared_cache")
    out = tmp_path_factory.mktemp("demo_run")
    proc = run_cli(*DEMO, f"cache_dir={cache}", f"output_dir={out}")
    return cache, out, proc


def pytest_collection_finish(session):
    """Under `--dist loadgroup` the groups must reach xdist's scheduler (pytest 9 drops them;
    see pyproject.toml): fail at once rather than run every shared fixture once per worker."""
    if getattr(session.config.option, "loadgroup", False) and session.items \
            and "@" not in session.items[0].nodeid:
        raise pytest.UsageError(f"pytest {pytest.__version__} ignores pytest-xdist's groups "
                                "(--dist loadgroup): install pytest<9 (make install)")
