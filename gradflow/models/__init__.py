"""The cell zoo used by the analyses (see :mod:`gradflow.models.zoo` for the architecture).

``get_model(cell, input_size=..., output_size=..., ...)`` builds a :class:`SequenceModel`;
``model_for_task(task, cell, ...)`` sizes one for a task; ``list_cells()`` names the cells.
Unknown cell names raise a one-line :class:`~gradflow.errors.TaskError` naming the nearest one.
"""

from __future__ import annotations

import difflib

import torch

from ..errors import TaskError
from .custom import CellLoop, MGUCell
from .zoo import CELLS, INITS, CellKind, SequenceModel, count_parameters, expected_param_count

__all__ = [
    "CELLS",
    "INITS",
    "CellKind",
    "CellLoop",
    "MGUCell",
    "SequenceModel",
    "count_parameters",
    "expected_param_count",
    "get_model",
    "list_cells",
    "model_for_task",
]


def list_cells() -> list[str]:
    """Names accepted by :func:`get_model`."""
    return list(CELLS)


def _check_cell(cell: str) -> None:
    if cell not in CELLS:
        m = difflib.get_close_matches(str(cell), list(CELLS), n=1, cutoff=0.4)
        hint = f"; did you mean {m[0]!r}?" if m else ""
        raise TaskError(f"unknown cell {cell!r}{hint} (known: {', '.join(CELLS)})")


def get_model(
    cell: str,
    *,
    input_size: int,
    output_size: int,
    tokens: bool = False,
    readout: str = "last",
    hidden: int = 64,
    layers: int = 1,
    dropout: float = 0.0,
    init: str | None = None,
    gain: float = 1.0,
    forget_bias: float | None = None,
    seed: int | None = None,
) -> SequenceModel:
    """A :class:`SequenceModel` with the given cell; ``seed`` makes the initialisation reproducible
    without touching the global torch RNG."""
    _check_cell(cell)
    kw = dict(tokens=tokens, readout=readout, hidden=hidden, layers=layers, dropout=dropout, init=init,
              gain=gain, forget_bias=forget_bias)
    if seed is None:
        return SequenceModel(cell, input_size, output_size, **kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return SequenceModel(cell, input_size, output_size, **kw)


def model_for_task(task, cell: str, **options) -> SequenceModel:
    """A model sized for ``task`` (a :class:`gradflow.tasks.Task`): one-hot token input or real
    channels, the task's output size and readout. ``options`` as in :func:`get_model`."""
    for k in ("input_size", "output_size", "tokens", "readout"):
        if k in options:
            raise TaskError(f"model_for_task: {k} is set by the task, not an option")
    return get_model(
        cell,
        input_size=task.n_features,
        output_size=task.output_size,
        tokens=task.input_kind == "tokens",
        readout=task.readout,
        **options,
    )
