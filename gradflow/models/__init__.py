"""The cell zoo used by the analyses (see :mod:`gradflow.models.zoo` for the architecture).

``get_model(cell, input_size=..., output_size=..., ...)`` builds a :class:`SequenceModel`;
``model_for_task(task, cell, ...)`` sizes one for a task; ``list_cells()`` names the cells.
Unknown cell names raise a one-line :class:`~gradflow.errors.TaskError` naming the nearest one.
"""

from __future__ import annotations

import torch

from .. import kinds
from ..errors import GradflowError, TaskError
from .custom import CellLoop, MGUCell
from .zoo import CELLS, INITS, SequenceModel, ZooCell, count_parameters, expected_param_count

__all__ = [
    "CELLS",
    "INITS",
    "ZooCell",
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
    """Names accepted by :func:`get_model` (the zoo of :mod:`gradflow.kinds`)."""
    return list(kinds.zoo())


def _check_cell(cell: str) -> None:
    try:
        kinds.zoo_cell(cell)
    except GradflowError as e:
        raise TaskError(str(e)) from None


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
    **options,
) -> SequenceModel:
    """A :class:`SequenceModel` with the given cell; ``seed`` makes the initialisation reproducible
    without touching the global torch RNG. ``options``: the kind's own model options
    (``CellKind.options``, e.g. an LRU's ``r_min``, ``r_max``)."""
    _check_cell(cell)
    kw = dict(tokens=tokens, readout=readout, hidden=hidden, layers=layers, dropout=dropout, init=init,
              gain=gain, forget_bias=forget_bias, **options)
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
