"""``report``: plots (PNG) and a readable table of the most influential samples."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from operators.attribution import mean_group_shares  # noqa: E402
from operators.dependence import LEVEL, reliance  # noqa: E402
from operators.metrics import precision_recall_curve  # noqa: E402
from operators.units import sublayer_of  # noqa: E402
from pipeline.artifacts import Selection  # noqa: E402
from pipeline.dag import StageContext  # noqa: E402
from pipeline.judge import Judge, judge_config  # noqa: E402

TOP = 20


def _score_distribution(table, out) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, colour in (("positive", "tab:red"), ("negative", "tab:blue"),
                         ("neutral", "tab:gray")):
        values = [s for s, k in zip(table["score"], table["set"]) if k == name and s == s]
        if values:
            ax.hist(values, bins=40, alpha=0.6, label=f"{name} ({len(values)})", color=colour)
    ax.set_xlabel("influence score (positive drives the behaviour)")
    ax.set_ylabel("samples")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "score_distribution.png", dpi=110)
    plt.close(fig)


def _pr_curve(table, label, metrics, out) -> None:
    scores = [s if s == s else -math.inf for s in table["score"]]
    precision, recall = precision_recall_curve(scores, [bool(x) for x in table[label]])
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot(recall, precision)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"recall of {label} (AUPRC {metrics.get('detect/auprc', float('nan')):.3f})")
    ax.set_ylim(0, 1.05)
    fig.tight_layout()
    fig.savefig(out / "precision_recall.png", dpi=110)
    plt.close(fig)


RATES = (("behavior/undesirable_rate", "harmful, seen\n(undesirable)"),
         ("behavior/undesirable_rate_unseen", "harmful, unseen\n(undesirable)"),
         ("behavior/overrefusal_rate", "clean prompts\n(refused)"))


def _rates(metrics, out) -> None:
    """Before/after: the undesirable rate on harmful prompts beside the refusal rate on clean
    ones (a correction that refuses everything scores 0 on the first and 1 on the second)."""
    shown = [(key, label) for key, label in RATES if _number(metrics.get(f"{key}_before"))]
    if not shown:  # nothing was evaluated (no data.eval, no data.clean_eval): no empty chart
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (key, _) in enumerate(shown):
        before, after = metrics[f"{key}_before"], metrics.get(f"{key}_after", float("nan"))
        for dx, value, colour, name in ((-0.2, before, "tab:red", "before"),
                                        (0.2, after, "tab:green", "after")):
            bars = ax.bar([i + dx], [value], width=0.4, color=colour,
                          label=name if i == 0 else None)
            ax.bar_label(bars, fmt="%.2f", fontsize=8)  # a rate of 0 draws no bar
    ax.set_xticks(range(len(shown)), [label for _, label in shown])
    ax.set_ylabel("share of prompts")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "undesirable_rate.png", dpi=110)
    plt.close(fig)


def _number(value) -> bool:
    return value is not None and value == value  # not missing, not NaN


def relearn_curve(metrics: dict) -> list[tuple[int, float]]:
    """(k, undesirable rate) after k relearning steps; k = 0 is the corrected model."""
    points = [(int(key.split("_")[1]), value) for key, value in metrics.items()
              if key.startswith("robustness/relearn_") and key.endswith("_undesirable_rate")]
    if points and "behavior/undesirable_rate_after" in metrics:
        points.append((0, metrics["behavior/undesirable_rate_after"]))
    return sorted(points)


def _relearning(metrics, out) -> None:
    points = relearn_curve(metrics)
    if not points:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([k for k, _ in points], [r for _, r in points], marker="o", label="corrected model")
    before = metrics.get("behavior/undesirable_rate_before")
    if before is not None:
        ax.axhline(before, color="tab:red", linestyle="--", label="before correction")
    ax.set_xlabel("fine-tuning steps on positive-influence samples")
    ax.set_ylabel("undesirable rate (seen prompts)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "relearning.png", dpi=110)
    plt.close(fig)


def _top_table(table, label, selection: Selection, judge: Judge, out) -> None:
    """The top and bottom ``TOP`` samples with their text; ``judged``: whether the judge flags
    the sample's own response (as ``detect/positive_judged_share`` counts it)."""
    rows = sorted(range(len(table["id"])), key=lambda i: table["rank"][i])
    shown = list(dict.fromkeys(rows[:TOP] + rows[::-1][:TOP]))
    text = selection.rows_at(shown, "prompt", "response")
    flagged = dict(zip(shown, judge.flags([str(text[i]["response"]) for i in shown])))
    lines = ["# Most influential training samples", "",
             "Positive scores drive the observed behaviour; negative ones inhibit it. *judged*: "
             "the judge flags the sample's own response (a sample can drive a behaviour without "
             "showing it).", ""]
    for title, chosen in (("Top positive", rows[:TOP]), ("Top negative", rows[::-1][:TOP])):
        lines += [f"## {title}", "", "| rank | id | score | set |"
                  + (f" {label} |" if label else "") + " judged | prompt | response |",
                  "|---|---|---|---|" + ("---|" if label else "") + "---|---|---|"]
        for i in chosen:
            cells = [str(table["rank"][i]), str(table["id"][i]), f"{table['score'][i]:.3f}",
                     table["set"][i]] + ([str(table[label][i])] if label else []) + [
                "yes" if flagged[i] else "no", _cell(text[i]["prompt"]),
                _cell(text[i]["response"])]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    (out / "top_influential.md").write_text("\n".join(lines))


