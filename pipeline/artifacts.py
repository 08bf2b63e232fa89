"""The artifact catalog: every file a stage hands to another, named once.

A stage gets its inputs as handles (``ctx.input("prepare")`` → ``Prepared``) and writes through
its own (``ctx.output()``); no stage builds a path into another stage's folder or imports
another stage. Each handle wraps the folder the DAG publishes atomically for that stage, so
writing under ``root`` needs no temporary names of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from cluster.attribution import COLUMN as UNIT_SHARES
from cluster.attribution import DEPENDENCE as UNIT_DEPENDENCE
from cluster.attribution import units_of
from cluster.selection_io import SCORES_FILE


@dataclass(frozen=True)
class Artifact:
    root: Path

    def file(self, name: str) -> Path:
        return self.root / name


@dataclass(frozen=True)
class Prepared(Artifact):
    """``prepare``: the corpus, queries and prompts as Parquet, the model θs, ``info.json``."""

    @property
    def train(self) -> Path:
        return self.root / "train.parquet"

    @property
    def queries(self) -> Path:
        return self.root / "queries.parquet"

    @property
    def eval_prompts(self) -> Path:
        return self.root / "eval.parquet"

    @property
    def clean_eval(self) -> Path:
        return self.root / "clean_eval.parquet"

    @property
    def info_file(self) -> Path:
        return self.root / "info.json"

    @property
    def demo_model(self) -> Path:
        return self.root / "model"

    def info(self) -> dict:
        return json.loads(self.info_file.read_text())

    def model_dir(self) -> str:
        """The model θs: the user's directory, or the demo's (inside this folder)."""
        path = self.info()["model_path"]
        return str(self.demo_model) if path is None else path

    def label_column(self) -> str:
        """The ground-truth column of the training rows ("" when there is none)."""
        return self.info().get("label_column") or ""


@dataclass(frozen=True)
class Factors(Artifact):
    """``fit_factors``: the curvature (``factors.safetensors``, ``units.json``) and meta."""

    @property
    def meta(self) -> Path:
        return self.root / "meta.json"

    @property
    def units(self) -> Path:
        return self.root / "units.json"


@dataclass(frozen=True)
class Scored(Artifact):
    """``score``: every training row with its score and rank, as a folder of shards."""

    @property
    def ranked(self) -> Path:
        return self.root / "ranked"


@dataclass(frozen=True)
class Selection(Artifact):
    """``select``: the ranked scores with their set, and one Parquet file per correction set."""

    @property
    def scores(self) -> Path:
        return self.root / SCORES_FILE

    @property
    def sets(self) -> Path:
        return self.root / "select"

    def set_file(self, name: str) -> Path:
        return self.sets / f"{name}.parquet"

    def columns(self, *names: str) -> dict[str, list]:
        """Only ``names`` of the scores (those that exist), not the training text."""
        present = set(pq.ParquetFile(self.scores).schema_arrow.names)
        return pq.read_table(self.scores, columns=[n for n in names if n in present]).to_pydict()

    def unit_shares(self) -> tuple[list[str], list[list[float]]]:
        """(unit names, the attributed rows' shares): the score stage's ``unit_shares`` column
        without its nulls; ``([], [])`` when the scores have none."""
        return self._per_unit(UNIT_SHARES)

    def unit_dependence(self) -> tuple[list[str], list[list[float]]]:
        """(sublayer names, the attributed rows' dependence percentiles), as ``unit_shares``."""
        return self._per_unit(UNIT_DEPENDENCE)

    def _per_unit(self, column: str) -> tuple[list[str], list[list[float]]]:
        names = units_of(pq.ParquetFile(self.scores).schema_arrow, column)
        if not names:
            return [], []
        values = pq.read_table(self.scores, columns=[column]).column(0)
        return names, [row for row in values.to_pylist() if row is not None]

    def rows_at(self, positions: list[int], *names: str) -> dict[int, dict]:
        """Columns ``names`` of the rows at ``positions`` (file order), streamed: the text of
        the other rows is never held."""
        wanted, found, offset = set(positions), {}, 0
        for batch in pq.ParquetFile(self.scores).iter_batches(batch_size=4096, columns=names):
            for i in wanted.intersection(range(offset, offset + batch.num_rows)):
                found[i] = {n: batch.column(n)[i - offset].as_py() for n in names}
            offset += batch.num_rows
        return found


@dataclass(frozen=True)
class Corrected(Artifact):
    """``ibo``: the corrected model and its per-step curve."""

    @property
    def model(self) -> Path:
        return self.root / "model"


@dataclass(frozen=True)
class Evaluation(Artifact):
    """``evaluate``: the metrics and the generations behind them."""

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.json"

    def metrics(self) -> dict:
        return json.loads(self.metrics_file.read_text())


@dataclass(frozen=True)
class Report(Artifact):
    """``report``: plots and the table of the most influential samples."""


CATALOG: dict[str, type[Artifact]] = {
    "prepare": Prepared, "fit_factors": Factors, "score": Scored, "select": Selection,
    "ibo": Corrected, "evaluate": Evaluation, "report": Report,
}
