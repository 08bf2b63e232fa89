"""The evaluate stage's model work runs as Ray tasks (issue #12), with a chat-template tokenizer
and a 64-position model given prompts longer than its context (issue #13's crash case)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from chat_tokenizer import CHAT_TURNS, chat_tokenizer
from tiny_models import tiny_model

from cluster import eval_job, model_io
from cluster.batches import TURNS, TokenizeConfig
from cluster.eval_job import EvalSpec, clean_perplexity, evaluate_models, generate
from cluster.runtime import ClusterConfig
from pipeline.config import LancetConf
from pipeline.dag import StageContext
from pipeline.stages import evaluate

pytestmark = pytest.mark.ray
LONG = " ".join(["one two three four five"] * 14)  # 70 words: more than the 64 positions
PROMPTS = [{"id": "p0", "prompt": "hi there", "split": "seen"},
           {"id": "p1", "prompt": LONG, "split": "unseen"},
           {"id": "p2", "prompt": "flat", TURNS: json.dumps(CHAT_TURNS), "split": "seen"}]
CLEAN = [{"id": "c0", "prompt": "tell me a story", "response": "once upon a time the end"},
         {"id": "c1", "prompt": LONG, "response": "fine thanks"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    path = tmp_path_factory.mktemp("chat_model")
    tiny_model("gpt2", seed=1, dtype=torch.float32).save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    yield path
    ray.shutdown()


def test_tasks_return_what_the_model_gives_in_process(model_dir):
    spec = EvalSpec(tokenizer_path=str(model_dir), tokenize=TokenizeConfig(max_length=128))
    cluster = ClusterConfig(num_workers=2, cpus_per_worker=0.5)
    results = evaluate_models({"before": str(model_dir), "after": str(model_dir)}, spec,
                              PROMPTS, CLEAN, cluster)
    model = model_io.load_model(model_dir, eager_attention=False)
    tok = model_io.load_tokenizer(model_dir)
    assert tok.chat_template  # the template travelled with the model directory
    expected = generate(model, tok, PROMPTS, spec)
    ppl = clean_perplexity(model, tok, CLEAN, spec.tokenize)
    for result in results.values():
        assert result["generations"] == expected
        assert result["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert result["device"] == "cpu" and result["dtype"] == "float32"
        assert any("prompts exceed 40 tokens" in w for w in result["warnings"])


def test_evaluate_stage_never_loads_a_model_in_the_driver(model_dir, tmp_path, monkeypatch):
    """The stage on prepared files: metrics for both models, the models loaded by workers."""
    def refuse(*args, **kwargs):
        raise AssertionError("the driver loaded a model")
    monkeypatch.setattr(model_io, "load_model", refuse)  # workers import their own copies
    monkeypatch.setattr(eval_job, "load_model", refuse)
    prepared, select, ibo, out = (tmp_path / n for n in ("prepare", "select", "ibo", "out"))
    for folder in (prepared, select, ibo, out):
        folder.mkdir()
    (prepared / "info.json").write_text(json.dumps({"model_path": str(model_dir)}))
    (ibo / "model").symlink_to(model_dir)
    pq.write_table(pa.Table.from_pylist(PROMPTS), prepared / "eval.parquet")
    pq.write_table(pa.Table.from_pylist(CLEAN), prepared / "clean_eval.parquet")
    pq.write_table(pa.table({"id": ["a"], "score": [1.0]}), select / "scores.parquet")
    (select / "select").mkdir()
    pq.write_table(pa.Table.from_pylist(CLEAN[:1]), select / "select" / "positive.parquet")
    cfg = LancetConf()
    cfg.judge.patterns = ["one"]
    cfg.judge.refusal_patterns = ["upon"]
    cfg.eval.relearn_steps = [1, 2]  # issue #15: relearning, as a third task
    cfg.cluster.threads_per_worker = 1
    logs: list[str] = []
    ctx = StageContext(cfg, {"prepare": prepared, "select": select, "ibo": ibo}, out, logs.append,
                       name="evaluate")
    metrics = evaluate.run(ctx)
    assert {"behavior/undesirable_rate_before", "behavior/undesirable_rate_unseen_after",
            "utility/ppl_before", "utility/ppl_after"} <= set(metrics)
    assert metrics["utility/ppl_before"] == metrics["utility/ppl_after"]
    assert {"behavior/overrefusal_rate_before", "behavior/overrefusal_rate_after",
            "utility/distinct2_clean_before", "utility/distinct2_clean_after",
            "robustness/relearn_1_undesirable_rate", "robustness/relearn_2_undesirable_rate",
            "robustness/relearn_2_undesirable_rate_unseen"} <= set(metrics)
    assert 0 <= metrics["behavior/overrefusal_rate_after"] <= 1
    clean_lines = (out / "clean_generations.jsonl").read_text().splitlines()
    assert len(clean_lines) == len(CLEAN) and "refused_after" in json.loads(clean_lines[0])
    assert any(line.startswith("evaluate (relearn) ran on cpu") for line in logs)
    assert any("ran on cpu in float32" in line for line in logs)
    assert any("prompts exceed" in line for line in logs)
    lines = (out / "generations.jsonl").read_text().splitlines()
    assert len(lines) == len(PROMPTS)
