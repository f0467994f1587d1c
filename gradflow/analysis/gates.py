"""Gate activation statistics per timestep (the gates of the unit's cell kind: LSTM i, f, g, o; GRU
r, z, n; minGRU z; minLSTM f′, i′), optionally per token class.

Values are recomputed from a keep='states' trace (inputs, previous states and parameters) with the
closed-form cell of the unit's kind (:mod:`gradflow.kinds`). For each gate, timestep t (position order) and
token class, the statistics pool every valid batch item of that class and every hidden unit.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .. import kinds
from ..errors import GradflowError
from ..trace import Trace
from . import _util
from .cells import gate_values

__all__ = ["gate_statistics"]

GATE_COLUMNS = ["key", "gate", "t", "token_class", "mean", "q25", "q50", "q75"]


def _stats(v: np.ndarray) -> np.ndarray:
    """v [T, n] with NaN for excluded entries -> [T, 4] (mean, q25, q50, q75); NaN for empty rows."""
    out = np.full((v.shape[0], 4), np.nan)
    has = (~np.isnan(v)).any(1)
    if has.any():
        w = v[has]
        out[has, 0] = np.nanmean(w, 1)
        out[has, 1:] = _util.row_quantiles(w, (0.25, 0.5, 0.75))
    return out


def gate_statistics(trace: Trace, key, *, classes=None, gates=None) -> pd.DataFrame:
    """The ``gates`` table (without ``run``): key, gate, t, token_class, mean, q25, q50, q75.

    classes: optional [T, B] array of token classes (ints or strings), position order; rows are then
    given for every class present and for ``"all"``. gates: subset of gate names (default all of the
    kind's gates). Kinds without gates (tanh/ReLU RNN, IndRNN, LRU, user cells): GradflowError."""
    k = _util.resolve(trace, key)
    cell, params, x, prev, mask = _util.unit_data(trace, k)
    names = kinds.get(cell.kind).gate_names
    if not names:
        gated = ", ".join(c.name for c in kinds.kinds() if c.gates)
        raise GradflowError(f"{k}: a {cell.kind} cell has no gates (gate statistics need a unit of kind {gated})")
    gates = list(names if gates is None else gates)
    unknown = [g for g in gates if g not in names]
    if unknown:
        raise GradflowError(f"{k}: unknown gate(s) {unknown} for a {cell.kind} cell (gates: {', '.join(names)})")
    T, B = mask.shape
    groups = [("all", mask.numpy())]
    if classes is not None:
        cls = np.asarray(classes.numpy() if isinstance(classes, torch.Tensor) else classes)
        if cls.shape != (T, B):
            raise GradflowError(f"{k}: classes must be a [T, B] = {(T, B)} array, got shape {cls.shape}")
        for c in pd.unique(cls[mask.numpy()].ravel()):
            groups.append((c, mask.numpy() & (cls == c)))
    vals = gate_values(cell, params, x, prev, dtype=torch.float64)
    frames = []
    for g in gates:
        v = vals[g].numpy()  # [T, B, H]
        for label, sel in groups:
            w = np.where(sel[..., None], v, np.nan).reshape(T, -1)
            st = _stats(w)
            frames.append(pd.DataFrame({"key": str(k), "gate": g, "t": np.arange(T), "token_class": label,
                                        "mean": st[:, 0], "q25": st[:, 1], "q50": st[:, 2], "q75": st[:, 3]}))
    df = pd.concat(frames, ignore_index=True)[GATE_COLUMNS]
    empty = df["mean"].isna() & (df["token_class"] != "all")  # a class absent at that step
    return df[~empty].reset_index(drop=True)
