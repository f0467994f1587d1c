"""Copies of a recorded module are plain modules (``copy.deepcopy``, ``pickle``, ``torch.save``).

While recording, gradflow adds an instance ``forward`` and hooks to the modules it records. A copy
made with the default state would keep them: its forward would run the *original* module's
recorded unroll (its values and gradients silently the original's), and pickling fails on the
closures. :class:`PlainState` removes exactly what gradflow added from the state a copy is made of.
"""

from __future__ import annotations

from torch import nn


def hook_keys(module: nn.Module) -> dict[str, set]:
    """The keys of every hook table of ``module`` (torch's ``_forward_hooks``, ``_forward_pre_hooks`` ...)."""
    return {k: set(v) for k, v in vars(module).items() if "hook" in k and isinstance(v, dict)}


class PlainState:
    """Makes ``copy.deepcopy``, ``pickle`` and ``torch.save`` of a recorded module give the plain module.

    Installs an instance ``__getstate__`` (pickle and deepcopy look it up on the instance) returning the
    class's state without what gradflow added on attach: the instance ``forward`` and the hooks (the
    copy would otherwise run the *original* module's recorded forward, or fail to pickle the closures).
    Recorders attached to one module at once chain their ``__getstate__``; ``remove()`` puts back the
    one it replaced (or none)."""

    def __init__(self, module: nn.Module, before: dict[str, set], forward):
        self.module = module
        after = hook_keys(module)
        added = {k: keys - before.get(k, set()) for k, keys in after.items()}
        self.added = {k: keys for k, keys in added.items() if keys}
        self.forward = module.__dict__.get("forward")
        if self.forward is forward:
            self.forward = None
        self.removed = False
        self.prev = module.__dict__.get("__getstate__")
        module.__dict__["__getstate__"] = self._getstate

    def _getstate(self) -> dict:
        m = self.module
        state = dict(self.prev() if self.prev is not None else type(m).__getstate__(m))
        state.pop("__getstate__", None)
        if self.forward is not None and state.get("forward") is self.forward:
            del state["forward"]
        for name, keys in self.added.items():
            table = state.get(name)
            if isinstance(table, dict):
                state[name] = type(table)((k, v) for k, v in table.items() if k not in keys)
        return state

    def remove(self) -> None:
        self.removed = True
        d = self.module.__dict__
        if getattr(d.get("__getstate__"), "__self__", None) is not self:
            return  # a later recorder's __getstate__ is on top; it skips this one when removed
        prev = self.prev
        while prev is not None and getattr(getattr(prev, "__self__", None), "removed", False):
            prev = prev.__self__.prev
        if prev is None:
            del d["__getstate__"]
        else:
            d["__getstate__"] = prev
