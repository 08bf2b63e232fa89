"""The memory plan's figures against real runs of the same code on small models (CPU)."""

import pytest
from transformers import LlamaConfig

from pipeline.plan import PlanConfig, Session, influence_peaks, main


def small(**kw):
    return LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, **kw)


@pytest.mark.parametrize("method,rank", [("linfac", 8), ("ekfac", None)])
def test_planned_peaks_are_within_a_quarter_of_measured_peaks(method, rank):
    plan = PlanConfig(batch_size=4, tokens=48, dtype="float32", method=method, queries=6,
                      query_batch_size=2, query_rank=rank, workers=2)
    planned = influence_peaks(Session(small(), plan.dtype, fake=True), plan)
    measured = influence_peaks(Session(small(), plan.dtype, fake=False), plan)
    assert planned.keys() == measured.keys()
    for stage, bytes_measured in measured.items():
        assert abs(planned[stage] - bytes_measured) <= 0.25 * bytes_measured, stage


def test_the_cli_prints_a_table_for_a_model_directory(tmp_path, capsys):
    small().save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path), "--tokens", "32", "--batch-size", "2",
                 "--queries", "4", "--query-rank", "4", "--write", str(tmp_path / "p.md")]) == 0
    text = (tmp_path / "p.md").read_text()
    assert "fit: lambda pass" in text and "ibo: step" in text and "| yes |" in text
