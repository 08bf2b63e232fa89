"""Small trained demo models saved as Hugging Face directories, shared by tests."""

from __future__ import annotations

from pathlib import Path

from cluster.dataio import write_parquet_atomic
from pipeline.demo.corpus import build_corpus
from pipeline.demo.model import TinyModelConfig, train_demo_model


def save_demo_model(root: Path, epochs: int = 8, width: int = 32, seed: int = 0):
    """Train the demo GPT-2 briefly; write model/, train.parquet; return (corpus, paths)."""
    corpus = build_corpus(seed=seed)
    model, tok = train_demo_model(corpus.train, [e["prompt"] for e in corpus.eval_prompts],
                                  TinyModelConfig(width=width, epochs=epochs, seed=seed))
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    train = root / "train.parquet"
    write_parquet_atomic(corpus.train, train)
    return corpus, model_dir, train
