"""gradflow: where and why gradients vanish or explode in recurrent neural networks.

Public API::

    with gradflow.record(model, keep="full") as rec:
        loss = loss_fn(model(x)); loss.backward()
    for key in rec.trace.keys():
        rec.trace.grad(key)   # [T, B, H] total dL/ds_t, time-major

    gradflow.load("runs/checksum")   # a run, study or trace directory (renders in Jupyter)

See README.md for the analyses and the CLI.

Importing the package is cheap: it loads only the version and the error classes. Every other name
of ``__all__`` (and every submodule, e.g. ``gradflow.report``) is imported on first access through a
module-level ``__getattr__`` (PEP 562), so ``gradflow --help`` and ``gradflow list`` never import
torch, pandas or matplotlib.
"""

from __future__ import annotations

import importlib
import importlib.util

from ._version import __version__
from .errors import (
    GradflowError,
    NoRecurrentModuleError,
    SpecError,
    TaskError,
    TraceError,
    UnsupportedModuleError,
)

# public name -> the submodule that exports it (tests/cli/test_lazy.py checks this table against the
# submodules' own __all__, so it cannot drift)
_LAZY: dict[str, str] = {
    **dict.fromkeys(("CellInfo", "StateKey", "Trace"), "trace"),
    "load": "loading",
    **dict.fromkeys(("record", "Recorder", "register_cell", "unregister_cell", "find_recurrent"), "recording"),
    **dict.fromkeys((
        # jacobian, linear, cells
        "jacobians", "cell_jacobians", "linearize_trace", "joint_gradient", "Linearization", "linearize",
        "gate_values",
        # spectra, products
        "singular_values", "eigenvalue_moduli", "spectral_radius", "step_summary", "top_singular_values",
        "smallest_singular_values", "largest_singular_value", "DenseOperator", "product_singular_values", "product_spectrum", "lyapunov_exponents",
        "lyapunov_spectrum", "LyapunovResult",
        # adjoint, distance, gates, frames
        "direct_gradients", "adjoint_log_norms", "gradient_matrix", "GradientMatrix", "total_log10_norms",
        "DistanceProfile", "Profile", "distance_profile", "gate_statistics", "spectra_tables", "spectra_table",
        "spectra_summary_table", "products_table", "lyapunov_table", "verdicts",
        # config, plan, streaming, pipeline
        "AnalysisConfig", "parse_memory", "Plan", "plan_unit", "distribution_steps", "log_distances",
        "ChunkedLinearization", "chunked_linearization", "analyze_trace", "plan_trace", "resolve_device",
    ), "analysis"),
}

__all__ = [
    "__version__",
    "GradflowError",
    "NoRecurrentModuleError",
    "SpecError",
    "TaskError",
    "TraceError",
    "UnsupportedModuleError",
    *_LAZY,
]


def __getattr__(name: str):
    """Import a public name's submodule (or a submodule itself) on first access."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
