"""Meeting users' training code: a PyTorch Lightning callback (``lightning``, extra
``gradflow[lightning]``), a TensorBoard writer (``tensorboard``, extra ``gradflow[tensorboard]``) and
fault localisation in traces (``faults``, no extra). Submodules are imported on demand so that a
missing extra only fails where it is used."""

from __future__ import annotations

import importlib

from ..errors import GradflowError

__all__ = ["require"]


def require(module: str, extra: str):
    """Import ``module`` or raise a one-line GradflowError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise GradflowError(
            f"{module} is not installed ({exc}); install the extra with `pip install gradflow[{extra}]`"
        ) from None
