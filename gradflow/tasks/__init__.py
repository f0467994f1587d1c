"""Built-in tasks: synthetic long-dependency scenarios, the standard benchmarks and embedded real data.

``get_task(name, **options)`` builds one (settings are the task's dataclass fields, e.g.
``get_task("checksum", T=100)``); ``list_tasks()`` names them. ``task.sample(batch, seed)`` returns a
time-major :class:`Batch`; ``task.loss``, ``task.metric``, ``task.chance_metric``/``chance_loss`` and
``task.solved(metric)`` say how a model is judged. See :mod:`gradflow.tasks.base`.
"""

from __future__ import annotations

import difflib
from dataclasses import fields
from typing import Callable

from ..errors import TaskError
from .base import Batch, Task
from .benchmarks import Adding, CopyMemory, TemporalOrder
from .real import EEG, CharLM, Membrane, Stocks
from .scenarios import Agreement, Checksum, IrrelevantTokens, Segments

__all__ = [
    "Batch",
    "Task",
    "TASKS",
    "get_task",
    "list_tasks",
    "Checksum",
    "IrrelevantTokens",
    "Segments",
    "Agreement",
    "Adding",
    "CopyMemory",
    "TemporalOrder",
    "CharLM",
    "Stocks",
    "EEG",
    "Membrane",
]

TASKS: dict[str, Callable[..., Task]] = {
    cls.name: cls
    for cls in (Checksum, IrrelevantTokens, Segments, Agreement, Adding, CopyMemory, TemporalOrder, CharLM, Stocks,
                EEG, Membrane)
}


def list_tasks() -> list[str]:
    """Names accepted by :func:`get_task`."""
    return list(TASKS)


def _nearest(name: str, options) -> str:
    m = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.4)
    return f"; did you mean {m[0]!r}?" if m else ""


def get_task(name: str, **options) -> Task:
    """The task ``name`` with the given settings (unknown names and settings raise TaskError)."""
    if isinstance(name, Task):
        if options:
            raise TaskError(f"get_task: options {sorted(options)} given with a task instance")
        return name
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}{_nearest(name, TASKS)} (known: {', '.join(TASKS)})")
    cls = TASKS[name]
    known = [f.name for f in fields(cls)]
    for k in options:
        if k not in known:
            raise TaskError(f"task {name!r} has no option {k!r}{_nearest(k, known)} (options: {', '.join(known)})")
    return cls(**options)
