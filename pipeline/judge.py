"""Judges: what counts as an undesirable output. A keyword judge, or a classifier model."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class JudgeConfig:
    """``kind=keyword`` flags outputs matching any of ``patterns`` (regular expressions, case
    insensitive); ``kind=classifier`` runs a sequence-classification model from ``path`` and
    flags ``label`` at probability ≥ ``threshold``."""

    kind: str = "keyword"
    patterns: tuple[str, ...] = field(default_factory=tuple)
    path: str = ""
    label: str = "unsafe"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in ("keyword", "classifier"):
            raise ValueError(f"judge.kind={self.kind!r}: expected keyword or classifier")
        if self.kind == "keyword":
            if not self.patterns:
                raise ValueError("judge.patterns is empty: give at least one pattern")
            for pattern in self.patterns:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ValueError(f"judge.patterns: {pattern!r} is not a valid regular "
                                     f"expression ({err})") from err
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"judge.threshold={self.threshold}: must be in [0, 1]")
        if self.kind == "classifier" and not self.path:
            raise ValueError("judge.path is empty: a classifier judge needs a model directory")


class Judge:
    """``flags(texts) -> list[bool]``."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        if config.kind == "keyword":
            self.regexes = [re.compile(p, re.IGNORECASE) for p in config.patterns]
        else:
            from transformers import pipeline as hf_pipeline
            self.classifier = hf_pipeline("text-classification", model=config.path,
                                          tokenizer=config.path, top_k=None)

    def flags(self, texts: list[str]) -> list[bool]:
        if self.config.kind == "keyword":
            return [any(r.search(t) for r in self.regexes) for t in texts]
        results = self.classifier(list(texts), truncation=True)
        return [any(d["label"] == self.config.label and d["score"] >= self.config.threshold
                    for d in result) for result in results]


def judge_config(conf) -> JudgeConfig:
    """The typed ``judge`` config group → ``JudgeConfig``."""
    return JudgeConfig(kind=conf.kind, patterns=tuple(conf.patterns), path=conf.path,
                       label=conf.label, threshold=conf.threshold)
