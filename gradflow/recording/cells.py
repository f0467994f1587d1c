"""Cells called in a Python loop: nn.RNNCell/LSTMCell/GRUCell and registered user cells (the ``cell``
and ``custom`` adapters).

Each forward call is one timestep. Both kinds of cell go through one table of :class:`CellSpec`
(how to read the cell's states and what kind it is): the step modules of the registered cell kinds
(``nn.RNNCell`` is a step of ``rnn_tanh``/``rnn_relu``, ...) and the classes registered with
:func:`register_cell`, whose kind is ``custom`` (Jacobians by torch.func from the recorded step).

A forward hook replaces the state tensors in the cell's output by aliases (``s.view_as(s)``) and
registers a tensor hook on each alias: the alias receives exactly the gradient flowing back from
later uses of the state (the next step, the user's output head), not the same-step paths inside
the cell (e.g. h_t = o_t·tanh(c_t) in an LSTMCell). That is the total derivative dL/ds_t with the
state's components as independent coordinates.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .. import kinds
from ..errors import GradflowError
from ..trace import CellInfo
from .adapters import Adapter
from .calls import CellCall, recordable, store_hook

__all__ = ["register_cell", "unregister_cell", "CellSpec"]

USER_SOURCE = kinds.CUSTOM.name  # CellInfo.source and adapter name of a registered user cell, after its kind


def _default_get_states(n: int):
    def get(output):
        if isinstance(output, torch.Tensor):
            return (output,)
        if isinstance(output, (tuple, list)) and len(output) >= n:
            return tuple(output[:n])
        raise GradflowError(
            f"cannot read {n} state tensor(s) from a cell output of type {type(output).__name__}; "
            "pass get_states= to register_cell"
        )

    return get


def _default_set_states(n: int):
    def put(output, states):
        if isinstance(output, torch.Tensor):
            return states[0]
        return type(output)(list(states) + list(output[n:])) if isinstance(output, list) else (
            tuple(states) + tuple(output[n:])
        )

    return put


def _default_get_input(args, kwargs):
    x = args[0] if args else kwargs.get("input", kwargs.get("x"))
    state = args[1] if len(args) > 1 else kwargs.get("hx", kwargs.get("state", kwargs.get("h")))
    if state is None:
        return x, None
    return x, (state,) if isinstance(state, torch.Tensor) else tuple(state)


def _default_make_args(n: int):
    def make(x, states):
        return (x, states[0] if n == 1 else tuple(states)), {}

    return make


@dataclass(frozen=True)
class CellSpec:
    """How to read a cell's state: ``states`` names them in order; ``get_states(output)`` returns
    the state tensors, ``set_states(output, states)`` rebuilds the output with them,
    ``get_input(args, kwargs)`` returns ``(x, prev_states or None)`` and ``make_args(x, states)``
    returns ``(args, kwargs)`` to call the cell for one step (used for Jacobians). ``kind`` names the
    cell kind; ``source`` is ``CellInfo.source``."""

    cls: type
    states: tuple[str, ...]
    get_states: Callable[[Any], tuple]
    set_states: Callable[[Any, tuple], Any]
    get_input: Callable[[tuple, dict], tuple]
    make_args: Callable[[torch.Tensor, tuple], tuple]
    kind: str = kinds.CUSTOM.name
    source: str = USER_SOURCE

    @property
    def cell_kind(self) -> "kinds.CellKind":
        return kinds.get(self.kind)

    def info(self, module: nn.Module, sizes: dict, in_size: int) -> CellInfo:
        """The CellInfo of one call: from the kind for a kind's step module, from the call's shapes
        for a user cell."""
        cls = f"{type(module).__module__}.{type(module).__qualname__}"
        impl = self.cell_kind.impl
        if not impl.needs_step:
            return impl.cell_info(module, source=self.source)
        return CellInfo(kind=self.kind, input_size=in_size, hidden_size=sizes[self.states[0]], states=self.states,
                        state_sizes=sizes, bias=False, source=self.source, cell_class=cls)

    def params(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        """The parameters a closed-form kind needs (None for user cells, linearized from their step)."""
        impl = self.cell_kind.impl
        return None if impl.needs_step else impl.cell_params(module)


_REGISTRY: dict[type, CellSpec] = {}


def register_cell(
    cls: type | None = None,
    *,
    states: Sequence[str] = ("h",),
    get_states: Callable | None = None,
    set_states: Callable | None = None,
    get_input: Callable | None = None,
    make_args: Callable | None = None,
):
    """Tell gradflow how to record a user-defined recurrent cell (an ``nn.Module`` subclass whose
    every forward call is one timestep).

    Default contract: ``forward(x [B, F], state)`` returns the new state — a tensor if ``states``
    has one name, else a tuple in ``states`` order; ``state`` is passed the same way (or None).
    Override the readers for other signatures. Usable as ``register_cell(MyCell, states=("h",))``
    or as a class decorator ``@register_cell(states=("h", "c"))``.
    """

    def do(c):
        if not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise GradflowError(f"register_cell expects an nn.Module subclass, got {c!r}")
        names = tuple(states)
        if not names or len(set(names)) != len(names) or not all(isinstance(s, str) and s.isidentifier()
                                                                  for s in names):
            raise GradflowError(f"register_cell({c.__name__}): states must be distinct identifiers, got {states!r}")
        n = len(names)
        _REGISTRY[c] = CellSpec(
            cls=c,
            states=names,
            get_states=get_states or _default_get_states(n),
            set_states=set_states or _default_set_states(n),
            get_input=get_input or _default_get_input,
            make_args=make_args or _default_make_args(n),
        )
        return c

    return do if cls is None else do(cls)


def unregister_cell(cls: type) -> None:
    _REGISTRY.pop(cls, None)


def custom_spec(module: nn.Module) -> CellSpec | None:
    """The spec of a registered user cell (the nearest registered class in the MRO), or None."""
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    return None


def builtin_spec(module: nn.Module) -> CellSpec | None:
    """The spec of a registered kind's step module (``nn.LSTMCell`` ...), or None."""
    kind = next((k for k in kinds.kinds() if k.impl.claims_cell(module)), None)
    if kind is None:
        return None
    n = len(kind.states)
    return CellSpec(cls=type(module), states=kind.states, get_states=_default_get_states(n),
                    set_states=_default_set_states(n), get_input=_default_get_input, make_args=_default_make_args(n),
                    kind=kind.name, source="cell")


