"""The stage record: sizes and hashes written last, checked on reuse, damage recomputed."""

import errno
import json
from pathlib import Path

import pytest

from pipeline import records
from pipeline.dag import Stage, run_stage
from pipeline.faults import WriteFault, write_fault


def two_files(ctx):
    ctx.out.joinpath("sub").mkdir()
    ctx.out.joinpath("a.bin").write_bytes(b"a" * 100)
    ctx.out.joinpath("sub", "b.json").write_text('{"x": 1}')
    two_files.calls += 1
    return {"m": 1.0}


STAGE = Stage("s", two_files, (), (), "s")


def run(cache: Path, verify: str = "quick", log=print):
    return run_stage(STAGE, None, {}, "fp", cache, log, verify)


@pytest.fixture
def cache(tmp_path):
    two_files.calls = 0
    run(tmp_path)
    return tmp_path


def test_the_record_holds_every_file_with_its_size_and_hash(cache):
    record = json.loads((cache / "s" / "fp" / "stage.json").read_text())
    assert record["files"]["a.bin"]["size"] == 100
    assert record["files"]["sub/b.json"]["sha256"] == records.sha256(cache / "s/fp/sub/b.json")
    assert record["metrics"]["m"] == 1.0


def test_an_intact_stage_is_reused(cache):
    assert run(cache)[2] is True and two_files.calls == 1


@pytest.mark.parametrize("damage", ["truncate", "same_size", "delete", "record"])
def test_a_damaged_stage_is_recomputed_with_a_warning_naming_the_file(cache, damage):
    folder, said = cache / "s" / "fp", []
    victim = folder / ("stage.json" if damage == "record" else "a.bin")
    if damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[:-1] + (b"b" if damage == "same_size" else b""))
    path, metrics, cached = run(cache, log=said.append)
    assert not cached and two_files.calls == 2 and metrics["m"] == 1.0
    assert any(str(victim) in line and line.startswith("warning:") for line in said)
    assert (folder / "a.bin").read_bytes() == b"a" * 100
    assert [p.name for p in (cache / "s").iterdir()] == ["fp"]  # nothing left aside


def test_verify_off_trusts_the_record_and_old_records_are_unverified(cache):
    folder = cache / "s" / "fp"
    (folder / "a.bin").write_bytes(b"short")
    assert run(cache, verify="off")[2] is True
    record = json.loads((folder / "stage.json").read_text())
    del record["files"]  # as written before files were recorded
    (folder / "stage.json").write_text(json.dumps(record))
    assert run(cache)[2] is True and two_files.calls == 1


def test_full_hashes_files_the_quick_check_only_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "HASH_LIMIT", 10)
    two_files.calls = 0
    run(tmp_path, verify="full")
    big = tmp_path / "s" / "fp" / "a.bin"
    big.write_bytes(b"b" * 100)  # same size, other content
    assert run(tmp_path, verify="quick")[2] is True
    assert run(tmp_path, verify="full")[2] is False


def test_a_damaged_stage_that_cannot_be_moved_aside_is_refused_naming_the_file(cache,
                                                                               monkeypatch):
    (cache / "s" / "fp" / "a.bin").write_bytes(b"short")

    def refuse(self, target):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "rename", refuse)
    with pytest.raises(records.CacheError, match=r"a\.bin: 5 bytes.*cannot be recomputed"):
        run(cache)


def test_a_stage_whose_write_fails_raises_one_line_naming_the_path(tmp_path):
    def full(ctx):
        raise OSError(errno.ENOSPC, "No space left on device", str(ctx.out / "x.bin"))

    with pytest.raises(WriteFault, match=r"cannot write .*x\.bin: no space left on device"):
        run_stage(Stage("f", full, (), (), "f"), None, {}, "fp", tmp_path, print)
    assert list((tmp_path / "f").iterdir()) == []


@pytest.mark.parametrize("text, line", [
    ("IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })",
     "cannot write /w: no space left on device"),
    ("[Errno 30] Read-only file system: '/ro/x.parquet'",
     "cannot write /ro/x.parquet: read-only file system"),
    ("(sqlite3.OperationalError) database or disk is full", "cannot write /w: no space left"),
    ("ValueError: bad alpha", None),
])
def test_write_faults_are_found_in_the_text_of_wrapped_errors(text, line):
    wrapped = RuntimeError("ray task failed")
    wrapped.__cause__ = RuntimeError(f"Traceback:\n  File \"/x/y.py\", line 3\n{text}")
    fault = write_fault(wrapped, Path("/w"))
    assert (str(fault).startswith(line) if line else fault is None)
