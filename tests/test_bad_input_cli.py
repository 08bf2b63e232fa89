"""Bad input through `python -m pipeline`: exit code 2, the key or file named, earlier work kept."""

import json
import shutil
from pathlib import Path

import pytest
from demo_assets import save_demo_model
from pipeline_cli import DEMO, computed, copy_cache, run_cli

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BASE = ("cluster.local_cpus=2", "model.max_length=64")


@pytest.fixture(scope="module")
def user_project(tmp_path_factory):
    """A user's own model directory and JSONL data (made from the demo, used as plain files)."""
    root = tmp_path_factory.mktemp("user")
    corpus, model_dir, _ = save_demo_model(root, epochs=20, width=32)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus.train))
    bad = [r for r in corpus.train if r["planted"]][:6]
    (root / "queries.jsonl").write_text("".join(
        json.dumps({"id": f"q{i}", "prompt": r["prompt"], "response": r["response"]}) + "\n"
        for i, r in enumerate(bad)))
    (root / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in corpus.eval_prompts))
    args = (*BASE, "model=hf", f"model.path={model_dir}", "data=custom",
            f"data.train={root / 'train.jsonl'}", f"data.queries={root / 'queries.jsonl'}",
            f"data.eval={root / 'eval.jsonl'}", "judge=keyword",
            "judge.patterns=[hide the evidence]", "judge.max_new_tokens=24",
            f"cache_dir={root / 'cache'}")
    return root, args