class CellAdapter(Adapter):
    """Records a module called once per timestep, found by ``lookup(module) -> CellSpec | None``."""

    def __init__(self, name: str, lookup: Callable):
        self.name, self.lookup = name, lookup

    def matches(self, module):
        return self.lookup(module) is not None

    def attach(self, recorder, path, module):
        spec = self.lookup(module)
        spec.cell_kind.impl.check_module(path, module)
        return [module.register_forward_hook(make_forward_hook(recorder, path, module, spec), with_kwargs=True)]


USER_CELLS = CellAdapter(USER_SOURCE, custom_spec)
KIND_CELLS = CellAdapter("cell", builtin_spec)


def make_forward_hook(recorder, path: str, module: nn.Module, spec: CellSpec):
    with_step = spec.cell_kind.impl.needs_step

    def hook(mod, args, kwargs, output):
        if not recorder._active or not torch.is_grad_enabled():
            return None
        try:
            states = spec.get_states(output)
        except GradflowError as exc:
            raise GradflowError(f"module '{path}': {exc}") from None
        if len(states) != len(spec.states) or not all(isinstance(s, torch.Tensor) for s in states):
            raise GradflowError(
                f"module '{path}': expected {len(spec.states)} state tensor(s) {spec.states}, got {len(states)}"
            )
        if not any(s.requires_grad for s in states) or not recordable(*states):
            return None
        unbatched = states[0].dim() == 1
        aliases = tuple(s.view_as(s) if s.requires_grad else s for s in states)
        shapes = {name: tuple(s.shape) if not unbatched else (1, s.shape[0]) for name, s in zip(spec.states, states)}
        sizes = {name: shp[-1] for name, shp in shapes.items()}
        x, prev = spec.get_input(args, kwargs)
        in_size = int(x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() else 0
        info = spec.info(mod, sizes, in_size)
        loop, t = recorder._cell_loop(path, prev, shapes, aliases)
        call = CellCall(path=path, t=t, cell=info, slots={}, shapes=shapes, spec=spec, loop=loop,
                        dtype_device=(states[0].dtype, states[0].device))
        if recorder.keep == "states":
            def flat(v):
                return v.detach().reshape(1, -1) if unbatched else v.detach()

            call.inputs = flat(x) if isinstance(x, torch.Tensor) else None
            call.states = {n: flat(s) for n, s in zip(spec.states, states)}
            if prev is None:
                call.prev = {n: torch.zeros_like(call.states[n]) for n in spec.states}
            else:
                call.prev = {n: flat(p) for n, p in zip(spec.states, prev)}
            call.module = mod
            if with_step:
                call.step = _step_function(mod, spec)
        for name, a in zip(spec.states, aliases):
            call.slots[name] = None
            if a.requires_grad:
                call.handles.append(a.register_hook(store_hook(recorder, call, call.slots, name)))
        recorder._register_call(call)
        return spec.set_states(output, aliases)

    return hook


def _step_function(module: nn.Module, spec: CellSpec):
    """f(x_t, states tuple) -> states tuple for torch.func (calls the live module)."""

    def step(x, states):
        args, kwargs = spec.make_args(x, tuple(states))
        return tuple(spec.get_states(module(*args, **kwargs)))

    return step


def nearest(name: str, options) -> str:
    m = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {m[0]!r}?)" if m else ""

