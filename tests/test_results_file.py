"""bench/RESULTS.md's sections, written by benchmarks that may finish at the same time."""

from __future__ import annotations

import multiprocessing

from bench import results_file


def _writer(path: str, name: str, rounds: int) -> None:
    from pathlib import Path
    for i in range(rounds):
        results_file.write_section(f"{name} round {i}\n", f"<!-- {name} -->", f"<!-- /{name} -->",
                                   Path(path))


def test_a_section_is_replaced_in_place_and_others_are_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nintro\n")
    results_file.write_section("one\n", "<!-- a -->", "<!-- /a -->", path)
    results_file.write_section("two\n", "<!-- b -->", "<!-- /b -->", path)
    results_file.write_section("one again\n", "<!-- a -->", "<!-- /a -->", path)
    assert path.read_text() == ("# Results\n\nintro\n\n<!-- a -->\none again\n<!-- /a -->\n"
                                "<!-- b -->\ntwo\n<!-- /b -->\n")


def test_writers_at_the_same_time_lose_no_section(tmp_path):
    """Four processes each rewrite their own section 30 times at once: every section ends
    with its last round (without the lock, a write built on a stale copy dropped others')."""
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n")
    ctx = multiprocessing.get_context("spawn")
    names = [f"s{i}" for i in range(4)]
    procs = [ctx.Process(target=_writer, args=(str(path), n, 30)) for n in names]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    text = path.read_text()
    for n in names:
        assert text.count(f"<!-- {n} -->") == 1
        assert f"{n} round 29\n" in text
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