BAD_VALUES = [
    ("influence.alpha=1.5", "influence.alpha=1.5: must be in (0, 1]"),
    ("influence.alpha=0", "influence.alpha=0.0: must be in (0, 1]"),
    ("influence.query_batch_size=0", "influence.query_batch_size=0: must be >= 1"),
    ("influence.method=lissa", "influence.method='lissa'"),
    ("ibo.method=dpo", "ibo.method='dpo'"),
    ("model.dtype=int8", "model.dtype='int8'"),
    ("pipeline.verify=sha", "pipeline.verify='sha': expected one of off, quick, full"),
    ("influence.damping=-1.0", "influence.damping=-1.0: must be >= 0"),
    ("ibo.beta=0", "ibo.beta=0.0: must be > 0"),
    ("ibo.granularity=word", "ibo.granularity='word': expected one of token, sequence"),
    ("ibo.rejected_tokens=some", "ibo.rejected_tokens='some': expected one of distinct, all"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_config_value_names_the_key(override, message, tmp_path, capsys):
    """The first value through a real ``python -m pipeline``; the others through the same
    validation and error report in this process (a CLI start costs ~6 s each)."""
    if override == BAD_VALUES[0][0]:
        proc = run_cli(*BASE, override, f"cache_dir={tmp_path}", f"output_dir={tmp_path / 'o'}",
                       check=False)
        code, stderr = proc.returncode, proc.stderr
        assert not any(tmp_path.glob("prepare/*"))  # refused before any stage ran
    else:
        code, stderr = _validated_in_process([*BASE, override], capsys)
    assert code == 2, stderr[-2000:]
    assert message in stderr


def test_a_value_of_the_wrong_type_or_an_unknown_key_is_bad_input(tmp_path):
    """Hydra refuses these before LANCET runs; they still end as bad input (exit 2), the key
    named. (The suite sets HYDRA_FULL_ERROR=1 for traces; a user's shell does not.)"""
    for override, named in (("cluster.num_workers=abc", "full_key: cluster.num_workers"),
                            ("influence.alpah=0.5", "Key 'alpah' not in 'InfluenceConf'")):
        proc = run_cli(override, f"cache_dir={tmp_path}", f"output_dir={tmp_path / 'o'}",
                       check=False, HYDRA_FULL_ERROR="0")
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr[-2000:]


def _validated_in_process(overrides: list[str], capsys) -> tuple[int, str]:
    """What ``run_from_hydra`` does before any stage: type, validate, report a failure."""
    from test_configs import compose_typed

    from pipeline import specs
    from pipeline.run import _report
    try:
        specs.validate(compose_typed(overrides))
    except Exception as err:  # noqa: BLE001 - the report decides what it is
        return _report(err), capsys.readouterr().err
    return 0, ""


def test_bad_rows_in_user_data_name_file_row_and_column(user_project, tmp_path):
    root, args = user_project
    bad = tmp_path / "train.jsonl"
    lines = (root / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[4])
    row["prompt"] = None
    lines[4] = json.dumps(row)
    bad.write_text("\n".join(lines) + "\n")
    proc = run_cli(*args, f"data.train={bad}", f"output_dir={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2
    assert f"{bad}, line 5, column 'prompt': null or empty" in proc.stderr


def test_missing_model_directory(user_project, tmp_path):
    root, args = user_project
    proc = run_cli(*args, f"model.path={tmp_path / 'none'}", f"output_dir={tmp_path / 'o'}",
                   check=False)
    assert proc.returncode == 2 and "no such directory" in proc.stderr


def test_a_failing_stage_keeps_earlier_work_and_a_rerun_reuses_it(demo_run, tmp_path):
    """The shared demo run's cache up to score: the run computes select, then its ibo stage
    refuses (a learning rate that diverges is only found by training). What the failed run
    computed is kept and a rerun reuses it. ``cluster.max_failures=0``: the error reaches the
    driver from Ray Train itself (the default retry is tests/test_user_errors.py's)."""
    cache = copy_cache(demo_run[0], tmp_path / "cache",
                       stages=("prepare", "fit_factors", "score"))
    args = (*DEMO, f"cache_dir={cache}", "cluster.max_failures=0")
    proc = run_cli(*args, "ibo.lr=1e6", f"output_dir={tmp_path / 'bad'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: ibo: the ibo loss is nan at step 2 of 60 (ibo.lr=1e+06); the model diverged: " \
        "lower ibo.lr" in proc.stderr
    assert list((cache / "select").glob("*/stage.json"))  # computed by the failed run: kept
    assert not list((cache / "ibo").glob("*/stage.json"))
    assert not list((cache / "ibo").glob(".*tmp*"))  # nothing half-written
    run_cli(*args, "pipeline.until=select", f"output_dir={tmp_path / 'again'}")
    assert computed(tmp_path / "again") == set()


def test_more_workers_than_the_cluster_can_place_fails_at_once(tmp_path):
    proc = run_cli(*BASE, "cluster.num_workers=64", f"cache_dir={tmp_path}",
                   f"output_dir={tmp_path / 'o'}", check=False, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cluster.num_workers=64 needs 64 workers x {CPU: 0.5}" in proc.stderr
    assert "the cluster has {CPU: 2, GPU: 0} on 1 node(s)" in proc.stderr
    assert not any(tmp_path.glob("prepare/*"))  # refused before any stage ran


def test_oracle_without_ground_truth_is_refused_before_any_stage(user_project, tmp_path):
    """(It was refused only at the ibo stage, after the four before it had run.)"""
    root, args = user_project
    proc = run_cli(*args, "ibo=oracle", f"output_dir={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: ibo.method=oracle retrains on the truly clean rows: set data.label_column" \
        in proc.stderr
    assert "prepare" not in proc.stdout + proc.stderr.split("error:")[0]  # no stage started


def test_model_folder_without_tokenizer_files_is_refused(user_project, tmp_path):
    root, args = user_project
    model = next(a for a in args if a.startswith("model.path=")).split("=", 1)[1]
    bare = tmp_path / "bare"
    shutil.copytree(model, bare, ignore=lambda d, names: [n for n in names if "token" in n
                                                          or n in ("vocab.json", "merges.txt")])
    proc = run_cli(*args, f"model.path={bare}", f"output_dir={tmp_path / 'o'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"model.path={bare}: no tokenizer files (missing tokenizer.json" in proc.stderr


def test_plain_user_paths_bom_jsonl_and_in_place_edits(user_project, tmp_path):
    """No `model=hf data=custom`: user defaults, not the demo's; a JSONL with a byte-order mark
    is read; a train file edited in place is prepared again, not reused (an unchanged one is
    reused: tests/test_pipeline.py)."""
    root, args = user_project
    plain = [a for a in args if a not in ("model=hf", "data=custom", "model.max_length=64")
             and not a.startswith(("data.eval=", "judge"))]
    train = tmp_path / "train.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + (root / "train.jsonl").read_bytes())
    run = (*plain, f"data.train={train}", "pipeline.until=prepare", f"cache_dir={tmp_path / 'c'}")
    run_cli(*run, f"output_dir={tmp_path / 'a'}")
    model = next(a for a in args if a.startswith("model.path=")).split("=", 1)[1]
    positions = json.loads((Path(model) / "config.json").read_text())["n_positions"]
    # the user default (512), or the positions of a model that takes fewer
    assert f"max_length: {min(512, positions)}" in (tmp_path / "a" / "config.yaml").read_text()
    assert "label_column: ''" in (tmp_path / "a" / "config.yaml").read_text()
    published = (tmp_path / "a" / "config.yaml").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "prompt": "p"}\n')  # no response
    proc = run_cli(*plain, f"data.train={bad}", "pipeline.until=prepare",
                   f"cache_dir={tmp_path / 'c'}", f"output_dir={tmp_path / 'a'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (tmp_path / "a" / "config.yaml").read_text() == published  # the failed run's is not
    lines = train.read_text(encoding="utf-8-sig").splitlines()
    row = json.loads(lines[0])
    row["response"] = row["response"][::-1]  # same size, new content
    train.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    run_cli(*run, f"output_dir={tmp_path / 'c2'}")
    assert computed(tmp_path / "c2") == {"prepare"}
