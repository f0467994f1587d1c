"""Locate the first NaN/Inf that a backward pass produced in a recorded :class:`~gradflow.trace.Trace`.

"First" means earliest reached by the backward pass, which runs against the forward order:

* across recurrent modules, the module nearest the loss first (``order``, see below);
* within a module, later calls first, and the top layer first (layer l's δ feeds layer l-1);
* within a unit, in processing order of the backward recursion: direction 0 runs t = T-1, ..., 0
  (the largest t is reached first), direction 1 runs t = 0, ..., T-1. Between directions of the same
  layer, the position reached after fewer backward steps comes first (ties: direction 0);
* at the same position, ``h`` before ``c`` (δc_t is the gradient through step t+1 and
  excludes the same-step path, so a fault injected at ∂L/∂h_t shows up in h_t first).

Masked steps (past a packed sequence's length) are NaN by convention and never reported.

The order of several recurrent modules is not recorded in a trace (its keys are sorted by module
path). Pass ``order``: module paths nearest-the-loss first, or the model itself, whose modules are
then taken in reverse registration order (``reversed(model.named_modules())``), which is the
backward order for models that register submodules in the order they call them. Without ``order``
modules keep the trace's key order; a model with one recurrent module is unaffected.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ..trace import Trace

__all__ = ["first_nonfinite", "nonfinite_count"]


def _module_rank(trace: Trace, order) -> dict[str, int]:
    if order is None:  # the order the backward pass reached the modules, when the recorder noted it
        paths = [str(p) for p in trace.meta.get("backward_order", ())] or list(
            dict.fromkeys(k.module for k in trace.keys()))
    elif isinstance(order, torch.nn.Module):
        paths = [p for p, _ in reversed(list(order.named_modules()))]
    else:
        paths = [str(p) for p in order]
    rank = {p: i for i, p in enumerate(paths)}
    # modules not named in ``order`` go last, in key order
    for k in trace.keys():
        rank.setdefault(k.module, len(rank))
    return rank


def nonfinite_count(trace: Trace) -> int:
    """Number of (key, t, b) entries with a NaN/Inf gradient norm at a valid step."""
    return int(sum(int(((~torch.isfinite(trace.norm(k))) & trace.mask(k)).sum()) for k in trace.keys()))


def first_nonfinite(trace: Trace, order: Iterable[str] | torch.nn.Module | None = None) -> dict | None:
    """The first NaN/Inf in ``trace`` in backward order (module docstring), or None if every valid
    norm is finite.

    Returns ``{"key", "module", "layer", "direction", "state", "call", "t", "b", "batch_items",
    "value", "backward_index", "count", "step"}``: ``t`` the input position (time-major index),
    ``b`` the first affected batch item and ``batch_items`` all items non-finite at that (key, t),
    ``value`` the norm there (``inf`` or ``nan``), ``backward_index`` how many backward steps of the
    unit precede t (``T-1-t`` for direction 0, ``t`` for direction 1), ``count`` all non-finite
    entries in the trace, ``step`` the training step from ``trace.meta`` (None if not set).
    """
    rank = _module_rank(trace, order)
    best, best_rank = None, None
    for key in trace.keys():
        n = trace.norm(key)
        bad = (~torch.isfinite(n)) & trace.mask(key)
        if not bool(bad.any()):
            continue
        rows = bad.any(dim=1).nonzero().flatten()
        T = n.shape[0]
        t = int(rows.max()) if key.direction == 0 else int(rows.min())
        idx = T - 1 - t if key.direction == 0 else t
        r = (rank[key.module], -key.call, -key.layer, idx, key.direction, key.state != "h", key.state)
        if best_rank is None or r < best_rank:
            items = bad[t].nonzero().flatten().tolist()
            best_rank = r
            best = {"key": str(key), "module": key.module, "layer": key.layer, "direction": key.direction,
                    "state": key.state, "call": key.call, "t": t, "b": items[0], "batch_items": items,
                    "value": float(n[t, items[0]]), "backward_index": idx}
    if best is None:
        return None
    best["count"] = nonfinite_count(trace)
    best["step"] = trace.meta.get("step")
    return best
