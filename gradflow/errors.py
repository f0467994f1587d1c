"""Errors raised by gradflow.

Every error is a :class:`GradflowError` (a ``ValueError`` subclass, so generic handlers still catch
it) whose message is one line naming what is wrong: the module path, the option, the file or the
shape. The CLI prints ``str(error)`` on stderr and exits non-zero.
"""

from __future__ import annotations

__all__ = [
    "GradflowError",
    "UnsupportedModuleError",
    "NoRecurrentModuleError",
    "TraceError",
    "SpecError",
    "TaskError",
]


class GradflowError(ValueError):
    """Base class: a one-line, user-facing error."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class UnsupportedModuleError(GradflowError):
    """A module kind or module option that recording cannot handle (names module path and option)."""


class NoRecurrentModuleError(GradflowError):
    """``record()`` found no recurrent module in the model."""


class TraceError(GradflowError):
    """A trace was read before any backward pass, or asked for data it did not keep."""


class SpecError(GradflowError):
    """An analysis spec or CLI option is invalid (names the file, key or option)."""


class TaskError(GradflowError):
    """A task, cell or model was asked for with impossible settings."""
