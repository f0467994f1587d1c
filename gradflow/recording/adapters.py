"""Recording adapters: one object per way of attaching to a module, kept in one registry.

An :class:`Adapter` says whether it records a module (:meth:`~Adapter.matches`) and attaches to it
(:meth:`~Adapter.attach`), returning handles whose ``remove()`` undoes everything it did; the
recorder keeps every handle and removes them on exit, even on error. The registry is searched in
order and the first adapter that matches a module records it:

* ``fused`` (:mod:`gradflow.recording.fused`): whole-sequence modules of every cell kind that has
  one (``nn.RNN/LSTM/GRU``, gradflow's minGRU/minLSTM/IndRNN/LRU layers), run as a weight-sharing
  unroll through the kind's recording kernel;
* ``custom`` (:mod:`gradflow.recording.cells`): cells registered with ``gradflow.register_cell``;
* ``cell``: ``nn.RNNCell/LSTMCell/GRUCell`` (any kind's step module) called in a Python loop.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from ..errors import GradflowError

__all__ = ["Adapter", "register_adapter", "adapters", "adapter_for"]


class Adapter:
    """Base class: ``name`` appears in :func:`gradflow.find_recurrent`'s results."""

    name = ""

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def attach(self, recorder, path: str, module: nn.Module) -> Iterable:
        """Attach to ``module`` (at ``path``) for ``recorder``; raise UnsupportedModuleError naming the
        module and option it cannot record. Returns handles with ``remove()``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter, *, before: str | None = None) -> Adapter:
    """Add ``adapter`` to the registry (at the end, or before the adapter named ``before``)."""
    if not isinstance(adapter, Adapter):
        raise GradflowError(f"register_adapter expects an Adapter, got {type(adapter).__name__}")
    if any(a.name == adapter.name for a in _ADAPTERS):
        raise GradflowError(f"an adapter named {adapter.name!r} is already registered")
    names = [a.name for a in _ADAPTERS]
    _ADAPTERS.insert(names.index(before) if before in names else len(_ADAPTERS), adapter)
    return adapter


def adapters() -> list[Adapter]:
    return list(_ADAPTERS)


def adapter_for(module: nn.Module) -> Adapter | None:
    """The first registered adapter that records ``module``, or None."""
    return next((a for a in _ADAPTERS if a.matches(module)), None)