def layer_attribution(names: list[str], rows: list[list[float]]
                      ) -> dict[int, dict[str, float]]:
    """Each layer's sublayers' mean share of the attributed samples' scores:
    ``{layer: {"attn": …, "mlp": …}}`` (rows whose shares are undefined are left out)."""
    shares = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(names))
    table: dict[int, dict[str, float]] = {}
    for (layer, part), mean in mean_group_shares(shares, names).items():
        table.setdefault(layer, {})[part] = mean
    return table


def layer_reliance(names: list[str], rows: list[list[float]]) -> dict[int, dict[str, float]]:
    """Each sublayer's reliance (``operators.dependence.reliance``: the share of the attributed
    samples that lose more than 95% of ordinary ones when it is ablated): ``{layer: {part: …}}``."""
    values = reliance(torch.tensor(rows, dtype=torch.float64).reshape(len(rows), len(names)))
    table: dict[int, dict[str, float]] = {}
    for name, value in zip(names, values.tolist()):
        layer, part = sublayer_of(name)
        table.setdefault(layer, {})[part] = value
    return table


def _attribution(selection: Selection, out) -> dict:
    """``layer_attribution.png`` and ``.csv`` from the scores' ``unit_shares`` and
    ``unit_dependence`` (none without them: a method without units, or
    ``influence.attribution_top_k=0``); the per-layer values as metrics
    ``attribution/layer<i>_<part>`` and ``dependence/layer<i>_<part>``."""
    names, rows = selection.unit_shares()
    if not names or not rows:
        return {}
    panels = [("attribution", layer_attribution(names, rows), len(rows))]
    sublayers, percentiles = selection.unit_dependence()
    if sublayers and percentiles:
        panels.append(("dependence", layer_reliance(sublayers, percentiles), len(percentiles)))
    parts = sorted({p for _, table, _ in panels for layer in table.values() for p in layer},
                   key=lambda p: ({"attn": 0, "mlp": 1}.get(p, 2), p))
    _attribution_csv(panels, parts, out)
    _attribution_plot(panels, parts, out)
    return {f"{kind}/layer{layer}_{part}" if layer >= 0 else f"{kind}/{part}": value
            for kind, table, _ in panels for layer, values in table.items()
            for part, value in values.items()}


def _attribution_csv(panels, parts: list[str], out) -> None:
    """One row per layer: the mean shares per part, then (if measured) the reliance per part."""
    suffix = {"attribution": "", "dependence": "_reliance"}
    header = ["layer"] + [f"{p}{suffix[kind]}" for kind, _, _ in panels for p in parts]
    layers = sorted({layer for _, table, _ in panels for layer in table})
    lines = [",".join(header)]
    lines += [",".join([str(layer)] + [f"{table.get(layer, {}).get(p, 0.0):.6g}"
                                       for _, table, _ in panels for p in parts])
              for layer in layers]
    (out / "layer_attribution.csv").write_text("\n".join(lines) + "\n")


PANEL_TEXT = {
    "attribution": ("mean share of the score", "Top {n} samples: share of each score per "
                    "sublayer (influence)"),
    "dependence": ("share losing more than\n95% of ordinary samples",
                   "Top {n} samples: reliance on each sublayer (ablation)")}


def _attribution_plot(panels, parts: list[str], out) -> None:
    layers = sorted({layer for _, table, _ in panels for layer in table})
    width = 0.8 / len(parts)
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(5.5, 0.5 * len(layers) + 2), 3.2 * len(panels)))
    for ax, (kind, table, n) in zip(axes[:, 0], panels):
        for i, part in enumerate(parts):
            ax.bar([x + (i - (len(parts) - 1) / 2) * width for x in range(len(layers))],
                   [table.get(layer, {}).get(part, 0.0) for layer in layers], width=width,
                   label=part)
        ax.axhline(0, color="black", linewidth=0.6)
        if kind == "dependence":  # what ordinary samples would show
            ax.axhline(1 - LEVEL, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("layer")
        ylabel, title = PANEL_TEXT[kind]
        ax.set_ylabel(ylabel)
        ax.set_title(title.format(n=n), fontsize=10)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "layer_attribution.png", dpi=110)
    plt.close(fig)


def _cell(text: str, limit: int = 160) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"


def run(ctx: StageContext) -> dict:
    """The plots, the top table and the per-sublayer attribution, from the numbers of the
    scores (their text only for the rows the table shows)."""
    label, selection = ctx.input("prepare").label_column(), ctx.input("select")
    table = selection.columns("id", "score", "rank", "set", *([label] if label else []))
    metrics = ctx.input("evaluate").metrics()
    label = label if label in table else ""
    out = ctx.output().root
    _score_distribution(table, out)
    if label:
        _pr_curve(table, label, metrics, out)
    _rates(metrics, out)
    _relearning(metrics, out)
    _top_table(table, label, selection, Judge(judge_config(ctx.cfg.judge)), out)
    return _attribution(selection, out)
