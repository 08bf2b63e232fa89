"""`make bench` (or `python -m bench.run [--quick]`): measure, then write bench/RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import correction, memory, perf, recall, results_file
from bench.scenarios import scenario

RESULTS = results_file.RESULTS


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def recall_section(quick: bool, work: Path) -> tuple[list[str], dict]:
    specs = [("harm", 0.1)] + ([("rude", 0.05), ("outdated", 0.10)] if quick else
                               [("rude", 0.01), ("rude", 0.05), ("rude", 0.10),
                                ("outdated", 0.01), ("outdated", 0.05), ("outdated", 0.10)])
    out, keep = [], {}
    for name, rate in specs:
        corpus, patterns = scenario(name, rate)
        model, tok, queries = recall.trained(corpus, patterns)
        planted = sum(r["planted"] for r in corpus.train)
        title = f"### Scenario `{name}` ({planted} planted of {len(corpus.train)}, " \
                f"{len(queries)} queries observed)"
        log(title)
        if not queries:
            out += [title, "", "The model did not show the behaviour: nothing to recall.", ""]
            continue
        sizes = (1, 8, "all") if name == "harm" else (1,)
        rows = recall.recall_table(model, tok, corpus, queries, sizes, patterns)
        if name == "harm" or not quick:
            for strategy in ("ekfac", "kfac"):
                rows.append(recall.kronfluence_run(model, tok, corpus, queries, strategy,
                                                   patterns))
        out += [title, "", table(rows), ""]
        if name == "harm":
            keep = {"model": model, "tok": tok, "corpus": corpus, "queries": queries,
                    "rows": rows, "patterns": patterns}
    return out, keep


def _start_ray() -> None:
    """A local Ray of the benchmark's own (2 CPUs, a thread per worker)."""
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})


def correction_section(keep: dict, quick: bool, work: Path) -> tuple[list[str], dict]:
    _start_ray()
    corpus, patterns = keep["corpus"], keep["patterns"]
    base = correction.save(keep["model"], keep["tok"], corpus.train, work / "corr")
    by_method = {r["method"]: r for r in keep["rows"] if r["B"] == 1 and r["aggregate"] == "max"}
    before = correction.evaluate(base, base, corpus, patterns)
    rows = [{"method": "before", **before, "step_ms": 0.0}]
    linfac_scores, _, _ = recall.score(keep["model"], keep["tok"], corpus.train, keep["queries"],
                                       recall.InfluenceConfig(), patterns=patterns)
    sizes = correction.select_from_scores(corpus.train, linfac_scores, work / "corr")
    for method, settings in correction.BASELINE_SETTINGS.items():
        log(f"correction {method}")
        m = _guarded(lambda method=method, settings=settings: correction.correct(
            base, work / "corr", method, method, **settings))
        if m is None:
            rows.append({"method": f"{method} (failed: see the log)", **{k: float("nan") for k in
                                                                         before}, "step_ms": 0.0})
            continue
        rows.append({"method": method, **correction.evaluate(work / "corr" / method / "model",
                                                             base, corpus, patterns),
                     "step_ms": 1000 * m["step_seconds"]})
    live = _guarded(lambda: correction.correct(base, work / "corr", "ibo", "ibo_live",
                                               precompute_reference=False))
    ratio = rows[1]["step_ms"] / (1000 * live["step_seconds"]) if live else float("nan")
    out = ["## Correction quality", "",
           f"Demo scenario, recall by LinFAC (B = 1, max), α = 0.8: {sizes}. 2 Ray Train workers, "
           "DeepSpeed ZeRO-0 on CPU, each method at its conf/ibo/<method>.yaml settings.", "",
           table(rows), ""]
    if not quick:
        out += feed_section(keep, base, work, before, by_method)
    return out, {"IBO step with precomputed reference ÷ without": ratio}


def _guarded(job):
    """Run one Ray job; if it (or the local Ray under it) failed, log it and restart Ray."""
    import traceback

    import ray
    try:
        return job()
    except Exception:  # reported in the table as failed, the benchmark goes on
        traceback.print_exc()
        ray.shutdown()
        _start_ray()
        return None


def feed_section(keep, base, work, before, by_method) -> list[str]:
    from operators.scores import InfluenceConfig
    rows = []
    for method, sim in recall.METHODS:
        root = work / f"feed_{method}_{sim}"
        shutil.copytree(work / "corr" / "model", root / "model")
        raw, _, _ = recall.score(keep["model"], keep["tok"], keep["corpus"].train,
                                 keep["queries"], InfluenceConfig(method=method, similarity=sim),
                                 patterns=keep["patterns"])
        correction.select_from_scores(keep["corpus"].train, raw, root)
        name = method + (f"-{sim}" if method == "gradsim" else "")
        if not (root / "select" / "pairs.parquet").is_file():
            rows.append({"recall": f"{name} (no pairs: IBO needs both influence sets)",
                         **{k: float("nan") for k in before}})
            continue
        if _guarded(lambda root=root: correction.correct(base, root, "ibo", "ibo")) is None:
            rows.append({"recall": f"{name} (failed: see the log)",
                         **{k: float("nan") for k in before}})
            continue
        after = correction.evaluate(root / "ibo" / "model", base, keep["corpus"],
                                    keep["patterns"])
        rows.append({"recall": method + (f"-{sim}" if method == "gradsim" else ""), **after})
    return ["### IBO fed by each recall method", "", f"Before: {before}", "", table(rows), ""]


