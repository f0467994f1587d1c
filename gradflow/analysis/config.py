"""The analysis options: one frozen :class:`AnalysisConfig`, validated once.

Every way of running the analysis (a spec's ``[analysis]`` table, ``gradflow inspect``/``run``
``--memory``, sweeps, the Lightning callback, :func:`gradflow.analysis.analyze_trace`) builds one
``AnalysisConfig``; the defaults live here only. :meth:`AnalysisConfig.from_mapping` checks the type
and range of every value and raises a one-line :class:`~gradflow.errors.SpecError` naming where the
value came from (``analyses/x.toml [analysis] memory``) and the key.

This module imports no torch (spec parsing stays cheap).
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping

from ..errors import SpecError

__all__ = ["AnalysisConfig", "parse_memory"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(value, where: str = "memory") -> int:
    """Bytes from an int (bytes) or a string such as ``"2GB"``, ``"512MB"``, ``"1.5 GiB"`` (KB/MB/GB
    are powers of 10, KiB/MiB/GiB powers of 2). One-line SpecError naming ``where`` otherwise."""
    if isinstance(value, bool):
        raise SpecError(f"{where} must be a size in bytes or a string like '2GB', got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise SpecError(f"{where} must be a size like '2GB', '512MB' or '1.5GiB', got {value!r}")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise SpecError(f"{where} must be a size in bytes or a string like '2GB', got {value!r}")
    if not math.isfinite(n) or n < 1:
        raise SpecError(f"{where} must be a positive size, got {value!r}")
    return int(n)


def _fmt_bytes(n: int) -> str:
    for unit, f in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= f:
            return f"{n / f:.3g} {unit}"
    return f"{n} B"


# key -> (what it must be, check(value) -> normalised value or raise ValueError)
def _int(lo: int):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError
        return int(v)
    return check


def _opt_int(lo: int):
    inner = _int(lo)
    return lambda v: None if v is None else inner(v)


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError
    return v


def _opt_bool(v):
    return None if v is None else _bool(v)


def _open01(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) < 1:
        raise ValueError
    return float(v)


def _keys(v):
    if v == "all":
        return "all"
    if isinstance(v, (list, tuple)) and v and all(isinstance(s, str) and s for s in v):
        return tuple(v)
    raise ValueError


def _device(v):
    if v is None:
        return None
    if not isinstance(v, str) or not re.fullmatch(r"(cpu|cuda|mps)(:\d+)?", v):
        raise ValueError
    return v


_CHECKS: dict[str, tuple[str, Any]] = {
    "warmup": ("an integer >= 0", _int(0)),
    "horizon_fraction": ("a number strictly between 0 and 1", _open01),
    "horizon_reference": ("an integer >= 0", _int(0)),
    "max_rank": ("an integer >= 1", _int(1)),
    "keys": ('"all" or a non-empty list of state keys', _keys),
    "lyapunov": ("true or false", _bool),
    "products": ("true or false", _bool),
    "batch_limit": ("an integer >= 1", _int(1)),
    "per_step_loss": ("true or false", _opt_bool),
    "k": ("an integer >= 1", _int(1)),
    "spectra_steps": ("an integer >= 1", _int(1)),
    "distances": ("an integer >= 1", _int(1)),
    "dense_max": ("an integer >= 0", _int(0)),
    "chunk": ("an integer >= 1", _opt_int(1)),
    "device": ('"cpu", "cuda", "cuda:N" or "mps"', _device),
}


@dataclass(frozen=True)
class AnalysisConfig:
    """Every option of the analysis of a trace (see :func:`gradflow.analysis.analyze_trace`).

    warmup: Lyapunov warm-up steps (run, not averaged); horizon_fraction / horizon_reference: the
    memory horizon is the distance where the gradient falls below ``horizon_fraction`` of its value at
    distance ``horizon_reference``; max_rank: singular values kept per Jacobian in ``spectra.csv``;
    keys: ``"all"`` or the state keys to analyse; lyapunov / products: compute those tables;
    batch_limit: sequences used for the Jacobian-based tables (spectra, products, Lyapunov);
    per_step_loss: build the distance profile from G[s, t] = ||∂L_s/∂s_t|| (None: from the task's
    readout); memory: the budget in bytes for the analysis' working set (``"2GB"`` accepted);
    k: singular values / Lyapunov exponents computed matrix-free when S is too large for dense
    spectra; spectra_steps: at most this many timesteps get a full distribution when drawing all of
    them is not cheap; distances: about this many log-spaced product distances; dense_max: largest
    joint state size S analysed with dense (full) spectra; chunk: timesteps processed at once (None:
    the plan's choice from ``memory``); device: where the analysis runs (None: CUDA when the trace was
    recorded there and CUDA is available, else CPU)."""

    warmup: int = 0
    horizon_fraction: float = 1e-3
    horizon_reference: int = 1
    max_rank: int = 32
    keys: Any = "all"
    lyapunov: bool = True
    products: bool = True
    batch_limit: int = 16
    per_step_loss: bool | None = None
    memory: int = 2 * 10**9
    k: int = 32
    spectra_steps: int = 64
    distances: int = 12
    dense_max: int = 128
    chunk: int | None = None
    device: str | None = None

    def __post_init__(self):
        # the API path (AnalysisConfig(memory="512MB", ...)) is validated like a spec
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "memory":
                object.__setattr__(self, "memory", parse_memory(v, "AnalysisConfig: memory"))
                continue
            what, check = _CHECKS[f.name]
            try:
                object.__setattr__(self, f.name, check(v))
            except ValueError:
                raise SpecError(f"AnalysisConfig: {f.name} must be {what}, got {v!r}") from None

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any] | None, *, where: str = "[analysis]") -> "AnalysisConfig":
        """Validate ``mapping`` (a spec's ``[analysis]`` table, CLI options) into a config; missing keys
        take the defaults. One-line SpecError ``"<where> <key> must be ..., got ..."`` otherwise."""
        if mapping is None:
            return cls()
        if isinstance(mapping, AnalysisConfig):
            return mapping
        if not isinstance(mapping, Mapping):
            raise SpecError(f"{where} must be a table, got {type(mapping).__name__}")
        names = [f.name for f in fields(cls)]
        out = {}
        for key, v in mapping.items():
            if key not in names:
                m = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
                hint = f"; did you mean {m[0]!r}?" if m else ""
                raise SpecError(f"{where} unknown key {key!r}{hint} (valid: {', '.join(sorted(names))})")
            if key == "memory":
                out[key] = parse_memory(v, f"{where} memory")
                continue
            what, check = _CHECKS[key]
            try:
                out[key] = check(v)
            except ValueError:
                raise SpecError(f"{where} {key} must be {what}, got {v!r}") from None
        return cls(**out)

    def replace(self, **changes) -> "AnalysisConfig":
        """A copy with ``changes`` (validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able mapping (``from_mapping(to_dict())`` gives the same config)."""
        d = asdict(self)
        if isinstance(d["keys"], tuple):
            d["keys"] = list(d["keys"])
        return d

    @property
    def memory_text(self) -> str:
        return _fmt_bytes(self.memory)
