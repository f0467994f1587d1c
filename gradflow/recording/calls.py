"""Per-forward-call bookkeeping shared by the adapters.

A *call* is what one forward invocation produced: for a fused module, every unit (layer ×
direction) over the whole sequence, whose kernels hand δ_t over in their backward; for a cell, one
timestep, whose state tensors carry hooks that store the gradient they receive. Either way the
recorder is told the call was reached by the running backward pass. The recorder turns the reached calls into a Trace when the
backward pass ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..trace import CellInfo


@dataclass
class UnitRecord:
    """One recurrence of a fused call: grads[state] receives dL/ds_t [T, B, S] from the kernel's
    backward.

    Tensors are in the unroll's batch order (sorted for PackedSequence); ``order`` maps them back
    to the caller's order (None = identity). ``states``/``prev``/``inputs`` are filled for
    keep='states' only; ``mask`` is [T, B] bool (None = all valid)."""

    unit: tuple
    cell: CellInfo
    T: int
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    states: dict[str, torch.Tensor] = field(default_factory=dict)
    prev: dict[str, torch.Tensor] = field(default_factory=dict)
    inputs: torch.Tensor | None = None
    params: dict[str, torch.Tensor] | None = None
    mask: torch.Tensor | None = None
    order: torch.Tensor | None = None
    shapes: dict[str, tuple] = field(default_factory=dict)  # state -> (B, S)
    dtype_device: tuple = (torch.float32, torch.device("cpu"))


@dataclass
class FusedCall:
    """All units of one forward call of a fused nn.RNN/LSTM/GRU."""

    path: str
    call: int
    units: list[UnitRecord]


@dataclass
class CellCall:
    """One timestep of a cell module called in a Python loop: step ``t`` of the cell's loop ``loop``."""

    path: str
    t: int
    cell: CellInfo
    slots: dict[str, Any]
    shapes: dict[str, tuple]
    states: dict[str, torch.Tensor] | None = None
    prev: dict[str, torch.Tensor] | None = None
    inputs: torch.Tensor | None = None
    module: torch.nn.Module | None = None
    step: Callable | None = None
    handles: list = field(default_factory=list)
    spec: Any = None  # the CellSpec that read this call
    loop: int = 0  # which loop over the cell since the previous backward pass (Recorder._cell_loop)
    dtype_device: tuple = (torch.float32, torch.device("cpu"))  # of the states (for steps no gradient reached)


def recordable(*tensors) -> bool:
    """Whether a call on these tensors has values to record: none is empty (a batch or a sequence of
    size 0) or on the meta device (shapes without values). Other calls run as plain torch, unrecorded."""
    for x in tensors:
        x = getattr(x, "data", x) if not isinstance(x, torch.Tensor) else x  # PackedSequence -> its data
        if isinstance(x, torch.Tensor) and (x.is_meta or x.numel() == 0):
            return False
    return True


def store_hook(recorder, call, slots, index) -> Callable:
    """A tensor hook that stores the incoming gradient in ``slots[index]`` (no compute on the hot
    path) and marks ``call`` as reached by the current backward pass."""

    def hook(grad: torch.Tensor):
        if recorder._active:
            slots[index] = grad
            recorder._reached(call)
        return None

    return hook
