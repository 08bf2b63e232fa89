"""The artifact catalog: stages hand files over through typed handles only."""

import ast
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import CATALOG, Prepared, Selection
from pipeline.stages.table import STAGES

STAGE_FILES = sorted((Path(__file__).parents[1] / "pipeline" / "stages").glob("*.py"))


def test_every_stage_has_a_handle():
    assert sorted(s.name for s in STAGES) == sorted(CATALOG)


def test_no_stage_imports_another_or_reaches_into_an_input_folder():
    for path in STAGE_FILES:
        if path.name in ("table.py", "__init__.py"):
            continue  # the DAG table names every stage's function
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("pipeline.stages"), path.name
            if isinstance(node, ast.Attribute) and node.attr == "inputs":
                raise AssertionError(f"{path.name}:{node.lineno} reads ctx.inputs, not a handle")


def test_prepared_names_the_model_and_the_label(tmp_path):
    prepared = Prepared(tmp_path)
    prepared.info_file.write_text(json.dumps({"model_path": None, "label_column": "planted"}))
    assert prepared.model_dir() == str(tmp_path / "model")  # the demo's, inside the folder
    assert prepared.label_column() == "planted"
    prepared.info_file.write_text(json.dumps({"model_path": "/m", "label_column": ""}))
    assert (prepared.model_dir(), prepared.label_column()) == ("/m", "")


def test_selection_reads_only_the_columns_and_rows_asked_for(tmp_path):
    selection = Selection(tmp_path)
    rows = 10_000
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "score": list(range(rows)),
                             "prompt": [f"p{i}" for i in range(rows)]}), selection.scores,
                   row_group_size=3000)
    assert set(selection.columns("score", "absent")) == {"score"}
    picked = selection.rows_at([0, 4095, 4096, 9999], "id", "prompt")
    assert picked == {i: {"id": f"r{i}", "prompt": f"p{i}"} for i in (0, 4095, 4096, 9999)}
    assert selection.set_file("positive") == tmp_path / "select" / "positive.parquet"
