"""The recorder's buffer pool (:class:`Workspace`).

The recording kernels themselves live with their cell kinds (``CellKind.impl.record``, in
:mod:`gradflow.kinds`); they take their large buffers from ``sink.workspace`` when the recorder
has one (``gradflow.kinds._kernel.empty``).
"""

from __future__ import annotations

import math
import threading

import torch

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(t: torch.Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


class Workspace:
    """Large CPU buffers reused across the training steps of one open recorder.

    A fresh multi-MB tensor costs a page fault per 4 KiB page on first touch; at T=256, B=32,
    H=256 those faults were a third of the recording overhead. A block is handed out again only
    when nothing but the pool refers to its storage (no backward still to run has it saved, no
    caller, trace or view holds it), so reuse never aliases live data. Blocks are raw bytes, so a
    forward's gate buffer can serve the next backward's gradient buffers of another shape: the pool
    holds about the most bytes live at once, not the sum over shapes. Handed-out tensors share the
    storage without being autograd views, so callers may modify outputs in place as usual.
    """

    MIN_BYTES = 1 << 20
    MAX_BLOCKS = 32

    def __init__(self):
        self._blocks: list[tuple[torch.Tensor, int]] = []  # (uint8 block, its idle use count), by size
        self._lock = threading.Lock()

    def empty(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        shape = tuple(shape)
        nbytes = math.prod(shape) * like.element_size()
        if _storage_use_count is None or like.device.type != "cpu" or nbytes < self.MIN_BYTES:
            return like.new_empty(shape)
        with self._lock:
            for block, idle in self._blocks:  # smallest free block that fits, within 2x
                size = block.numel()
                if nbytes <= size <= 2 * nbytes and _use_count(block) == idle:
                    return _typed(block, shape, like.dtype)
            block = torch.empty(nbytes, dtype=torch.uint8)
            if len(self._blocks) >= self.MAX_BLOCKS:  # forget blocks held elsewhere (e.g. by kept traces)
                self._blocks = [(b, idle) for b, idle in self._blocks if _use_count(b) == idle]
            if len(self._blocks) < self.MAX_BLOCKS:
                self._blocks.append((block, _use_count(block)))
                self._blocks.sort(key=lambda e: e[0].numel())
            return _typed(block, shape, like.dtype)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b, _ in self._blocks)


def _typed(block: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(block.untyped_storage(), 0, shape)
