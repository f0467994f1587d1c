"""Trace and StateKey: what one backward pass recorded, as plain CPU tensors.

Conventions (fixed; analysis, training and reports rely on them):

* A **unit** is one recurrence: (module path, layer, direction, call). A fused ``nn.LSTM`` with 2
  layers, bidirectional, called once, has 4 units; a cell module called in a Python loop has one
  unit (its calls are the timesteps).
* A :class:`StateKey` is a unit plus a state name: ``"h"`` for every cell, ``"c"`` also for LSTM.
* Every tensor is **time-major** ``[T, B, ...]`` whatever the module's ``batch_first``; index ``t``
  is the position in the input sequence for both directions (as in the module's output), ``b`` is
  the batch index in the caller's order (PackedSequence sorting is undone).
* ``grad(key)[t, b]`` is the **total** derivative dL/ds_t of the state ``s_t`` with the full state
  (h, and c for LSTM) as independent coordinates: ``δ_t = ∂L/∂out_t + J_{t+1}ᵀ δ_{t+1}``. For an LSTM
  the c-block excludes the same-step path through ``h_t = o_t·tanh(c_t)``.
* ``mask(key)[t, b]`` is False where step t does not exist for sequence b (past its length in a
  PackedSequence). Gradients there are NaN in ``grad`` and ``norm``; they are *missing*, not zero.
* With ``keep="states"`` the trace also holds, per key, the state values ``s_t`` and the state fed
  into step t (``prev_states``; for direction 1 that is the state at t+1, since the reverse
  direction processes positions T-1, ..., 0), per unit the layer input ``x_t``, the cell description
  and a detached copy of its parameters — everything needed to recompute the per-step Jacobians
  without the model. At masked steps the state is carried unchanged (its Jacobian is the identity).

Saved traces are a directory of ``trace.json`` (schema, keys, cells, meta), ``norms.csv`` (tidy:
one row per key × t × b) and ``arrays.npz`` (loaded with ``allow_pickle=False``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from . import _io
from .errors import TraceError

__all__ = ["StateKey", "CellInfo", "Trace"]

_KEY_RE = re.compile(r"^(?P<module>.*)/l(?P<layer>\d+)/d(?P<direction>[01])/(?P<state>\w+)(?:/call(?P<call>\d+))?$")


@dataclass(frozen=True, order=True)
class StateKey:
    """Identifies one recorded state: ``module`` is the dotted path from ``model.named_modules()``
    (``""`` for the root), ``layer`` and ``direction`` (0 forward, 1 reverse) index the recurrence
    inside a fused module, ``state`` is ``"h"`` or ``"c"``, ``call`` counts calls of the same fused
    module within one backward pass (0 for the first)."""

    module: str
    layer: int = 0
    direction: int = 0
    state: str = "h"
    call: int = 0

    @property
    def unit(self) -> tuple[str, int, int, int]:
        return (self.module, self.layer, self.direction, self.call)

    def with_state(self, state: str) -> "StateKey":
        return StateKey(self.module, self.layer, self.direction, state, self.call)

    def __str__(self) -> str:
        s = f"{self.module or '<root>'}/l{self.layer}/d{self.direction}/{self.state}"
        return s + (f"/call{self.call}" if self.call else "")

    @classmethod
    def parse(cls, text: str) -> "StateKey":
        m = _KEY_RE.match(text)
        if not m:
            raise TraceError(f"cannot parse state key {text!r}: expected MODULE/lLAYER/dDIR/STATE, e.g. 'rnn/l0/d0/h'")
        module = m["module"]
        return cls(
            "" if module == "<root>" else module,
            int(m["layer"]),
            int(m["direction"]),
            m["state"],
            int(m["call"] or 0),
        )


@dataclass(frozen=True)
class CellInfo:
    """What recurrence a unit runs.

    kind: the name of a registered cell kind (:mod:`gradflow.kinds`: ``"rnn_tanh"``, ``"lstm"``,
    ``"mingru"``, ``"lru"`` ..., ``"custom"`` for a registered user cell); source: ``"fused"``
    (a whole-sequence module: nn.RNN/LSTM/GRU or a gradflow.kinds layer), ``"cell"`` (nn.*Cell in a
    loop) or ``"custom"`` (a registered user cell). ``state_sizes`` maps state name to its size (LSTM
    with ``proj_size``: h has proj_size, c has hidden_size; LRU: h is [Re h; Im h], 2·hidden_size).
    Parameter names in ``Trace.params`` are the module's, without the layer suffix; for the PyTorch
    kinds ``weight_ih [G*H, F]``, ``weight_hh [G*H, P]``, ``bias_ih [G*H]``, ``bias_hh [G*H]`` (absent
    when ``bias=False``), ``weight_hr [P, H]`` (proj only), gate order as in PyTorch: LSTM i, f, g, o;
    GRU r, z, n. The other kinds' modules document theirs.
    """

    kind: str
    input_size: int
    hidden_size: int
    proj_size: int = 0
    states: tuple[str, ...] = ("h",)
    state_sizes: Mapping[str, int] = field(default_factory=dict)
    bias: bool = True
    source: str = "fused"
    cell_class: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["states"] = list(self.states)
        d["state_sizes"] = dict(self.state_sizes)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "CellInfo":
        d = dict(d)
        d["states"] = tuple(d["states"])
        return cls(**d)


def _as_key(key: "StateKey | str") -> StateKey:
    if isinstance(key, StateKey):
        return key
    if isinstance(key, str):
        return StateKey.parse(key)
    raise TraceError(f"a state key must be a StateKey or a string like 'rnn/l0/d0/h', got {type(key).__name__}")


class Trace:
    """Gradients (and optionally states) recorded during one backward pass. See the module docstring."""

    KEEPS = ("norms", "full", "states")

    def __init__(self, keep: str = "norms", meta: Mapping[str, Any] | None = None):
        if keep not in self.KEEPS:
            raise TraceError(f"keep={keep!r} is not one of {', '.join(self.KEEPS)}")
        self.keep = keep
        self.meta: dict[str, Any] = dict(meta or {})
        self._keys: list[StateKey] = []
        self._norm: dict[StateKey, torch.Tensor] = {}
        self._grad: dict[StateKey, torch.Tensor] = {}
        self._state: dict[StateKey, torch.Tensor] = {}
        self._prev: dict[StateKey, torch.Tensor] = {}
        self._mask: dict[tuple, torch.Tensor] = {}
        self._inputs: dict[tuple, torch.Tensor] = {}
        self._cells: dict[tuple, CellInfo] = {}
        self._params: dict[tuple, dict[str, torch.Tensor]] = {}
        self._modules: dict[tuple, torch.nn.Module] = {}  # live modules of custom cells (not saved)
        self._steps: dict[tuple, Any] = {}  # live step functions of custom cells (not saved)

    # ------------------------------------------------------------------ building (the public builder)
    def add_unit(self, unit: tuple, cell: CellInfo, mask: torch.Tensor, *, inputs=None, params=None, module=None,
                 step=None) -> None:
        """Describe unit ``unit`` = (module path, layer, direction, call): its :class:`CellInfo`, its
        [T, B] ``mask``, and with keep='states' its inputs [T, B, F] and parameters (stored as detached
        CPU copies); ``module``/``step``: the live module and step function of a user cell (kept in
        memory only). Call before :meth:`add_state` for the unit's keys."""
        if not isinstance(cell, CellInfo):
            raise TraceError(f"add_unit{tuple(unit)}: cell must be a CellInfo, got {type(cell).__name__}")
        unit = tuple(unit)
        self._cells[unit] = cell
        self._mask[unit] = mask.detach().to("cpu", torch.bool)
        if inputs is not None:
            self._inputs[unit] = inputs.detach().cpu()
        if params is not None:
            self._params[unit] = {k: v.detach().cpu().clone() for k, v in params.items()}
        if module is not None:
            self._modules[unit] = module
        if step is not None:
            self._steps[unit] = step

    def add_state(self, key: StateKey, grad: torch.Tensor | None = None, *, norm: torch.Tensor | None = None,
                  state=None, prev=None) -> None:
        """Add (or replace) key ``key``: its gradient ``grad`` [T, B, S] (any device/dtype, NaN where
        masked; norms are taken in float64 unless ``norm`` [T, B] is given), or only ``norm`` for a
        keep='norms' trace; with keep='states' also the states ``state`` and ``prev`` [T, B, S]."""
        key = _as_key(key)
        if key.unit not in self._cells:
            raise TraceError(f"add_state({key}): add its unit {key.unit} with add_unit first")
        if grad is None and norm is None:
            raise TraceError(f"add_state({key}): needs grad or norm")
        if grad is not None:
            grad = grad.detach()
        if norm is None:
            norm = _norms(grad)
        if grad is None and self.keep != "norms":
            raise TraceError(f"add_state({key}): a keep={self.keep!r} trace needs the gradient, not only its norm")
        if key not in self._norm:
            self._keys.append(key)
        self._norm[key] = norm.detach().cpu()
        if self.keep in ("full", "states"):
            self._grad[key] = grad.cpu()
        if self.keep == "states":
            if state is None or prev is None:
                raise TraceError(f"{key}: keep='states' needs state values")
            self._state[key] = state.detach().cpu()
            self._prev[key] = prev.detach().cpu()

    def order_keys(self, sort_key) -> None:
        """Reorder the keys in place by ``sort_key(StateKey)`` (as ``list.sort``)."""
        self._keys.sort(key=sort_key)

    def unit_record(self, unit: tuple) -> dict:
        """Everything :meth:`add_unit` stored for ``unit``, as its keyword arguments (cell, mask,
        inputs, params, module, step; None where absent): ``add_unit(u, **t.unit_record(u))`` copies it."""
        unit = tuple(unit)
        if unit not in self._cells:
            raise TraceError(f"no unit {unit} in this trace (units: {self.units()[:4]})")
        return {"cell": self._cells[unit], "mask": self._mask[unit], "inputs": self._inputs.get(unit),
                "params": self._params.get(unit), "module": self._modules.get(unit), "step": self._steps.get(unit)}

    def state_record(self, key) -> dict:
        """Everything :meth:`add_state` stored for ``key`` (grad, norm, state, prev; None where not
        kept): ``add_state(k, **t.state_record(k))`` copies it."""
        k = self._check(key)
        return {"grad": self._grad.get(k), "norm": self._norm[k], "state": self._state.get(k),
                "prev": self._prev.get(k)}

    # ------------------------------------------------------------------ reading
    def keys(self, module: str | None = None, state: str | None = None) -> list[StateKey]:
        """All recorded keys in recording order, optionally filtered by module path and state name."""
        return [
            k for k in self._keys if (module is None or k.module == module) and (state is None or k.state == state)
        ]

    def units(self) -> list[tuple]:
        return list(dict.fromkeys(k.unit for k in self._keys))

    def __contains__(self, key) -> bool:
        try:
            return _as_key(key) in self._norm
        except TraceError:
            return False

    def __len__(self) -> int:
        return len(self._keys)

    def _check(self, key) -> StateKey:
        k = _as_key(key)
        if k not in self._norm:
            known = ", ".join(str(x) for x in self._keys[:8]) or "none"
            raise TraceError(f"no state {k} in this trace (recorded: {known})")
        return k

    def _need(self, what: str, keep: tuple[str, ...], key: StateKey):
        if self.keep not in keep:
            raise TraceError(
                f"{key}: {what} not kept (trace recorded with keep={self.keep!r}); record with keep={keep[0]!r}"
            )

    def norm(self, key) -> torch.Tensor:
        """[T, B] float64 L2 norm of dL/ds_t over the state dimension (NaN where masked)."""
        return self._norm[self._check(key)]

    def log10_norm(self, key) -> torch.Tensor:
        """[T, B] float64 log10 of :meth:`norm` (-inf where the gradient is exactly 0)."""
        with np.errstate(divide="ignore"):
            return torch.log10(self.norm(key))

    def grad(self, key) -> torch.Tensor:
        """[T, B, H] total dL/ds_t in the model's dtype (NaN where masked)."""
        k = self._check(key)
        self._need("gradients", ("full", "states"), k)
        return self._grad[k]

    def mask(self, key) -> torch.Tensor:
        """[T, B] bool, True where step t exists for sequence b."""
        return self._mask[self._check(key).unit]

    def shape(self, key) -> tuple[int, int]:
        """(T, B) of a key."""
        n = self.norm(key)
        return int(n.shape[0]), int(n.shape[1])

    def cell(self, key) -> CellInfo:
        return self._cells[self._check(key).unit]

    def states(self, key) -> torch.Tensor:
        """[T, B, H] the state value s_t after step t (keep='states')."""
        k = self._check(key)
        self._need("states", ("states",), k)
        return self._state[k]

    def prev_states(self, key) -> torch.Tensor:
        """[T, B, H] the state fed into step t (s_{t-1} forward, s_{t+1} reverse; the initial state at
        the first processed step) (keep='states')."""
        k = self._check(key)
        self._need("states", ("states",), k)
        return self._prev[k]

    def inputs(self, key) -> torch.Tensor:
        """[T, B, F] the input x_t of the unit (the previous layer's output for layer > 0, after
        inter-layer dropout) (keep='states')."""
        k = self._check(key)
        self._need("inputs", ("states",), k)
        return self._inputs[k.unit]

    def params(self, key) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the unit's parameters (names in :class:`CellInfo`) (keep='states')."""
        k = self._check(key)
        self._need("parameters", ("states",), k)
        return self._params.get(k.unit, {})

    def module(self, key) -> torch.nn.Module | None:
        """The live module of a custom cell (None after load or for built-in cells)."""
        return self._modules.get(self._check(key).unit)

    def step_function(self, key):
        """For a registered custom cell recorded in this process: ``f(x_t [B, F], states) -> states``
        where ``states`` is a tuple of [B, S_i] tensors in ``cell(key).states`` order; differentiable
        (usable with torch.func). None for built-in cells and for traces loaded from disk."""
        return self._steps.get(self._check(key).unit)

    def subset(self, batch) -> "Trace":
        """A new Trace with only the batch items ``batch`` (a slice, list or bool/index tensor)."""
        idx = torch.arange(self.shape(self._keys[0])[1])[batch] if self._keys else None
        new = Trace(keep=self.keep, meta={**self.meta, "batch_subset": idx.tolist() if idx is not None else []})
        new._keys = list(self._keys)
        new._cells = dict(self._cells)
        new._params = dict(self._params)
        new._modules = dict(self._modules)
        new._steps = dict(self._steps)
        for d_src, d_dst in ((self._norm, new._norm), (self._grad, new._grad), (self._state, new._state),
                             (self._prev, new._prev), (self._mask, new._mask), (self._inputs, new._inputs)):
            for k, v in d_src.items():
                d_dst[k] = v.index_select(1, idx)
        return new

    # ------------------------------------------------------------------ findings
    def nonfinite(self):
        """Tidy DataFrame of every (key, t, b) whose gradient norm is NaN or ±Inf at a valid step."""
        import pandas as pd

        rows = []
        for k in self._keys:
            n = self._norm[k]
            bad = (~torch.isfinite(n)) & self._mask[k.unit]
            for t, b in bad.nonzero().tolist():
                rows.append({**_key_cols(k), "t": t, "b": b, "norm": float(n[t, b])})
        return pd.DataFrame(rows, columns=["module", "layer", "direction", "state", "call", "t", "b", "norm"])

    def to_frame(self):
        """Tidy DataFrame, one row per key × t × b: module, layer, direction, state, call, t, b, valid,
        norm, log10_norm."""
        import pandas as pd

        parts = []
        for k in self._keys:
            n = self._norm[k].numpy()
            T, B = n.shape
            t, b = np.meshgrid(np.arange(T), np.arange(B), indexing="ij")
            with np.errstate(divide="ignore", invalid="ignore"):
                ln = np.log10(n)
            d = pd.DataFrame(
                {
                    "t": t.ravel(),
                    "b": b.ravel(),
                    "valid": self._mask[k.unit].numpy().ravel(),
                    "norm": n.ravel(),
                    "log10_norm": ln.ravel(),
                }
            )
            for c, v in _key_cols(k).items():
                d.insert(0, c, v)
            parts.append(d)
        cols = ["module", "layer", "direction", "state", "call", "t", "b", "valid", "norm", "log10_norm"]
        if not parts:
            return pd.DataFrame(columns=cols)
        return pd.concat(parts, ignore_index=True)[cols]

    def __repr__(self) -> str:
        ks = ", ".join(str(k) for k in self._keys[:4]) + (", ..." if len(self._keys) > 4 else "")
        return f"Trace(keep={self.keep!r}, keys=[{ks}])"

    def _repr_html_(self) -> str:
        """Keys, shapes and a small heatmap for Jupyter (drawn by :mod:`gradflow.report.notebook`,
        imported only here, when a notebook displays a trace)."""
        from .report.notebook import trace_html

        return trace_html(self)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write ``trace.json``, ``norms.csv`` and ``arrays.npz`` into directory ``path`` atomically."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        units = self.units()
        uid = {u: i for i, u in enumerate(units)}
        for i, k in enumerate(self._keys):
            arrays[f"norm_{i}"] = self._norm[k].numpy()
            if k in self._grad:
                arrays[f"grad_{i}"] = _np(self._grad[k])
            if k in self._state:
                arrays[f"state_{i}"] = _np(self._state[k])
                arrays[f"prev_{i}"] = _np(self._prev[k])
        for u, i in uid.items():
            arrays[f"mask_{i}"] = self._mask[u].numpy()
            if u in self._inputs:
                arrays[f"inputs_{i}"] = _np(self._inputs[u])
            for name, p in self._params.get(u, {}).items():
                arrays[f"param_{i}_{name}"] = _np(p)
        meta = {
            "kind": "trace",
            "schema_version": _io.SCHEMA_VERSION,
            "keep": self.keep,
            "meta": _jsonable(self.meta),
            "keys": [_key_cols(k) for k in self._keys],
            "units": [
                {"unit": list(u), "cell": self._cells[u].to_json(), "params": sorted(self._params.get(u, {}))}
                for u in units
            ],
        }
        _io.write_npz(path / "arrays.npz", arrays)
        _io.write_csv(path / "norms.csv", self.to_frame())
        _io.write_json(path / "trace.json", meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """Read a directory written by :meth:`save` (no unpickling). A damaged or inconsistent
        directory gives one TraceError naming the file at fault (``trace.json`` or ``arrays.npz``);
        every array is checked against the shape ``trace.json`` implies before anything uses it."""
        path = Path(path)
        if not path.is_dir():
            raise TraceError(f"{path}: not a trace directory")
        jf, af = path / "trace.json", path / "arrays.npz"
        meta = _io.read_json(jf)
        _io.check_schema(jf, meta, "trace")
        arrays = _io.read_npz(af)
        try:
            from ._trace_load import Loader

            return Loader(jf, af, meta, arrays).trace(cls)
        except TraceError:
            raise
        except (KeyError, TypeError, IndexError, ValueError, AttributeError, OverflowError, RuntimeError) as exc:
            # a combination the checks below do not foresee: still one line naming both files
            raise TraceError(f"{jf}: does not match {af.name} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _norms(grad: torch.Tensor) -> torch.Tensor:
    """L2 norms over the last dimension in float64, right for any finite magnitude.

    float32 rows are summed in float32 (a float64 copy of a [T, B, H] gradient cost more than the
    rest of the bookkeeping) and summed again in float64 wherever the norm lies outside
    [1e-15, 1e15]: there squares of float32 entries could underflow or overflow. NaN/Inf rows are
    recomputed too and stay NaN/Inf."""
    if grad.dtype != torch.float32:
        return torch.linalg.vector_norm(grad.to(torch.float64), dim=-1)
    n = torch.linalg.vector_norm(grad, dim=-1)
    redo = ~((n > 1e-15) & (n < 1e15))
    n = n.to(torch.float64)
    if bool(redo.any()):
        n[redo] = torch.linalg.vector_norm(grad[redo].to(torch.float64), dim=-1)
    return n


def _key_cols(k: StateKey) -> dict:
    return {"module": k.module, "layer": k.layer, "direction": k.direction, "state": k.state, "call": k.call}


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.detach().cpu().numpy()


def _jsonable(obj):
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def merge_keys(traces: Iterable[Trace]) -> list[StateKey]:
    """Keys present in any of the traces, in first-seen order."""
    return list(dict.fromkeys(k for t in traces for k in t.keys()))
