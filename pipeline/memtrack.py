"""Live tensor bytes and their peak, counted at the dispatcher (real or fake tensors alike).

``LiveBytes`` sees every tensor an operator returns, counts its storage once, and uncounts it
when the storage is freed (a weak reference). On real tensors it measures what the code
allocates (the CPU has no ``max_memory_allocated``); under ``FakeTensorMode`` it measures the
same code at a size that could not be allocated here (a 7B model), which is how the memory
plan is computed. Storage that existed before (weights) is added with ``track``.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary


class LiveBytes(TorchDispatchMode):
    """A dispatch mode counting live tensor storage; ``peak`` is the high-water mark (bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()

    def track(self, tensors) -> LiveBytes:
        """Count tensors that already exist (a model's weights, a cached input)."""
        for tensor in tensors:
            self._count(tensor)
        return self

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._count(leaf)
        return out

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live -= size
