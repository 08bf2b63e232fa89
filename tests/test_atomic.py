"""The one write-then-rename helper (cluster/atomic.py)."""

import pytest

from cluster.atomic import atomic


def test_a_file_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed half-way")
    assert target.read_text() == "new"  # the old version stays
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # nothing left


def test_a_folder_replaces_the_old_one(tmp_path):
    target = tmp_path / "ranked"
    for content in ("a", "b"):
        with atomic(target) as tmp:
            tmp.mkdir()
            (tmp / content).write_text(content)
    assert [p.name for p in target.iterdir()] == ["b"]
    with pytest.raises(OSError), atomic(target) as tmp:
        tmp.mkdir()
        raise OSError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranked"]
