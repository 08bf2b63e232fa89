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
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """The GPU tier runs where CUDA is; elsewhere each of its tests skips with the reason."""
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
