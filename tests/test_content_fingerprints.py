"""A stage's cache key follows the contents of the files it reads and every setting that
changes its result (no stale reuse of a file edited in place)."""

import json
import os

from test_configs import compose_typed

from pipeline import content
from pipeline.dag import fingerprint
from pipeline.stages.table import STAGES

STAGE = {s.name: s for s in STAGES}
UPSTREAM = {name: "0" for name in STAGE}


def user_cfg(tmp_path, *extra):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"a": 1}')
    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    (tmp_path / "q.jsonl").write_text('{"prompt": "p", "response": "r"}\n')
    cfg = compose_typed([f"model.path={model}", f"data.train={tmp_path / 'train.jsonl'}",
                         f"data.queries={tmp_path / 'q.jsonl'}", *extra])
    cfg.cache_dir = str(tmp_path / "cache")  # where the remembered hashes live
    return cfg


def test_editing_a_data_file_or_the_model_in_place_changes_the_prepare_key(tmp_path):
    cfg = user_cfg(tmp_path)
    first = fingerprint(STAGE["prepare"], cfg, UPSTREAM)
    assert fingerprint(STAGE["prepare"], cfg, UPSTREAM) == first
    train = tmp_path / "train.jsonl"
    stat = train.stat()
    train.write_text('{"prompt": "p", "response": "x"}\n')  # same size, same name
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    second = fingerprint(STAGE["prepare"], cfg, UPSTREAM)
    assert second != first
    (tmp_path / "model" / "config.json").write_text('{"a": 2}')
    assert fingerprint(STAGE["prepare"], cfg, UPSTREAM) not in (first, second)


def test_unchanged_files_are_not_hashed_again(tmp_path, monkeypatch):
    cfg = user_cfg(tmp_path)
    fingerprint(STAGE["prepare"], cfg, UPSTREAM)
    calls = []
    monkeypatch.setattr(content, "file_sha256", lambda p: calls.append(p) or "x")
    fingerprint(STAGE["prepare"], cfg, UPSTREAM)
    assert calls == []  # size and mtime matched the remembered hash
    assert json.loads((tmp_path / "cache" / content.CACHE_FILE).read_text())


def test_ibo_key_holds_the_worker_count_and_the_deepspeed_json(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 0}}')

    def ibo_key(workers):
        cfg = compose_typed([f"ibo.deepspeed_config={ds}", f"cluster.num_workers={workers}"])
        cfg.cache_dir = str(tmp_path / "cache")
        return fingerprint(STAGE["ibo"], cfg, UPSTREAM)

    one = ibo_key(1)
    assert ibo_key(2) != one  # ibo.batch_size is per worker: the real batch differs
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    assert ibo_key(1) != one


def test_a_classifier_judge_edited_in_place_changes_the_evaluate_key(tmp_path):
    judge = tmp_path / "clf"
    judge.mkdir()
    (judge / "config.json").write_text('{"labels": 2}')
    cfg = compose_typed(["judge=classifier", f"judge.path={judge}"])
    cfg.cache_dir = str(tmp_path / "cache")
    first = fingerprint(STAGE["evaluate"], cfg, UPSTREAM)
    report = fingerprint(STAGE["report"], cfg, UPSTREAM)  # its table reads the judge too
    (judge / "config.json").write_text('{"labels": 3}')
    assert fingerprint(STAGE["evaluate"], cfg, UPSTREAM) != first
    assert fingerprint(STAGE["report"], cfg, UPSTREAM) != report
