"""Gate activations of a recorded unit, recomputed from its inputs, previous states and parameters.

The cell math of every kind (and its gate names) lives in the kind's module of
:mod:`gradflow.kinds`; this module is the public entry point of the analysis to it.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .. import kinds
from ..errors import GradflowError
from ..trace import CellInfo

__all__ = ["gate_values"]


def gate_values(cell: CellInfo, params: Mapping[str, torch.Tensor], x: torch.Tensor, prev: tuple,
                dtype=None) -> dict[str, torch.Tensor]:
    """Gate activations of every step, each [T, B, H], named as the kind's gates (LSTM ``i, f, g, o``;
    GRU ``r, z, n``; minGRU ``z``; minLSTM ``f, i``; none for RNNs, IndRNN and LRU). ``x`` [T, B, F];
    ``prev`` the tuple of states fed into each step."""
    if not isinstance(cell, CellInfo):
        raise GradflowError(f"expected a CellInfo, got {type(cell).__name__}")
    kind = kinds.get(cell.kind)
    if kind.impl.needs_step:
        raise GradflowError(f"cell kind {cell.kind!r} has no closed form to recompute gates from")
    kind.impl.check(cell, params, x, tuple(prev))
    return kind.impl.gates(cell, params, x, tuple(prev), dtype) if kind.gates else {}
