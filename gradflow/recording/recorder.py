"""``record()``: the context manager that owns every hook gradflow registers.

Each recurrent module is attached by the first adapter of the registry that matches it
(:mod:`gradflow.recording.adapters`): the ``forward`` of a sequence module (nn.RNN/LSTM/GRU and
gradflow's own layers) is replaced *on the instance* by a weight-sharing unroll, and each cell
module gets a forward hook. The adapters' handles are removed in ``finally`` on exit, even when the
forward or backward raised. Tensor hooks
live on the autograd graph built inside the context; they do nothing once the recorder is closed
and the handles still pending are removed on exit.

A trace is produced per backward pass: the first tensor hook reached by a backward pass queues a
callback on the autograd engine that runs when that pass ends and assembles a :class:`Trace` from
every call the pass reached. A trace covers the forward calls since the previous backward pass.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Callable, Iterable

import torch
from torch import nn

from .. import kinds
from ..errors import GradflowError, NoRecurrentModuleError, TraceError, UnsupportedModuleError
from ..trace import StateKey, Trace
from . import adapters as _adapters
from . import kernels as _kernels
from .calls import CellCall, FusedCall
from .copying import PlainState, hook_keys
from .cells import nearest

KEEPS = ("norms", "full", "states")
_LOOP_TAG = "gradflow.loop"  # key of the loop tag in autograd nodes' metadata (Recorder._cell_loop)
_LOOP_WALK = 64  # autograd nodes searched from a cell's state argument for the loop it continues


def _graph_task_id() -> int:
    get = getattr(torch._C, "_current_graph_task_id", None)
    return get() if get is not None else 0


def _find(model: nn.Module) -> list[tuple[str, nn.Module, _adapters.Adapter]]:
    found = []
    for path, m in model.named_modules():
        a = _adapters.adapter_for(m)
        if a is not None:
            found.append((path, m, a))
    return found


def find_recurrent(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """Every module gradflow can record: (dotted path, module, adapter name) with the adapter names
    of :mod:`gradflow.recording.adapters` (``fused | custom | cell``)."""
    return [(p, m, a.name) for p, m, a in _find(model)]


class Recorder:
    """Returned by :func:`record`. ``traces``: one :class:`Trace` per backward pass made inside the
    context; ``trace``: the latest."""

    def __init__(self, model: nn.Module, keep: str = "norms", modules=None, callback: Callable | None = None,
                 keep_traces: bool = True):
        if not isinstance(model, nn.Module):
            raise GradflowError(f"record() needs a torch.nn.Module, got {type(model).__name__}")
        if keep not in KEEPS:
            raise GradflowError(f"record(keep={keep!r}): keep must be one of {', '.join(KEEPS)}")
        if callback is not None and not callable(callback):
            raise GradflowError(
                f"record(callback=...): expected a callable taking a Trace, got {type(callback).__name__}")
        self.model = model
        self.keep = keep
        self.callback = callback
        self.keep_traces = keep_traces
        self.traces: list[Trace] = []
        self._targets = self._select(model, modules)
        self._active = False
        self._workspace: _kernels.Workspace | None = None  # buffers reused while the context is open
        self._handles: list = []
        self._reset_pass()
        self._calls: dict[str, int] = defaultdict(int)
        self._loops: dict[str, list[list]] = defaultdict(list)  # path -> [steps so far, state shapes] per loop
        self._token = object()  # marks this recorder's loop tags on autograd nodes
        self._generation = 0  # loop tags of earlier passes are stale
        self._pending: list = []

    # ------------------------------------------------------------------ selection
    @staticmethod
    def _select(model, modules):
        found = _find(model)
        if modules is None:
            if not found:
                raise NoRecurrentModuleError(
                    f"model {type(model).__name__} has no recurrent module gradflow can record "
                    "(nn.RNN/LSTM/GRU, nn.RNNCell/LSTMCell/GRUCell, a gradflow.kinds layer, or a cell registered "
                    "with gradflow.register_cell)"
                )
            return found
        by_path = {p: (p, m, a) for p, m, a in found}
        by_id = {id(m): (p, m, a) for p, m, a in found}
        names = dict(model.named_modules())
        out = []
        if isinstance(modules, (str, nn.Module)):
            modules = [modules]
        elif not isinstance(modules, Iterable) or isinstance(modules, (bytes, bytearray)):
            raise GradflowError(f"record(modules={_short(modules)}): expected a module path, a module or a list of "
                                f"them, got {type(modules).__name__}")
        for sel in list(modules):
            if isinstance(sel, str):
                if sel in by_path:
                    out.append(by_path[sel])
                elif sel in names:
                    raise UnsupportedModuleError(
                        f"module '{sel}' ({type(names[sel]).__name__}) is not a recurrent module gradflow can "
                        "record; register it with gradflow.register_cell if it is a cell"
                    )
                else:
                    raise GradflowError(f"record(modules=...): no module '{sel}' in the model{nearest(sel, names)}")
            elif isinstance(sel, nn.Module):
                if id(sel) in by_id:
                    out.append(by_id[id(sel)])
                else:
                    path = next((p for p, m in names.items() if m is sel), None)
                    what = f"module '{path}'" if path is not None else "the given module (not part of the model)"
                    raise UnsupportedModuleError(
                        f"{what} ({type(sel).__name__}) is not a recurrent module gradflow can record"
                    )
            else:
                raise GradflowError(f"record(modules=...): expected module paths or modules, got {type(sel).__name__}")
        return out

    # ------------------------------------------------------------------ attach / detach
    def __enter__(self) -> "Recorder":
        try:
            for path, m, adapter in self._targets:
                before = hook_keys(m)
                forward = m.__dict__.get("forward")
                self._handles.extend(adapter.attach(self, path, m))
                self._handles.append(PlainState(m, before, forward))
            self._workspace = _kernels.Workspace()
            self._active = True
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._detach()

    def _detach(self) -> None:
        self._active = False
        self._workspace = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for call in self._pending:
            for h in getattr(call, "handles", ()):
                h.remove()
        self._pending.clear()
        self._loops.clear()
        self._generation += 1

    # ------------------------------------------------------------------ bookkeeping (hot path)
    def _reset_pass(self) -> None:
        self._reached_calls: dict[int, object] = {}
        self._queued = None  # graph-task id of the backward pass whose end callback is queued

    def _cell_loop(self, path: str, prev, shapes: dict, aliases) -> tuple[int, int]:
        """(loop, step) of a cell call: a call continues the loop whose output its state argument was
        computed from (the same tensor, or through a few ops: scaling, dropout, a slice, ...) when the
        state shapes are the loop's; otherwise (no state, a fresh or detached one, another batch size)
        it starts a new loop. Loops are told apart by a tag on the autograd nodes of their outputs."""
        loops = self._loops[path]
        shape = tuple(shapes.items())
        idx = self._loop_of(path, prev)
        if idx is None or loops[idx][1] != shape:
            idx = len(loops)
            loops.append([0, shape])
        t = loops[idx][0]
        loops[idx][0] = t + 1
        tag = (self._token, self._generation, path, idx)
        for a in aliases:
            if a.grad_fn is not None:
                a.grad_fn.metadata[_LOOP_TAG] = tag
        return idx, t

    def _loop_of(self, path: str, prev) -> int | None:
        """The loop of this pass whose tagged output ``prev`` descends from, within _LOOP_WALK autograd nodes."""
        if not prev or not self._loops[path]:
            return None
        frontier = deque(p.grad_fn for p in prev if isinstance(p, torch.Tensor) and p.grad_fn is not None)
        visited = list(frontier)  # held, so that node ids stay unique during the walk
        seen = {id(n) for n in visited}
        while frontier and len(visited) <= _LOOP_WALK:
            node = frontier.popleft()
            tag = node.metadata.get(_LOOP_TAG)
            if tag is not None and tag[0] is self._token and tag[1] == self._generation and tag[2] == path:
                return tag[3]
            for nxt, _ in node.next_functions:
                if nxt is not None and id(nxt) not in seen:
                    seen.add(id(nxt))
                    visited.append(nxt)
                    frontier.append(nxt)
        return None

    def _next_call(self, path: str) -> int:
        c = self._calls[path]
        self._calls[path] = c + 1
        return c

    def _register_call(self, call: FusedCall | CellCall) -> None:
        self._pending.append(call)

    def _reached(self, call) -> None:
        task = _graph_task_id()
        if self._queued != task:
            # a new backward pass (a previous one that raised never ran its end callback: drop its data)
            self._reached_calls = {}
            self._queued = task
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_pass)
        self._reached_calls[id(call)] = call

    # ------------------------------------------------------------------ end of a backward pass
    def _finish_pass(self) -> None:
        reached = list(self._reached_calls.values())
        pending = self._pending
        self._reset_pass()
        self._calls.clear()
        self._loops.clear()
        self._generation += 1
        self._pending = []
        if not self._active or not reached:
            return
        # a loop this pass reached is recorded whole (its steps the pass did not reach have zero gradient);
        # loops it did not reach (forwards never backpropagated) are dropped
        cell_loops = {(c.path, c.loop) for c in reached if isinstance(c, CellCall)}
        seen = {id(c) for c in reached}
        calls = reached + [c for c in pending
                           if isinstance(c, CellCall) and (c.path, c.loop) in cell_loops and id(c) not in seen]
        order = list(dict.fromkeys(c.path for c in reached))  # modules in the order backward reached them
        trace = _assemble(calls, self.keep, meta={"pass": len(self.traces), "backward_order": order})
        if self.keep_traces:
            self.traces.append(trace)
        if self.callback is not None:
            self.callback(trace)

    @property
    def trace(self) -> Trace:
        if not self.traces:
            raise TraceError(
                "no backward pass has been recorded yet: call loss.backward() inside `with gradflow.record(model)`"
            )
        return self.traces[-1]


def _short(value, n: int = 40) -> str:
    r = repr(value)
    return r if len(r) <= n else r[: n - 3] + "..."


def record(model: nn.Module, keep: str = "norms", modules: Iterable | str | nn.Module | None = None, *,
           callback: Callable[[Trace], None] | None = None, keep_traces: bool = True) -> Recorder:
    """Record the total gradient dL/ds_t of every recurrent state at every timestep.

    ``with gradflow.record(model, keep="full") as rec: loss.backward()`` then ``rec.trace.grad(key)``
    is a [T, B, H] CPU tensor (time-major) of dL/ds_t, t the input position for both directions.

    keep: ``"norms"`` (only [T, B] norms survive the step), ``"full"`` (gradients too) or
    ``"states"`` (also inputs, states and parameters for the Jacobian analysis).
    modules: restrict to these module paths/modules (default: every recurrent module found).
    callback: called with each Trace as its backward pass ends; keep_traces=False then keeps none.
    Fused modules run as a weight-sharing unroll inside the context (same Parameters); outside it,
    and under ``torch.no_grad()``, they run their fused kernel.
    """
    return Recorder(model, keep=keep, modules=modules, callback=callback, keep_traces=keep_traces)


# ---------------------------------------------------------------------- assembling a Trace
def _stack_slots(slots, shape, like_dtype, device) -> torch.Tensor:
    zero = None
    out = []
    for g in slots:
        if g is None:
            if zero is None:
                zero = torch.zeros(shape, dtype=like_dtype, device=device)
            out.append(zero)
        else:
            out.append(g)
    return torch.stack(out)


def _assemble(calls: list, keep: str, meta: dict) -> Trace:
    trace = Trace(keep=keep, meta=meta)
    fused = sorted((c for c in calls if isinstance(c, FusedCall)), key=lambda c: (c.path, c.call))
    # number the calls of each fused module among those this backward pass reached
    seen: dict[str, int] = defaultdict(int)
    for c in fused:
        idx = seen[c.path]
        seen[c.path] = idx + 1
        for rec in c.units:
            rec.unit = rec.unit[:3] + (idx,)
    cell_calls: dict[tuple, list[CellCall]] = defaultdict(list)
    for c in calls:
        if isinstance(c, CellCall):
            cell_calls[(c.path, c.loop)].append(c)
    for call in fused:
        for rec in call.units:
            _add_fused_unit(trace, rec, keep)
    seen.clear()  # number the loops of each cell among those this backward pass reached, in loop order
    for (path, _), steps in sorted(cell_calls.items()):
        idx = seen[path]
        seen[path] = idx + 1
        _add_cell_unit(trace, path, idx, sorted(steps, key=lambda c: c.t), keep)
    order = {p: i for i, p in enumerate(dict.fromkeys([c.path for c in fused] + sorted(p for p, _ in cell_calls)))}
    trace.order_keys(lambda k: (order.get(k.module, 0), k.call, k.layer, k.direction, k.state != "h"))
    return trace


def _dtype_device(slots, fallback):
    for g in slots:
        if g is not None:
            return g.dtype, g.device
    return fallback


def _add_fused_unit(trace: Trace, rec, keep: str) -> None:
    T = rec.T
    B = rec.shapes["h"][0]
    mask = rec.mask if rec.mask is not None else torch.ones(T, B, dtype=torch.bool)
    order = rec.order

    def reorder(x):
        return x if order is None else x.index_select(1, order.to(x.device))

    trace.add_unit(rec.unit, rec.cell, reorder(mask), inputs=None if rec.inputs is None else reorder(rec.inputs),
                   params=rec.params if keep == "states" else None)
    fallback = rec.dtype_device
    for name in rec.cell.states:
        g = rec.grads.get(name)
        if g is None:
            g = torch.zeros((T,) + rec.shapes[name], dtype=fallback[0], device=fallback[1])
        if rec.mask is not None:
            g = g.masked_fill(~rec.mask.to(g.device).unsqueeze(-1), float("nan"))
        key = StateKey(rec.unit[0], rec.unit[1], rec.unit[2], name, rec.unit[3])
        kw = {}
        if keep == "states":
            kw = {"state": reorder(rec.states[name]), "prev": reorder(rec.prev[name])}
        trace.add_state(key, reorder(g), **kw)


def _add_cell_unit(trace: Trace, path: str, call: int, steps: list[CellCall], keep: str) -> None:
    """``steps``: every step of one loop over the cell (one state shape), in step order (t = 0..T-1);
    steps this pass did not reach carry zero gradient. The loop is the key's ``call``."""
    first = steps[0]
    T = len(steps)
    B = first.shapes[first.cell.states[0]][0]
    unit = (path, 0, 0, call)
    states_kept = keep == "states"
    inputs = params = None
    if states_kept:
        if all(s.inputs is not None for s in steps):
            inputs = torch.stack([s.inputs for s in steps])
        params = first.spec.params(first.module)
    live = kinds.get(first.cell.kind).impl.needs_step  # a user cell keeps its module and step function
    trace.add_unit(unit, first.cell, torch.ones(T, B, dtype=torch.bool), inputs=inputs, params=params,
                   module=first.module if live else None, step=first.step if live else None)
    for name in first.cell.states:
        shape = (B, first.shapes[name][-1])
        slots = [s.slots.get(name) for s in steps]
        dtype, device = _dtype_device(slots, first.dtype_device)
        g = _stack_slots([x.reshape(shape) if x is not None else None for x in slots], shape, dtype, device)
        kw = {}
        if states_kept:
            kw = {"state": torch.stack([s.states[name] for s in steps]),
                  "prev": torch.stack([s.prev[name] for s in steps])}
        trace.add_state(StateKey(path, 0, 0, name, call), g, **kw)
