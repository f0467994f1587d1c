"""Shared helpers of the analysis package: argument checks and reading a unit out of a Trace.

Index conventions used throughout ``gradflow.analysis``:

* **position order** ``t`` is the position in the input sequence (as in :class:`~gradflow.Trace`);
* **step order** ``k`` is the order in which the recurrence runs: ``k = t`` for direction 0 and
  ``k = T-1-t`` for direction 1. Products, Lyapunov exponents and adjoint recursions work in step
  order; the trace-level wrappers convert with :func:`to_steps` (a flip along T for direction 1).
* The **joint state** of a unit is the concatenation of its states in ``CellInfo.states`` order:
  ``[h; c]`` for an LSTM (sizes P and H, P = proj_size or H), ``[h]`` for RNN/GRU.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

from .. import kinds
from ..errors import GradflowError, TraceError
from ..trace import CellInfo, StateKey, Trace, _as_key


def state_layout(cell: CellInfo) -> list[tuple[str, int, int]]:
    """[(state name, start, stop)] of each state inside the joint state vector (sizes from
    ``cell.state_sizes``, else the kind's defaults for the cell's hidden and projection sizes)."""
    sizes = dict(cell.state_sizes)
    kind = kinds.get(cell.kind)
    if kind.states:
        sizes = {**kind.impl.state_sizes(cell.hidden_size, cell.proj_size), **sizes}
    else:
        sizes.setdefault("h", cell.hidden_size)
    out, start = [], 0
    for name in cell.states:
        if name not in sizes:
            raise GradflowError(f"CellInfo(kind={cell.kind!r}): state {name!r} has no size in state_sizes")
        out.append((name, start, start + int(sizes[name])))
        start += int(sizes[name])
    return out


def joint_size(cell: CellInfo) -> int:
    return state_layout(cell)[-1][2]


def state_slice(cell: CellInfo, state: str) -> slice:
    for name, a, b in state_layout(cell):
        if name == state:
            return slice(a, b)
    raise GradflowError(f"cell {cell.kind!r} has no state {state!r} (states: {', '.join(cell.states)})")


def resolve(trace: Trace, key) -> StateKey:
    """Check ``key`` exists in ``trace`` (one-line TraceError otherwise) and return it as a StateKey."""
    if not isinstance(trace, Trace):
        raise GradflowError(f"expected a gradflow.Trace, got {type(trace).__name__}")
    k = _as_key(key)
    trace.norm(k)  # raises TraceError naming the key and what was recorded
    return k


def unit_keys(trace: Trace, key: StateKey) -> list[StateKey]:
    """The keys of every state of ``key``'s unit, in ``CellInfo.states`` order."""
    cell = trace.cell(key)
    keys = [key.with_state(s) for s in cell.states]
    for k in keys:
        if k not in trace:
            raise TraceError(f"{key}: the trace lacks state {k.state!r} of this {cell.kind} unit (needs {k})")
    return keys


def unit_data(trace: Trace, key: StateKey):
    """(cell, params, x [T, B, F], prev tuple of [T, B, S_i], mask [T, B]) of ``key``'s unit.

    Raises TraceError (one line, says to record with keep='states') when the trace lacks states."""
    k = resolve(trace, key)
    cell = trace.cell(k)
    keys = unit_keys(trace, k)
    prev = tuple(trace.prev_states(kk) for kk in keys)
    x = trace.inputs(k)
    params = trace.params(k)
    return cell, params, x, prev, trace.mask(k)


def to_steps(a: torch.Tensor, direction: int) -> torch.Tensor:
    """Position order -> step order along dim 0 (a flip for direction 1); its own inverse."""
    return a.flip(0) if direction == 1 else a


def check_square(J: torch.Tensor, fn: str) -> torch.Tensor:
    if not isinstance(J, torch.Tensor):
        raise GradflowError(f"{fn}: expected a torch.Tensor of Jacobians [..., S, S], got {type(J).__name__}")
    if J.ndim < 2 or J.shape[-1] != J.shape[-2]:
        raise GradflowError(f"{fn}: expected square Jacobians [..., S, S], got shape {tuple(J.shape)}")
    if not (J.is_floating_point() or J.is_complex()):
        raise GradflowError(f"{fn}: expected a floating-point tensor, got dtype {J.dtype}")
    return J


def check_finite(J: torch.Tensor, fn: str, lead: str = "index") -> None:
    """One-line GradflowError locating the first non-finite entry of J [..., S, S]."""
    bad = ~torch.isfinite(J)
    if bool(bad.any()):
        per = bad.flatten(-2).any(-1)
        idx = tuple(int(i) for i in per.nonzero()[0]) if per.ndim else ()
        raise GradflowError(
            f"{fn}: {int(per.sum())} Jacobian(s) contain NaN/Inf (first at {lead} {idx}); locate them with "
            f"trace.nonfinite() and drop those steps, or pass on_nonfinite='nan'"
        )


def check_steps(J: torch.Tensor, fn: str) -> torch.Tensor:
    """J must be [T, B, S, S]."""
    check_square(J, fn)
    if J.ndim != 4:
        raise GradflowError(f"{fn}: expected Jacobians [T, B, S, S], got shape {tuple(J.shape)}")
    return J


def check_mask(mask, T: int, B: int, fn: str):
    """None, or a [T, B] bool tensor (one-line GradflowError otherwise)."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask)
    if tuple(mask.shape) != (T, B):
        raise GradflowError(f"{fn}: mask must be [T, B] = {(T, B)}, got shape {tuple(mask.shape)}")
    return mask.to(torch.bool)


def positive_int(value, name: str, fn: str, *, allow_zero: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise GradflowError(f"{fn}: {name}={value!r} must be a {'non-negative' if allow_zero else 'positive'} int")
    return int(value)


def fraction_in_01(value, name: str, fn: str) -> float:
    if not isinstance(value, (int, float)) or not (0 < float(value) < 1) or math.isnan(float(value)):
        raise GradflowError(f"{fn}: {name}={value!r} must be a number strictly between 0 and 1")
    return float(value)


@contextmanager
def intra_op_threads(n: int = 1):
    """Run torch ops with ``n`` intra-op threads, restoring the setting afterwards. Sequential sweeps
    of small GEMMs (adjoint, QR propagation) gain nothing from intra-op threads and lose badly when
    the cores are shared; batched LAPACK work is parallelised by our own thread pool instead."""
    old = torch.get_num_threads()
    if old == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def single_threaded(fn):
    """Decorator: run ``fn`` under :func:`intra_op_threads` (1)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with intra_op_threads(1):
            return fn(*args, **kwargs)

    return wrapper


def row_quantiles(rows: np.ndarray, qs) -> np.ndarray:
    """Linear quantiles ``qs`` of each row of ``rows`` [D, n] ignoring NaN, by one sort (about 5×
    faster than ``np.nanquantile`` on [500, 8192]); -inf sorts first and a quantile touching it is
    -inf. -> [D, len(qs)] (NaN for an empty row)."""
    v = np.sort(rows, axis=1)  # NaN last, -inf first
    n = np.sum(~np.isnan(v), axis=1)
    out = np.full((v.shape[0], len(qs)), np.nan)
    r = np.arange(v.shape[0])
    for j, q in enumerate(qs):
        pos = q * np.maximum(n - 1, 0)
        lo, hi = np.floor(pos).astype(int), np.ceil(pos).astype(int)
        a, b = v[r, lo], v[r, hi]
        with np.errstate(invalid="ignore"):
            val = np.where(np.isneginf(a), -np.inf, a + (b - a) * (pos - lo))
        out[:, j] = np.where(n > 0, val, np.nan)
    return out
