"""Fused nn.RNN / nn.LSTM / nn.GRU run as a weight-sharing unroll while recording.

The fused kernels hide the per-step states, so during recording the module's forward is replaced
(on the instance, restored on exit) by an unroll written with the *same Parameter objects*: values
equal the fused path's up to float rounding, parameter gradients flow to the same ``.grad``, and
each layer-direction's kernel (``kernels``) hands the recorder the total dL/ds_t of every step.

Per step, for layer input x_t (input projection precomputed for all t in one matmul):

* RNN:  h_t = act(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)
* LSTM: [i f g o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh;  c_t = σ(f)c_{t-1} + σ(i)tanh(g);
        h_t = σ(o)tanh(c_t)  (then h_t ← W_hr h_t with proj_size)
* GRU:  r, z = σ(·);  n = tanh(W_in x_t + b_in + r(W_hn h_{t-1} + b_hn));  h_t = (1-z)n + z h_{t-1}

The recurrence of each layer-direction is a custom autograd Function (``kernels``) whose backward
computes the adjoint recursion explicitly and hands δ_t to the recorder: for an LSTM the c-block
is dL/dc_t with h_t held as a separate coordinate (the gradient arriving through step t+1 and
c_n, not the same-step path through h_t = o_t·tanh(c_t)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import UnsupportedModuleError
from ..trace import CellInfo
from . import kernels as _kernels
from .calls import FusedCall, UnitRecord

FUSED_TYPES = (nn.RNN, nn.LSTM, nn.GRU)


def cell_info(module: nn.RNNBase) -> CellInfo:
    if isinstance(module, nn.LSTM):
        kind = "lstm"
    elif isinstance(module, nn.GRU):
        kind = "gru"
    else:
        kind = "rnn_relu" if module.nonlinearity == "relu" else "rnn_tanh"
    H = module.hidden_size
    P = getattr(module, "proj_size", 0) or 0
    states = ("h", "c") if kind == "lstm" else ("h",)
    sizes = {"h": P or H}
    if kind == "lstm":
        sizes["c"] = H
    return CellInfo(
        kind=kind,
        input_size=module.input_size,
        hidden_size=H,
        proj_size=P,
        states=states,
        state_sizes=sizes,
        bias=bool(module.bias),
        source="fused",
        cell_class=f"{type(module).__module__}.{type(module).__qualname__}",
    )


def check_supported(path: str, module: nn.Module) -> None:
    base = next(b for b in FUSED_TYPES if isinstance(module, b))
    if type(module).forward is not base.forward:
        raise UnsupportedModuleError(
            f"module '{path}' ({type(module).__name__}) overrides forward(); gradflow can only unroll the "
            f"stock {base.__name__}.forward — record its cells or register a custom cell instead"
        )
    if getattr(module, "mode", None) not in ("RNN_TANH", "RNN_RELU", "LSTM", "GRU"):
        raise UnsupportedModuleError(f"module '{path}': mode={module.mode!r} is not supported")


def layer_params(module: nn.RNNBase, layer: int, direction: int) -> dict[str, torch.Tensor]:
    sfx = f"_l{layer}" + ("_reverse" if direction else "")
    out = {"weight_ih": getattr(module, "weight_ih" + sfx), "weight_hh": getattr(module, "weight_hh" + sfx)}
    if module.bias:
        out["bias_ih"] = getattr(module, "bias_ih" + sfx)
        out["bias_hh"] = getattr(module, "bias_hh" + sfx)
    if getattr(module, "proj_size", 0):
        out["weight_hr"] = getattr(module, "weight_hr" + sfx)
    return out


def _packed_index(batch_sizes: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t index, sorted batch index) of every row of PackedSequence.data, and the [T, B] mask."""
    bs = batch_sizes.to("cpu", torch.long)
    T, B = bs.numel(), int(bs[0])
    mask = torch.arange(B)[None, :] < bs[:, None]
    t_idx, b_idx = mask.nonzero(as_tuple=True)  # row-major == packed order
    return t_idx.to(device), b_idx.to(device), mask


