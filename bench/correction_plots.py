"""One figure per scenario of the correction benchmark: every run's undesirable rate against its
perplexity (left) and its clean-prompt refusals (right), each method's Pareto front drawn, its
chosen defaults ringed, the utility budget shaded."""

from __future__ import annotations

from pathlib import Path

COLOURS = {"ibo": "tab:blue", "npo": "tab:orange", "simnpo": "tab:green", "ga_kl": "tab:red"}


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower-left Pareto front of (x, y) points (lower is better on both), by x."""
    best, out = float("inf"), []
    for x, y in sorted(points):
        if y < best:
            out.append((x, y))
            best = y
    return out


def pareto_plot(name: str, runs: list[dict], before: dict, chosen: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    done = [r for r in runs if "skipped" not in r]
    for ax, key, xlabel, limit in (
            (axes[0], "ppl", "clean perplexity ÷ before (log; ≥ 3 drawn at 3)", 1.05),
            (axes[1], "overrefusal", "clean refusals − before (points)", 0.05)):
        for method, colour in COLOURS.items():
            mine = [r for r in done if r["knobs"].method == method]
            xs = [_x(r, key, before) for r in mine]
            ys = [(r["seen"] + r["unseen"]) / 2 for r in mine]
            ax.scatter(xs, ys, s=14, alpha=0.5, color=colour, label=method)
            line = front(list(zip(xs, ys)))
            ax.step(*zip(*line), where="post", color=colour, lw=1) if line else None
            picked = [r for r in mine if r["knobs"] == chosen.get(method)]
            ax.scatter([_x(r, key, before) for r in picked],
                       [(r["seen"] + r["unseen"]) / 2 for r in picked], s=90,
                       facecolors="none", edgecolors=colour, lw=1.5)
        if key == "ppl":  # a collapsed run's perplexity is off any useful scale: drawn at 3
            ax.set_xscale("log")
            ax.set_xlim(0.97, 3.05)
            ax.set_xticks([1, 1.05, 1.5, 2, 3], ["1", "1.05", "1.5", "2", "≥ 3"])
            ax.minorticks_off()
        ax.axvspan(ax.get_xlim()[0], limit, color="0.92", zorder=0)
        ax.axhline((before["seen"] + before["unseen"]) / 2, color="0.5", ls="--", lw=0.8)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("undesirable rate, mean of seen and unseen")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{name}: every run (dots), Pareto fronts (lines), chosen defaults (rings); "
                 "shaded: within budget; dashed: before", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _x(r: dict, key: str, before: dict) -> float:
    if key == "ppl":
        return min(r["ppl"] / before["ppl"], 3.0)
    return r["overrefusal"] - before["overrefusal"]
