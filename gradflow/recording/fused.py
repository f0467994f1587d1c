"""Whole-sequence modules run as a weight-sharing unroll while recording (the ``fused`` adapter).

The fused kernels of ``nn.RNN/LSTM/GRU`` hide the per-step states, so during recording the
module's forward is replaced (on the instance, restored on exit) by an unroll written with the
*same Parameter objects*: values equal the fused path's up to float rounding, parameter gradients
flow to the same ``.grad``, and each layer-direction runs through its cell kind's recording kernel
(``CellKind.impl.record``), whose backward hands the recorder the total dL/ds_t of every step. The
same adapter records gradflow's own sequence layers (minGRU, minLSTM, IndRNN, LRU). The input and
state plumbing (PackedSequence, batch_first, hx, layers, directions, dropout) is shared with those
layers' plain forward (:func:`gradflow.kinds._layers.run_layers`).

For an LSTM the c-block is dL/dc_t with h_t held as a separate coordinate (the gradient arriving
through step t+1 and c_n, not the same-step path through h_t = o_t·tanh(c_t)).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .. import kinds
from ..errors import UnsupportedModuleError
from ..kinds._layers import layer_info, processing_order, run_layers
from .adapters import Adapter
from .calls import FusedCall, UnitRecord, recordable


def kind_of(module: nn.Module):
    """The registered kind that records ``module`` as a whole sequence, or None."""
    return next((k for k in kinds.kinds() if k.impl.claims(module)), None)


class _ForwardPatch:
    """Handle of an instance ``forward``: ``remove()`` restores the class's forward."""

    def __init__(self, module: nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


class SequenceAdapter(Adapter):
    name = "fused"

    def matches(self, module):
        return kind_of(module) is not None

    def attach(self, recorder, path, module):
        impl = kind_of(module).impl
        base = next(b for b in impl.module_types if isinstance(module, b))
        if type(module).forward is not base.forward:
            raise UnsupportedModuleError(
                f"module '{path}' ({type(module).__name__}) overrides forward(); gradflow can only unroll the "
                f"stock {base.__name__}.forward — record its cells or register a custom cell instead")
        impl.check_module(path, module)
        if "forward" in module.__dict__:
            raise UnsupportedModuleError(f"module '{path}' already has an instance forward (is it being recorded by "
                                         "another gradflow.record?)")
        orig = type(module).forward.__get__(module)

        def forward(input, hx=None):
            if not (recorder._active and torch.is_grad_enabled()
                    and recordable(input, next(module.parameters(), None))):
                return orig(input, hx)
            return unrolled_forward(recorder, path, module, impl, input, hx)

        module.forward = forward
        return [_ForwardPatch(module)]


SEQUENCES = SequenceAdapter()


class _Sink:
    """Receives one unit's states (forward) and δ_t (backward) from a recording kernel, in
    processing order; flips them back to position order for the reverse direction."""

    def __init__(self, recorder, call, rec, reverse, keep_states):
        self.recorder, self.call, self.rec = recorder, call, rec
        self.reverse, self.keep_states = reverse, keep_states
        self.workspace = recorder._workspace

    def forward(self, **states):
        if self.keep_states:
            for name, v in states.items():
                self.rec.states[name] = processing_order(v.detach(), self.reverse)

    def backward(self, state, grad):
        if self.recorder._active:
            self.rec.grads[state] = processing_order(grad, self.reverse)
            self.recorder._reached(self.call)


def unrolled_forward(recorder, path: str, module: nn.Module, impl, input, hx=None):
    """Drop-in replacement for ``module.forward`` that records every state's total gradient."""
    info = impl.cell_info(module)
    D = 2 if module.bidirectional else 1
    keep_states = recorder.keep == "states"
    call = FusedCall(path=path, call=recorder._next_call(path), units=[])
    order = input.unsorted_indices if isinstance(input, PackedSequence) else None
    order = order.to("cpu") if order is not None else None

    def run(layer, d, x, s0, mask):
        params = impl.layer_params(module, layer, d)
        rec = UnitRecord(unit=(path, layer, d, call.call), cell=layer_info(info, layer, impl.output_size(info), D),
                         T=x.shape[0])
        rec.mask = None if mask is None else mask.to("cpu")
        rec.order = order
        if keep_states:
            rec.inputs = x.detach()
            rec.params = params
        call.units.append(rec)
        reverse = bool(d)
        sink = _Sink(recorder, call, rec, reverse, keep_states)
        out, last = impl.record(processing_order(x, reverse), params, s0, processing_order(mask, reverse), sink)
        out = processing_order(out, reverse)
        for name, s, v in zip(info.states, s0, last):
            rec.shapes[name] = tuple(v.shape)
            if keep_states:
                rec.prev[name] = _shift(rec.states[name], s.detach(), reverse)
        rec.dtype_device = (out.dtype, out.device)
        return out, last

    result = run_layers(module, impl, path, input, hx, run)
    recorder._register_call(call)
    return result


def _shift(s: torch.Tensor, s0: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The state fed into each position: s_{t-1} (forward) or s_{t+1} (reverse), s0 at the start."""
    if reverse:
        return torch.cat([s[1:], s0.unsqueeze(0)])
    return torch.cat([s0.unsqueeze(0), s[:-1]])