def unrolled_forward(recorder, path: str, module: nn.RNNBase, input, hx=None):
    """Drop-in replacement for ``module.forward`` that records every state's total gradient."""
    is_lstm = isinstance(module, nn.LSTM)
    D = 2 if module.bidirectional else 1
    L = module.num_layers
    H = module.hidden_size
    P = getattr(module, "proj_size", 0) or 0
    Hout = P or H

    packed = isinstance(input, PackedSequence)
    sorted_idx = unsorted_idx = None
    mask = None
    unbatched = False
    if packed:
        data, batch_sizes, sorted_idx, unsorted_idx = input
        t_idx, b_idx, mask = _packed_index(batch_sizes, data.device)
        T, B = mask.shape
        x = data.new_zeros(T, B, data.shape[-1])
        x = x.index_put((t_idx, b_idx), data)
    else:
        x = input
        if x.dim() == 2:
            unbatched = True
            x = x.unsqueeze(1)
        elif x.dim() != 3:
            raise UnsupportedModuleError(
                f"module '{path}': input must be 2-D or 3-D (or a PackedSequence), got shape {tuple(x.shape)}"
            )
        elif module.batch_first:
            x = x.transpose(0, 1)
        T, B = x.shape[0], x.shape[1]

    if x.shape[-1] != module.input_size:
        raise UnsupportedModuleError(
            f"module '{path}': input feature size {x.shape[-1]} != input_size {module.input_size}"
        )

    # initial states [L*D, B, *]
    if hx is None:
        h0 = x.new_zeros(L * D, B, Hout)
        c0 = x.new_zeros(L * D, B, H) if is_lstm else None
    else:
        if is_lstm:
            h0, c0 = hx
        else:
            h0, c0 = hx, None
        if unbatched:
            h0 = h0.unsqueeze(1)
            c0 = c0.unsqueeze(1) if c0 is not None else None
        if sorted_idx is not None:
            h0 = h0.index_select(1, sorted_idx)
            c0 = c0.index_select(1, sorted_idx) if c0 is not None else None
    if mask is not None and bool(mask.all()):
        mask = None
    mask_dev = mask.to(x.device) if mask is not None else None

    info = cell_info(module)
    keep_states = recorder.keep == "states"
    call = FusedCall(path=path, call=recorder._next_call(path), units=[])
    order = unsorted_idx.to("cpu") if unsorted_idx is not None else None

    layer_input = x
    h_n, c_n = [], []
    for layer in range(L):
        outs = []
        for d in range(D):
            i = layer * D + d
            params = layer_params(module, layer, d)
            rec = UnitRecord(unit=(path, layer, d, call.call), cell=_layer_info(info, layer, module, D), T=T)
            rec.mask = mask
            rec.order = order
            if keep_states:
                rec.inputs = layer_input.detach()
                rec.params = params
            call.units.append(rec)
            out, hT, cT = _run_direction(
                recorder, call, rec, info.kind, layer_input, h0[i], c0[i] if is_lstm else None,
                params, reverse=bool(d), mask=mask_dev, keep_states=keep_states,
            )
            outs.append(out)
            h_n.append(hT)
            if is_lstm:
                c_n.append(cT)
        layer_out = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        if layer < L - 1 and module.dropout and module.training:
            layer_out = F.dropout(layer_out, p=module.dropout, training=True)
        layer_input = layer_out

    recorder._register_call(call)
    output = layer_input
    if D == 1 and not packed:
        # the kernel saved this tensor for its backward, and the caller may modify the output in
        # place as the fused path allows (cat, flip and packing already give a new tensor)
        output = output.clone()
    h_n = torch.stack(h_n)
    c_n = torch.stack(c_n) if is_lstm else None
    if packed:
        output = PackedSequence(output[t_idx, b_idx], batch_sizes, sorted_idx, unsorted_idx)
        if unsorted_idx is not None:
            h_n = h_n.index_select(1, unsorted_idx)
            c_n = c_n.index_select(1, unsorted_idx) if c_n is not None else None
    else:
        if unbatched:
            output = output.squeeze(1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        elif module.batch_first:
            output = output.transpose(0, 1)
    return output, ((h_n, c_n) if is_lstm else h_n)


def _layer_info(info: CellInfo, layer: int, module, D: int) -> CellInfo:
    if layer == 0:
        return info
    from dataclasses import replace

    return replace(info, input_size=D * info.state_sizes["h"])


class _Sink:
    """Receives one unit's states (forward) and δ_t (backward) from the recurrence kernels, in
    processing order; flips them back to position order for the reverse direction."""

    def __init__(self, recorder, call, rec, reverse, keep_states):
        self.recorder, self.call, self.rec = recorder, call, rec
        self.reverse, self.keep_states = reverse, keep_states
        self.workspace = recorder._workspace

    def _pos(self, x):
        return x.flip(0) if self.reverse else x

    def forward(self, **states):
        if self.keep_states:
            for name, v in states.items():
                self.rec.states[name] = self._pos(v.detach())

    def backward(self, state, grad):
        if self.recorder._active:
            self.rec.grads[state] = self._pos(grad)
            self.recorder._reached(self.call)


def _run_direction(recorder, call, rec, kind, x, h, c, params, *, reverse, mask, keep_states):
    """Unroll one layer-direction over x [T, B, F]; returns (output [T, B, P] in position order,
    h_last, c_last). The recurrence runs in processing order (time-flipped for the reverse
    direction) through a kernel whose backward hands δ_t to the recorder."""
    w_ih, w_hh = params["weight_ih"], params["weight_hh"]
    b_ih, b_hh = params.get("bias_ih"), params.get("bias_hh")
    w_hr = params.get("weight_hr")
    empty = w_hh.new_empty(0)
    if reverse:
        x = x.flip(0)
        mask = mask.flip(0) if mask is not None else None
    sink = _Sink(recorder, call, rec, reverse, keep_states)
    h0, c0 = h, c
    if kind == "gru":
        out, h = _kernels.GRURecurrence.apply(
            x, w_ih, empty if b_ih is None else b_ih, h0, w_hh, empty if b_hh is None else b_hh, mask, sink
        )
    else:
        b = empty if b_ih is None else b_ih + b_hh
        if kind == "lstm":
            out, h, c = _kernels.LSTMRecurrence.apply(
                x, w_ih, b, h0, c0, w_hh, empty if w_hr is None else w_hr, mask, sink
            )
        else:
            out, h = _kernels.RNNRecurrence.apply(x, w_ih, b, h0, w_hh, kind == "rnn_relu", mask, sink)
    if reverse:
        out = out.flip(0)
    if keep_states:
        hd = out.detach()
        rec.states["h"] = hd
        rec.prev["h"] = _shift(hd, h0.detach(), reverse)
        if kind == "lstm":
            rec.prev["c"] = _shift(rec.states["c"], c0.detach(), reverse)
    rec.shapes["h"] = tuple(h.shape)
    rec.dtype_device = (out.dtype, out.device)
    if c is not None:
        rec.shapes["c"] = tuple(c.shape)
    return out, h, c


def _shift(s: torch.Tensor, s0: torch.Tensor, reverse: bool) -> torch.Tensor:
    """The state fed into each position: s_{t-1} (forward) or s_{t+1} (reverse), s0 at the start."""
    if reverse:
        return torch.cat([s[1:], s0.unsqueeze(0)])
    return torch.cat([s0.unsqueeze(0), s[:-1]])
