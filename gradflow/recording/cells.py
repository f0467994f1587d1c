"""Cells called in a Python loop: nn.RNNCell/LSTMCell/GRUCell and registered user cells.

Each forward call is one timestep. A forward hook replaces the state tensors in the cell's output
by aliases (``s.view_as(s)``) and registers a tensor hook on each alias: the alias receives exactly
the gradient flowing back from later uses of the state (the next step, the user's output head), not
the same-step paths inside the cell (e.g. h_t = o_t·tanh(c_t) in an LSTMCell). That is the total
derivative dL/ds_t with the state's components as independent coordinates.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import GradflowError, UnsupportedModuleError
from ..trace import CellInfo
from .calls import CellCall, store_hook

__all__ = ["register_cell", "unregister_cell", "CellSpec"]

BUILTIN_CELLS = (nn.RNNCell, nn.LSTMCell, nn.GRUCell)


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
    returns ``(args, kwargs)`` to call the cell for one step (used for Jacobians)."""

    cls: type
    states: tuple[str, ...]
    get_states: Callable[[Any], tuple]
    set_states: Callable[[Any, tuple], Any]
    get_input: Callable[[tuple, dict], tuple]
    make_args: Callable[[torch.Tensor, tuple], tuple]
    kind: str = "custom"


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
        if not names or len(set(names)) != len(names) or not all(isinstance(s, str) and s.isidentifier() for s in names):
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
    for klass in type(module).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    return None


def _builtin_kind(module) -> str:
    if isinstance(module, nn.LSTMCell):
        return "lstm"
    if isinstance(module, nn.GRUCell):
        return "gru"
    return "rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh"


def builtin_spec(module) -> CellSpec:
    lstm = isinstance(module, nn.LSTMCell)
    n = 2 if lstm else 1
    return CellSpec(
        cls=type(module),
        states=("h", "c") if lstm else ("h",),
        get_states=_default_get_states(n),
        set_states=_default_set_states(n),
        get_input=_default_get_input,
        make_args=_default_make_args(n),
        kind=_builtin_kind(module),
    )


def builtin_params(module) -> dict[str, torch.Tensor]:
    out = {"weight_ih": module.weight_ih, "weight_hh": module.weight_hh}
    if module.bias:
        out["bias_ih"] = module.bias_ih
        out["bias_hh"] = module.bias_hh
    return out


def make_forward_hook(recorder, path: str, module: nn.Module, spec: CellSpec):
    builtin = spec.kind != "custom"

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
        if not any(s.requires_grad for s in states):
            return None
        unbatched = states[0].dim() == 1
        aliases = tuple(s.view_as(s) if s.requires_grad else s for s in states)
        shapes = {name: tuple(s.shape) if not unbatched else (1, s.shape[0]) for name, s in zip(spec.states, states)}
        sizes = {name: shp[-1] for name, shp in shapes.items()}
        x, prev = spec.get_input(args, kwargs)
        in_size = int(x.shape[-1]) if isinstance(x, torch.Tensor) and x.dim() else 0
        if builtin:
            info = CellInfo(
                kind=spec.kind, input_size=mod.input_size, hidden_size=mod.hidden_size, states=spec.states,
                state_sizes=sizes, bias=bool(mod.bias), source="cell",
                cell_class=f"{type(mod).__module__}.{type(mod).__qualname__}",
            )
        else:
            info = CellInfo(
                kind="custom", input_size=in_size, hidden_size=sizes[spec.states[0]], states=spec.states,
                state_sizes=sizes, bias=False, source="custom",
                cell_class=f"{type(mod).__module__}.{type(mod).__qualname__}",
            )
        call = CellCall(path=path, t=recorder._next_step(path), cell=info, slots={}, shapes=shapes)
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
            if not builtin:
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


def check_cell_supported(path: str, module: nn.Module) -> None:
    if isinstance(module, nn.RNNCell) and module.nonlinearity not in ("tanh", "relu"):
        raise UnsupportedModuleError(f"module '{path}': nonlinearity={module.nonlinearity!r} is not supported")
