"""gradflow: where and why gradients vanish or explode in recurrent neural networks.

Public API::

    with gradflow.record(model, keep="full") as rec:
        loss = loss_fn(model(x)); loss.backward()
    for key in rec.trace.keys():
        rec.trace.grad(key)   # [T, B, H] total dL/ds_t, time-major

See README.md for the analyses and the CLI.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import analysis as _analysis
from .analysis import *  # noqa: F401,F403  (pure functions on traces and Jacobians)
from .errors import (
    GradflowError,
    NoRecurrentModuleError,
    SpecError,
    TaskError,
    TraceError,
    UnsupportedModuleError,
)
from .recording import *  # noqa: F401,F403
from . import recording as _recording
from .trace import CellInfo, StateKey, Trace

__all__ = [
    "__version__",
    "GradflowError",
    "NoRecurrentModuleError",
    "SpecError",
    "TaskError",
    "TraceError",
    "UnsupportedModuleError",
    "CellInfo",
    "StateKey",
    "Trace",
    *_recording.__all__,
    *_analysis.__all__,
]
