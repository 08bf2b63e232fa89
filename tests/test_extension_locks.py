"""A build lock left by a killed JIT build is removed; a live build's lock is kept."""

import os
import time

from cluster.extension_locks import clear_stale_locks, extensions_root


def test_only_locks_older_than_any_real_build_are_removed(tmp_path):
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    live = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir(parents=True)
        lock.write_text("")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    assert clear_stale_locks(tmp_path, stale_after_s=900) == [stale]
    assert not stale.exists() and live.exists()
    assert clear_stale_locks(tmp_path / "absent") == []


def test_the_root_is_torch_extensions_dir_when_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path


def test_deepspeed_never_builds_its_inference_shm_op():
    """The op serves only inference all-reduce; building it cost a minute on a fresh machine."""
    import importlib

    from cluster.deepspeed_strategy import skip_inference_shm_op
    ds_comm = importlib.import_module("deepspeed.comm.torch")  # the attribute is torch itself
    skip_inference_shm_op()
    assert ds_comm.build_shm_op() is None
