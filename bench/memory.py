"""Peak memory of the stages that stream the corpus, at 1× and 10× its size.

Two parts, each the code the pipeline runs:
- the scoring actors (``cluster.scoring.score_corpus``: Ray Data ``map_batches`` with the
  ``Scorer`` actor pool), whose resident memory is sampled from outside with psutil while they
  stream the corpus;
- the driver's steps that see every row, each in a fresh process: validating and writing the
  corpus (``prepare``: ``iter_validated`` into ``write_parquet_atomic``) and ranking the scored
  shards (``finalize``), on rows with 1.2 KB of text, so that holding the corpus would show.

``python -m bench.memory [--quick]`` runs this section alone and prints its table.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.standalone import run_section
from cluster.batches import TokenizeConfig
from cluster.dataio import write_parquet_atomic
from cluster.datasets import read_prepared
from cluster.factor_job import FactorSpec, fit_factors
from cluster.runtime import ClusterConfig
from cluster.scoring import ScoreSpec, precondition, score_corpus

ROOT = Path(__file__).resolve().parents[1]
TOKENS = TokenizeConfig(max_length=64)
CLUSTER = ClusterConfig(num_workers=2, cpus_per_worker=0.5, batch_size=32)
MIB = 2 ** 20


class PeakSampler:
    """Largest resident set seen among processes whose command line contains ``title``."""

    def __init__(self, title: str, every: float = 0.05) -> None:
        self.title, self.every, self.peak, self._stop = title, every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil
        while not self._stop.is_set():
            for proc in psutil.process_iter(["cmdline", "memory_info"]):
                line = " ".join(proc.info["cmdline"] or [])
                if self.title in line and proc.info["memory_info"] is not None:
                    self.peak = max(self.peak, proc.info["memory_info"].rss)
            time.sleep(self.every)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def actor_peaks(corpus, model_dir: Path, work: Path, copies: tuple[int, int]) -> dict:
    """Peak RSS of one scoring actor while the pool streams ``copies`` × the corpus."""
    base = work / "mem_1x.parquet"
    write_parquet_atomic(corpus.train, base)
    fit_factors(read_prepared(base, CLUSTER), FactorSpec(str(model_dir), tokenize=TOKENS),
                CLUSTER, work / "mem_factors", work / "ray")
    spec = ScoreSpec(str(model_dir), tokenize=TOKENS)
    feats = precondition(spec, [r for r in corpus.train if r["planted"]][:4], work / "mem_factors")
    peaks = {}
    for k in copies:
        data = work / f"mem_{k}x.parquet"
        write_parquet_atomic([{**r, "id": f"{r['id']}-{c}"} for c in range(k)
                              for r in corpus.train], data)
        with PeakSampler("MapBatches(Scorer)") as sampler:
            score_corpus(read_prepared(data, CLUSTER), spec, feats, CLUSTER, work / f"mem_raw{k}")
        peaks[k] = sampler.peak / MIB
    return peaks


SCRIPTS = {
    "ranking": """
from cluster.scoring import finalize
rows = finalize(Path({src!r}), Path({out!r}), "max")["rows"]
""",
    "validation": """
from cluster.dataio import iter_validated, write_parquet_atomic
rows = write_parquet_atomic(iter_validated({src!r}), Path({out!r}))
"""}
HEAD = "import sys\nfrom pathlib import Path\nsys.path.insert(0, {root!r})\n"
# VmHWM: this process's own peak (ru_maxrss is inherited across exec from a larger parent)
TAIL = ("hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('RSS', hwm.split()[1], rows)\n")


def fresh_peak(kind: str, src: Path, out: Path) -> float:
    """Peak RSS (MiB) of a fresh process running one driver step of ``kind``."""
    code = (HEAD + SCRIPTS[kind] + TAIL).format(root=str(ROOT), src=str(src), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=1800, check=True)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RSS"))
    return int(line.split()[1]) / 1024


def synthetic_jsonl(folder: Path, rows: int, shard_rows: int = 2_000) -> None:
    """A user's corpus: JSONL files of prompt/response rows with a 1 KB passthrough column."""
    folder.mkdir(parents=True)
    for k, start in enumerate(range(0, rows, shard_rows)):
        lines = (json.dumps({"id": f"s{i}", "prompt": f"question {i}", "response": "r" * 200,
                             "context": "c" * 1000}) + "\n"
                 for i in range(start, min(rows, start + shard_rows)))
        (folder / f"{k:05d}.jsonl").write_text("".join(lines))


def synthetic_raw(folder: Path, rows: int, shard_rows: int = 2_000, seed: int = 0) -> None:
    """Raw score shards as the actors write them (one file per block, the same size at 1× and
    10×), with 1.2 KB of passthrough text per row."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    text = "t" * 1000
    for k, start in enumerate(range(0, rows, shard_rows)):
        n = min(shard_rows, rows - start)
        flat = pa.array(rng.normal(size=n * 4), type=pa.float64())
        pq.write_table(pa.table({
            "id": [f"s{start + i}" for i in range(n)], "prompt": [text] * n,
            "response": [text[:200]] * n, "n_tokens": pa.array(np.full(n, 64), pa.int64()),
            "raw": pa.FixedSizeListArray.from_arrays(flat, 4)}), folder / f"{k}.parquet")


def driver_peaks(kind: str, work: Path, rows: int, copies: tuple[int, int]) -> dict:
    """Peak RSS of ``kind`` (ranking or validation) on ``copies`` × ``rows`` rows."""
    make = synthetic_raw if kind == "ranking" else synthetic_jsonl
    peaks = {}
    for k in copies:
        src = work / f"{kind}_src{k}"
        make(src, rows * k)
        peaks[k] = fresh_peak(kind, src, work / f"{kind}_out{k}")
        shutil.rmtree(src)
    return peaks


def scoring_memory(corpus, model_dir: Path, work: Path, quick: bool = False) -> dict:
    copies = (1, 10)
    actors = actor_peaks(corpus, model_dir, work, copies)
    out = {"scoring actor peak RSS 1× (MiB)": actors[1],
           "scoring actor peak RSS 10× (MiB)": actors[10],
           "scoring actor peak RSS 10× ÷ 1× (goal ≤ 1.1)": actors[10] / actors[1]}
    rows = 5_000 if quick else 20_000
    for kind in ("validation", "ranking"):
        peaks = driver_peaks(kind, work, rows, copies)
        out.update({f"{kind} (driver) peak RSS 1× (MiB)": peaks[1],
                    f"{kind} (driver) peak RSS 10× (MiB)": peaks[10],
                    f"{kind} (driver) peak RSS 10× ÷ 1×": peaks[10] / peaks[1],
                    f"{kind} (driver) bytes per extra row": (peaks[10] - peaks[1]) * MIB
                    / (9 * rows)})
    out["memory corpora (rows)"] = (
        f"actors: {len(corpus.train)} and {10 * len(corpus.train)} demo rows, 2 actors; driver "
        f"steps: {rows} and {10 * rows} rows of 1.2 KB text ({rows * 1.2 / 1024:.0f} and "
        f"{rows * 12 / 1024:.0f} MiB), files of 2,000 rows")
    return out


def _measure(work: Path, quick: bool) -> dict:
    from bench.recall import trained
    from bench.scenarios import scenario
    corpus, patterns = scenario("harm", 0.1)
    model, tok, _ = trained(corpus, patterns)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    return scoring_memory(corpus, work / "model", work, quick)


if __name__ == "__main__":
    run_section("memory", _measure)
