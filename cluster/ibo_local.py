"""The correction job's steps in this process, for benchmarks that sweep hundreds of tiny runs.

A Ray Train + DeepSpeed job costs about 20 s of fixed time on a 2-core machine against well
under a second of training for the tiny models of ``bench.correction_suite``. This runs the
same ``train_steps`` loop, the same frozen reference and the same policy as one worker of the
job, with the optimizer DeepSpeed wraps (torch AdamW) and its gradient clipping (the DeepSpeed
JSON's ``gradient_clipping``) applied by hand: ZeRO stage 0 on one worker computes the same
update. ``tests/test_ibo_job.py`` checks it against the job.
"""

from __future__ import annotations

import torch

from cluster.deepspeed_strategy import read_ds_config
from cluster.ibo_job import IBOSpec, _policy, _reference, train_steps
from cluster.model_io import load_tokenizer


def correct_in_process(spec: IBOSpec, rows: dict[str, list[dict]], device: str = "cpu"):
    """(corrected model, tokenizer, per-step metrics) of ``spec`` on ``rows`` (dataset name →
    rows, as one worker of the job reads them)."""
    tokenizer = load_tokenizer(spec.model_path, spec.trust_remote_code)
    ref = _reference(spec, tokenizer, rows, device)
    model = _policy(spec, device, spec.dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    clip = float(read_ds_config(spec.deepspeed_config).get("gradient_clipping", 0.0))

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()

    curve = train_steps(model, update, tokenizer, ref, rows, spec, device)
    return model, tokenizer, curve
