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


def allreduce_sum(tensors: Tensors, device: str = "cpu") -> Tensors:
    """Sum every tensor across workers, in one flat float64 buffer (gloo on CPU, NCCL on GPU).

    Keys are sorted so every worker packs the buffer in the same order. Every worker ends with
    the same sums.
    """
    _, size = world()
    if size == 1:
        return tensors
    keys = sorted(tensors)
    flat = torch.cat([tensors[k].double().flatten() for k in keys]).to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, offset = {}, 0
    flat = flat.cpu()
    for key in keys:
        n = tensors[key].numel()
        out[key] = flat[offset:offset + n].reshape(tensors[key].shape)
        offset += n
    return out
