"""The one all-reduce: sums of factor statistics across the workers of a Ray Train group."""

from __future__ import annotations

import torch
import torch.distributed as dist

Tensors = dict[str, torch.Tensor]


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def allreduce_sum(tensors: Tensors, device: str | torch.device = "cpu") -> Tensors:
    """Sum every tensor across workers; every worker ends with the same sums, on ``device``.

    One collective per group of keys sharing a unit prefix (``"<unit>/…"``), each in its own
    dtype on ``device`` (gloo on CPU, NCCL on GPU): no buffer holds every unit at once, and
    statistics stay where the eigendecomposition and the next pass use them. Keys are sorted so
    every worker issues the collectives in the same order.
    """
    _, size = world()
    out = {k: v.to(device) for k, v in tensors.items()}
    if size == 1:
        return out
    for keys in _groups(sorted(out)):
        for dtype in sorted({str(out[k].dtype) for k in keys}):
            same = [k for k in keys if str(out[k].dtype) == dtype]
            flat = torch.cat([out[k].flatten() for k in same])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for key in same:
                n = out[key].numel()
                out[key] = flat[offset:offset + n].reshape(out[key].shape)
                offset += n
    return out


def _groups(keys: list[str]) -> list[list[str]]:
    """Keys grouped by unit prefix (the text before the last ``/``), in sorted order."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.rsplit("/", 1)[0], []).append(key)
    return list(groups.values())
