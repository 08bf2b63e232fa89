"""The short closing summary printed after a run."""

from __future__ import annotations

from pipeline.config import LancetConf


def _fmt(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def summary(cfg: LancetConf, out: dict) -> str:
    r = {k: v for stage in out["results"].values() for k, v in stage.items()}
    cached = [name for name, s in out["results"].items() if s.get("cached")]
    lines = ["", "LANCET summary",
             f"  output:              {cfg.output_dir}",
             f"  cache:               {cfg.cache_dir}"]
    if "detect/auprc" in r:
        lines.append(f"  recall AUPRC:        {_fmt(r['detect/auprc'])} "
                     f"(recall@k {_fmt(r.get('detect/recall_at_k'))})")
    for label, key in (("undesirable, seen", "behavior/undesirable_rate"),
                       ("undesirable, unseen", "behavior/undesirable_rate_unseen"),
                       ("refusals (clean)", "behavior/overrefusal_rate"),
                       ("perplexity (clean)", "utility/ppl"),
                       ("distinct-2", "utility/distinct2")):
        if f"{key}_before" in r:
            lines.append(f"  {label + ':':<21}{_fmt(r[f'{key}_before'])} -> "
                         f"{_fmt(r.get(f'{key}_after'))}")
    relearned = sorted((int(k.split("_")[1]), v) for k, v in r.items()
                       if k.startswith("robustness/relearn_") and k.endswith("_undesirable_rate"))
    if relearned:
        lines.append("  relearned, seen:     " + ", ".join(f"{_fmt(v)} after {k} steps"
                                                        for k, v in relearned))
    if "select/n_positive" in r:
        lines.append(f"  influence sets:      {r['select/n_positive']} positive, "
                     f"{r['select/n_negative']} negative, {r['select/n_neutral']} neutral")
    if "detect/positive_judged_share" in r:
        negative = r.get("detect/negative_judged_share")
        lines.append(f"  judge on the sets:   {_fmt(r['detect/positive_judged_share'])} of "
                     f"{r['detect/positive_judged_rows']} positive samples flagged"
                     + (f", {_fmt(negative)} of negative" if negative is not None else "")
                     + " (their own responses)")
    if cached:
        lines.append(f"  reused from cache:   {', '.join(cached)}")
    uri = out["tracking_uri"]
    if out["run_id"] is None:  # nothing was logged: no run to point at
        why = "no run was logged" if cfg.mlflow.enabled else "off (mlflow.enabled=false)"
        lines.append(f"  MLflow:              {why}")
        return "\n".join(lines)
    lines.append(f"  MLflow runs:         {uri} (run {out['run_id']})")
    if uri.startswith("sqlite:"):
        lines.append(f"  open the UI:         mlflow ui --backend-store-uri {uri} --host 127.0.0.1")
    return "\n".join(lines)
