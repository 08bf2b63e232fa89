"""LinFAC's cost against the project's own EK-FAC and K-FAC: fit + precondition + score, the
same code, model and data, on a model wide enough (d ≥ 512) for the curvature to cost.

``python -m bench.cost`` writes its own section of bench/RESULTS.md (kept by ``make bench``).
Unlike a comparison with kronfluence's wall time (which includes its disk I/O), every method
here runs the same passes of ``operators/`` in one process, one after the other, in one run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bench import gpu
from operators.curvature import fit_curvature
from operators.scores import InfluenceConfig, precondition_queries, score_batch, units_for

BEGIN, END = "<!-- cost section: python -m bench.cost -->", "<!-- end of cost section -->"
METHODS = ("linfac", "ekfac", "kfac")


def model_of(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=width, intermediate_size=int(2.75 * width),
                         num_hidden_layers=layers, num_attention_heads=max(width // 64, 1),
                         num_key_value_heads=max(width // 64, 1), max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()


def batch_of(rows: int, tokens: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (rows, tokens), generator=g)
    mask = torch.ones_like(ids)
    loss = mask.clone()
    loss[:, : tokens // 2] = 0  # the response is the second half
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss,
            "prompt_last": torch.full((rows,), tokens // 2 - 1),
            "sample_seed": torch.arange(rows, dtype=torch.int64) + seed * 1000}


def measure(method: str, model, train: list, queries: list) -> dict:
    config = InfluenceConfig(method=method)
    units = units_for(model, config)
    began = time.perf_counter()
    curvature = fit_curvature(model, units, train, corrected=config.kind.eigen_correction,
                              logodds_cap=config.logodds_cap)
    fitted = time.perf_counter()
    features = precondition_queries(model, units, queries, config, curvature)
    for batch in train:
        score_batch(model, units, batch, features, config)
    done = time.perf_counter()
    floats = sum(e.qa.numel() + e.qs.numel() for e in curvature.eigens.values())
    return {"method": method, "units": len(units), "fit_s": fitted - began,
            "precondition+score_s": done - fitted, "total_s": done - began,
            "eigenbasis_floats_M": floats / 1e6}


def run(width: int, layers: int, rows: int, tokens: int) -> list[dict]:
    model = model_of(width, layers)
    train = [batch_of(8, tokens, seed) for seed in range(rows // 8)]
    queries = [batch_of(4, tokens, 999)]
    results = [measure(m, model, train, queries) for m in METHODS]
    ekfac = next(r for r in results if r["method"] == "ekfac")
    for r in results:
        r["total ÷ ekfac"] = r["total_s"] / ekfac["total_s"]
    return results


def render(rows: list[dict], args) -> str:
    header = "\n".join([
        f"## LinFAC's cost vs the project's own EK-FAC and K-FAC (d={args.width})", "",
        f"Command: `python -m bench.cost --width {args.width} --layers {args.layers} "
        f"--rows {args.rows} --tokens {args.tokens}`  ",
        f"Machine: {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}  ",
        "Same model (Llama-shaped, float32), data and passes; methods run one after the other in "
        "one process."])
    return gpu.render(rows, header)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    text = render(run(args.width, args.layers, args.rows, args.tokens), args)
    print(text)
    gpu.write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
