"""``gradflow.load(path)``: open a trace, run, study or sweep directory for reading in Python or a
notebook.

A trace directory (``trace.json``, as :meth:`gradflow.Trace.save` and a run's ``trace/`` hold) gives
a :class:`~gradflow.trace.Trace`; a run, study or sweep directory (``run.json`` / ``study.json``)
gives a :class:`~gradflow.report.RunSet` (metadata and every table concatenated across runs). Both
render in Jupyter (``_repr_html_``: keys, shapes, verdicts and a small heatmap). Nothing is
unpickled or executed: the files are JSON, CSV and ``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import GradflowError

__all__ = ["load"]


def load(path: str | os.PathLike):
    """A :class:`~gradflow.trace.Trace` for a trace directory, else a :class:`~gradflow.report.RunSet`
    for a run, study or sweep directory. Raises a one-line GradflowError naming the path otherwise."""
    p = Path(path)
    if not p.exists():
        raise GradflowError(f"{p}: no such directory")
    if not p.is_dir():
        raise GradflowError(f"{p}: not a directory (give a trace, run or study directory)")
    if (p / "trace.json").is_file():
        from .trace import Trace

        return Trace.load(p)
    if not ((p / "run.json").is_file() or (p / "study.json").is_file()):
        raise GradflowError(f"{p}: neither trace.json, run.json nor study.json found (not a gradflow directory)")
    from .report.load import load_runs

    return load_runs([p])
