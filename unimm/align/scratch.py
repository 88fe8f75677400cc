"""Reused working memory for the all-pairs kernels when no gradient is kept.

On a CPU, a tensor of tens of MiB is a fresh ``mmap`` each time it is allocated, and touching it
for the first time costs a page fault per 4 KiB: for the targets of one training step (256 views ×
16 slices) that was a third of the time. Buffers that live only inside one call (the Gram
blocks, the pair-last distances, the padded local kernels) are therefore kept per thread, device
and dtype and handed out again (on the CPU only); at most :data:`KEPT_BYTES` per buffer is kept
(a larger request is allocated and freed as before). A buffer's contents are garbage: every
caller writes what it reads.
"""

from __future__ import annotations

import math
import threading

import torch

KEPT_BYTES = 1 << 28
_LOCAL = threading.local()


def scratch(slot: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, from buffer ``slot``
    (two live tensors must use two slots). Off the CPU a plain allocation: CUDA's caching
    allocator already reuses its blocks."""
    if like.device.type != "cpu":
        return like.new_empty(shape)
    kept = getattr(_LOCAL, "buffers", None)
    if kept is None:
        kept = _LOCAL.buffers = {}
    numel = math.prod(shape)
    key = (slot, like.device, like.dtype)
    buffer = kept.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = like.new_empty(numel)
        if numel * like.element_size() <= KEPT_BYTES:
            kept[key] = buffer
    return buffer[:numel].view(shape)
