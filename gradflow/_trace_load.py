"""Validation of a saved trace while :meth:`gradflow.trace.Trace.load` rebuilds it.

``trace.json`` says which units and keys there are and what each holds; ``arrays.npz`` holds the
arrays. Every field is checked for its type and range and every array for its dtype and for the shape
``trace.json`` implies ([T, B] mask and norms per unit, [T, B, S] gradients and states, [T, B, F]
inputs) before anything uses it, so a damaged or mismatched pair is one TraceError naming the file at
fault, never a KeyError, TypeError or IndexError from deep inside an analysis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import TraceError
from .trace import CellInfo, StateKey, Trace

__all__ = ["Loader"]


class Loader:
    """Validates a saved trace (``trace.json`` + ``arrays.npz``) while rebuilding it."""

    _CELL_TYPES = {"kind": str, "input_size": int, "hidden_size": int, "proj_size": int, "bias": bool,
                   "source": str, "cell_class": str}

    def __init__(self, jf: Path, af: Path, meta: dict, arrays: dict):
        self.jf, self.af, self.meta, self.arrays = jf, af, meta, arrays

    def bad(self, what: str) -> TraceError:
        return TraceError(f"{self.jf}: {what}")

    def field(self, obj, name: str, types, where: str):
        if not isinstance(obj, dict):
            raise self.bad(f"{where} must be a JSON object, not {type(obj).__name__}")
        if name not in obj:
            raise self.bad(f"{where} lacks {name!r}")
        v = obj[name]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in _tuple(types))
        if not ok:
            raise self.bad(f"{where}: {name!r} must be {_type_names(types)}, not {_short(v)}")
        return v

    def count(self, obj, name: str, where: str, hi: int | None = None) -> int:
        v = self.field(obj, name, int, where)
        if v < 0 or (hi is not None and v > hi):
            raise self.bad(f"{where}: {name!r} is {v}, out of range")
        return v

    def array(self, name: str, ndim: int, kinds: str, shape: tuple | None = None, need: str = "") -> np.ndarray:
        """arrays[name], required, with ``ndim`` dimensions, dtype kind in ``kinds`` and leading
        dimensions ``shape``; errors name arrays.npz (and trace.json, whose entry needs it)."""
        if name not in self.arrays:
            raise TraceError(f"{self.af}: no array {name!r}, which {self.jf.name} {need or 'lists'}")
        a = self.arrays[name]
        if a.dtype.kind not in kinds or a.dtype.hasobject:
            raise TraceError(f"{self.af}: array {name!r} has dtype {a.dtype}, expected "
                             f"{ {'b': 'bool', 'f': 'floating', 'fc': 'floating or complex'}.get(kinds, kinds)}")
        if a.ndim != ndim or (shape is not None and tuple(a.shape[:len(shape)]) != tuple(shape)):
            want = f"[{', '.join(map(str, shape))}{', ...' if shape is not None and ndim > len(shape) else ''}]" \
                if shape is not None else f"{ndim} dimensions"
            raise TraceError(f"{self.af}: array {name!r} has shape {list(a.shape)}, expected {want} (from {self.jf.name})")
        if not a.dtype.isnative:
            a = a.astype(a.dtype.newbyteorder("="))
        return a

    def cell(self, d, where: str) -> CellInfo:
        if not isinstance(d, dict):
            raise self.bad(f"{where}: 'cell' must be a JSON object, not {_short(d)}")
        unknown = sorted(set(d) - {f.name for f in CellInfo.__dataclass_fields__.values()})
        if unknown:
            raise self.bad(f"{where}: 'cell' has unknown field(s) {', '.join(map(repr, unknown))}")
        kw = {}
        for name, typ in self._CELL_TYPES.items():
            if name in d:
                kw[name] = self.field(d, name, typ, f"{where} cell")
        for name in ("kind", "input_size", "hidden_size"):
            if name not in kw:
                raise self.bad(f"{where}: 'cell' lacks {name!r}")
        for name in ("input_size", "hidden_size", "proj_size"):
            if name in kw:
                self.count(kw, name, f"{where} cell")
        states = self.field(d, "states", list, f"{where} cell") if "states" in d else ["h"]
        if not states or not all(isinstance(x, str) and x for x in states) or len(set(states)) != len(states):
            raise self.bad(f"{where}: cell 'states' must be a list of distinct state names, not {_short(states)}")
        sizes = self.field(d, "state_sizes", dict, f"{where} cell") if "state_sizes" in d else {}
        for k, v in sizes.items():
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise self.bad(f"{where}: cell 'state_sizes' {k!r} must be a non-negative integer, not {_short(v)}")
        return CellInfo(states=tuple(states), state_sizes=dict(sizes), **kw)

    def trace(self, cls) -> "Trace":
        meta = self.meta
        keep = meta.get("keep")
        if keep not in Trace.KEEPS:
            raise self.bad(f"'keep' is {_short(keep)}, not one of {', '.join(Trace.KEEPS)}")
        extra = meta.get("meta", {})
        if not isinstance(extra, dict):
            raise self.bad(f"'meta' must be a JSON object, not {_short(extra)}")
        tr = cls(keep=keep, meta=extra)
        units = self.field(meta, "units", list, "the trace")
        keys = self.field(meta, "keys", list, "the trace")
        shapes: dict[tuple, tuple[int, int]] = {}
        for i, u in enumerate(units):
            where = f"units[{i}]"
            raw = self.field(u, "unit", list, where)
            if len(raw) != 4:
                raise self.bad(f"{where}: 'unit' must be [module, layer, direction, call], not {_short(raw)}")
            unit = self.unit(dict(zip(("module", "layer", "direction", "call"), raw)), where + " unit")
            if unit in tr._cells:
                raise self.bad(f"{where}: unit {list(unit)} is listed twice")
            tr._cells[unit] = self.cell(self.field(u, "cell", dict, where), where)
            mask = self.array(f"mask_{i}", 2, "b", need=f"needs for {where}")
            shapes[unit] = mask.shape
            tr._mask[unit] = torch.from_numpy(mask)
            if f"inputs_{i}" in self.arrays:
                tr._inputs[unit] = torch.from_numpy(self.array(f"inputs_{i}", 3, "fc", mask.shape))
            names = self.field(u, "params", list, where) if "params" in u else []
            if not all(isinstance(n, str) for n in names):
                raise self.bad(f"{where}: 'params' must be a list of parameter names, not {_short(names)}")
            params = {}
            for n in names:
                a = self.arrays.get(f"param_{i}_{n}")
                ndim = a.ndim if a is not None else 1  # a parameter has whatever shape its cell gives it
                params[n] = torch.from_numpy(self.array(f"param_{i}_{n}", ndim, "fc", need=f"lists in {where}"))
            if params:
                tr._params[unit] = params
        for i, kd in enumerate(keys):
            where = f"keys[{i}]"
            module, layer, direction, call = self.unit(kd, where)
            k = StateKey(module, layer, direction, self.field(kd, "state", str, where), call)
            if k.unit not in tr._cells:
                raise self.bad(f"{where}: state {k} belongs to no unit in 'units'")
            if k in tr._norm:
                raise self.bad(f"{where}: state {k} is listed twice")
            T, B = shapes[k.unit]
            norm = self.array(f"norm_{i}", 2, "f", (T, B), need=f"needs for {where}")
            tr._keys.append(k)
            tr._norm[k] = torch.from_numpy(norm)
            if keep in ("full", "states"):
                g = self.array(f"grad_{i}", 3, "fc", (T, B), need=f"needs for {where} (keep={keep!r})")
                tr._grad[k] = torch.from_numpy(g)
            if keep == "states":
                for store, name in ((tr._state, "state"), (tr._prev, "prev")):
                    a = self.array(f"{name}_{i}", 3, "fc", tuple(tr._grad[k].shape),
                                   need=f"needs for {where} (keep='states')")
                    store[k] = torch.from_numpy(a)
        return tr

    def unit(self, d, where: str) -> tuple:
        return (self.field(d, "module", str, where), self.count(d, "layer", where),
                self.count(d, "direction", where, 1), self.count(d, "call", where))


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _type_names(types) -> str:
    names = {str: "a string", int: "an integer", bool: "true or false", list: "a list", dict: "a JSON object"}
    return " or ".join(names.get(t, t.__name__) for t in _tuple(types))


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