def perf_section(keep: dict, work: Path, extra: dict, quick: bool) -> list[str]:
    rows = {r["method"]: r for r in keep["rows"] if r["B"] == 1 and r["aggregate"] == "max"}
    linfac = rows["linfac"]["fit_s"] + rows["linfac"]["score_s"]
    # kronfluence's wall time includes its own disk I/O: the like-for-like ratio against the
    # project's EK-FAC (same passes, d=512) is the cost section (python -m bench.cost)
    ratios = {"LinFAC fit+score ÷ kronfluence EK-FAC wall time incl. its disk I/O":
              linfac / rows["kronfluence-ekfac"]["fit_s"],
              "LinFAC fit+score ÷ kronfluence KFAC wall time incl. its disk I/O":
              linfac / rows["kronfluence-kfac"]["fit_s"],
              "LinFAC AUPRC − kronfluence EK-FAC AUPRC":
              rows["linfac"]["auprc"] - rows["kronfluence-ekfac"]["auprc"]}
    ratios.update({f"curvature memory LinFAC ÷ EK-FAC, {k}": v
                   for k, v in perf.memory_ratios(keep["model"]).items()})
    log("scoring vs training")
    ratios.update(perf.scoring_vs_training(keep["model"], keep["tok"], keep["corpus"].train,
                                           keep["queries"]))
    log("peak memory of scoring")
    ratios.update(memory.scoring_memory(keep["corpus"], work / "corr" / "model", work, quick))
    from bench.workers import worker_scaling
    log("worker scaling")
    ratios.update(worker_scaling(keep["corpus"], work, quick))
    ratios.update(extra)
    log("sweep")
    try:
        ratios.update(perf.sweep_reuse(work / "sweep"))
    except Exception as err:  # reported, not hidden
        ratios["sweep (failed)"] = f"{type(err).__name__}: {err}"[:200]
    return ["## Performance ratios", "", table([{"measure": k, "value": v}
                                                for k, v in ratios.items()]), "",
            "Worker scaling: end to end = sequences ÷ seconds of the larger corpus, fixed costs "
            "included (Ray Train group and Ray Data pipeline start on every pass, actor start, "
            "model load); marginal = extra sequences ÷ extra seconds between the two corpora, "
            "which cancels them (bench/workers.py).", ""]


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, no GPU, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    began = time.time()
    work = Path(tempfile.mkdtemp(prefix="lancet_bench_"))
    lines, keep = recall_section(args.quick, work)
    head = ["# Benchmark results", "",
            f"Command: `{'make bench-quick' if args.quick else 'make bench'}` "
            f"(`python -m bench.run{' --quick' if args.quick else ''}`)  ",
            f"Date: {datetime.date.today()}  ", f"Machine: {machine()}", "",
            "All numbers of one table come from one run on this machine (shared, noisy: ratios "
            "are what to compare).", "", "## Recall quality", ""]
    lines = head + lines
    more, extra = correction_section(keep, args.quick, work)
    lines += more + perf_section(keep, work, extra, args.quick)
    lines += [f"Total benchmark time: {(time.time() - began) / 60:.1f} min.", ""]
    results_file.edit(lambda old: "\n".join(lines) + _kept_sections(old), RESULTS)
    from bench import attribution, correction_suite, cost, lds, scaling, suite
    scaling.main()
    cost.main([])
    attribution.main([])
    suite.main([])
    lds.main(["--seeds", "2" if args.quick else "5"])
    correction_suite.main(["--quick"] if args.quick else [])
    log(f"wrote {RESULTS}")
    shutil.rmtree(work, ignore_errors=True)


def _kept_sections(old: str) -> str:
    """The sections `python -m bench.gpu` (on a GPU machine), `python -m bench.cost`,
    `python -m bench.attribution`, `python -m bench.suite`, `python -m bench.lds` and
    `python -m bench.correction_suite` wrote (in ``old``, RESULTS.md's text), kept across
    `make bench` runs."""
    from bench import attribution, correction_suite, cost, gpu, lds, suite
    kept = ""
    for begin, end in ((gpu.BEGIN, gpu.END), (cost.BEGIN, cost.END),
                       (attribution.BEGIN, attribution.END), (suite.BEGIN, suite.END),
                       (lds.BEGIN, lds.END), (correction_suite.BEGIN, correction_suite.END)):
        if begin in old and end in old:
            kept += "\n\n" + begin + old.split(begin, 1)[1].split(end, 1)[0] + end + "\n"
    return kept

if __name__ == "__main__":
    sys.exit(main())
