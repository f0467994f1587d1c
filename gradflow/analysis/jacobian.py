"""Per-step recurrent Jacobians of a recorded unit.

``J[t] = ∂s_t/∂s_prev(t)`` with s the joint state of the unit (``[h; c]`` for an LSTM, sizes P and
H with P = proj_size or H; ``h`` otherwise) and prev(t) = t-1 for direction 0, t+1 for direction 1
(the trace's ``prev_states``). Rows index s_t, columns index s_prev(t). Indexed by *position* t,
like the trace. Steps that do not exist for a sequence (``trace.mask`` False) are the identity.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..trace import CellInfo, Trace
from . import _util
from .linear import Linearization, linearize

__all__ = ["jacobians", "cell_jacobians", "linearize_trace", "joint_gradient"]


def cell_jacobians(cell: CellInfo, params: Mapping[str, torch.Tensor] | None, x: torch.Tensor, prev: tuple, *,
                   mask: torch.Tensor | None = None, step: Callable | None = None, dtype=None) -> torch.Tensor:
    """Jacobians of every step at once from the cell description, its parameters, the inputs
    x [T, B, F] and the states fed into each step ``prev`` (tuple in ``cell.states`` order, each
    [T, B, S_i]). The closed form of the cell's kind (``gradflow.kinds``) — no loop over time;
    ``torch.func.jacrev`` of ``step(x_t [B, F], states) -> states`` for user cells.
    Returns [T, B, S, S] in ``dtype`` (default: the promoted dtype of the inputs)."""
    return linearize(cell, params, x, tuple(prev), mask=mask, step=step, dtype=dtype).dense()


def linearize_trace(trace: Trace, key, *, dtype=None) -> Linearization:
    """The factored per-step linearization of ``key``'s unit (position order; see :class:`Linearization`).
    Needs a trace recorded with ``keep='states'``; custom cells need the live step function."""
    k = _util.resolve(trace, key)
    cell, params, x, prev, mask = _util.unit_data(trace, k)
    return linearize(cell, params, x, prev, mask=mask, step=trace.step_function(k), dtype=dtype)


def jacobians(trace: Trace, key, *, dtype=None) -> torch.Tensor:
    """[T, B, S, S] per-step Jacobians of the joint state of ``key``'s unit (for an LSTM the joint
    ``[h; c]``, whichever of its keys is passed), in position order. Identity at masked steps."""
    return linearize_trace(trace, key, dtype=dtype).dense()


def joint_gradient(trace: Trace, key, *, dtype=None) -> torch.Tensor:
    """[T, B, S] total derivative dL/ds_t of the joint state (the trace's per-state gradients
    concatenated in ``cell.states`` order); NaN where masked, as recorded."""
    k = _util.resolve(trace, key)
    parts = [trace.grad(kk) for kk in _util.unit_keys(trace, k)]
    out = torch.cat(parts, -1)
    return out.to(dtype) if dtype is not None else out
