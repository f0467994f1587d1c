"""Multi-layer sequence modules: the input/state plumbing every kind shares, and gradflow's own layers.

:func:`run_layers` turns the arguments of an ``nn.RNN``-style forward (time-major or ``batch_first``
[T, B, F], unbatched [T, F], or a ``PackedSequence``; ``hx`` a tensor [L·D, B, S] for a one-state
kind, a tuple in state order otherwise) into one call per layer-direction of
``run(layer, direction, x [T, B, F], s0 tuple of [B, S_i], mask [T, B] or None)`` in *position*
order, and assembles the output and final states as the module's forward returns them. Steps past a
sequence's length (mask False) carry the state unchanged. The recorder's weight-sharing unroll of
``nn.RNN/LSTM/GRU`` and the plain forward of :class:`RecurrentLayer` both go through it.

:class:`RecurrentLayer` is the base of gradflow's own sequence layers (minGRU, minLSTM, IndRNN,
LRU): the ``nn.RNN`` constructor arguments and forward signature, parameters named
``<name>_l{layer}`` (``_reverse`` for direction 1) from the kind's ``param_shapes``, and a forward
that runs the kind's ``scan`` (plain autograd) outside ``gradflow.record`` and its recording kernel
inside.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import GradflowError, UnsupportedModuleError


def _packed_index(batch_sizes: torch.Tensor, device):
    """(t index, sorted batch index) of every row of PackedSequence.data, and the [T, B] mask."""
    bs = batch_sizes.to("cpu", torch.long)
    T, B = bs.numel(), int(bs[0])
    mask = torch.arange(B)[None, :] < bs[:, None]
    t_idx, b_idx = mask.nonzero(as_tuple=True)  # row-major == packed order
    return t_idx.to(device), b_idx.to(device), mask


def layer_info(info, layer: int, out_size: int, D: int):
    """The CellInfo of layer ``layer``: above the first, the input is the D directions' outputs."""
    return info if layer == 0 else replace(info, input_size=D * out_size)


def run_layers(module, impl, path: str, input, hx, run, *, clone_output: bool = True):
    """See the module docstring. Returns (output, h_n) — or (output, (h_n, c_n, ...)) for several
    states — shaped as the module returns them. The mask handed to ``run`` is None when every step
    exists; ``clone_output`` copies a single-direction output the kernel may have saved."""
    info = impl.cell_info(module)
    states, sizes = info.states, info.state_sizes
    D = 2 if module.bidirectional else 1
    L = module.num_layers
    packed = isinstance(input, PackedSequence)
    sorted_idx = unsorted_idx = mask = None
    unbatched = False
    if packed:
        data, batch_sizes, sorted_idx, unsorted_idx = input
        t_idx, b_idx, mask = _packed_index(batch_sizes, data.device)
        T, B = mask.shape
        x = data.new_zeros(T, B, data.shape[-1]).index_put((t_idx, b_idx), data)
    else:
        x = input
        if not isinstance(x, torch.Tensor):
            raise GradflowError(f"module '{path}': input must be a tensor or a PackedSequence, got {type(x).__name__}")
        if x.dim() == 2:
            unbatched = True
            x = x.unsqueeze(1)
        elif x.dim() != 3:
            raise UnsupportedModuleError(
                f"module '{path}': input must be 2-D or 3-D (or a PackedSequence), got shape {tuple(x.shape)}")
        elif module.batch_first:
            x = x.transpose(0, 1)
        T, B = x.shape[0], x.shape[1]
    if x.shape[-1] != module.input_size:
        raise UnsupportedModuleError(f"module '{path}': input feature size {x.shape[-1]} != input_size "
                                     f"{module.input_size}")
    s0 = _initial_states(path, hx, x, states, sizes, L * D, B, unbatched, sorted_idx)
    if mask is not None and bool(mask.all()):
        mask = None
    mask_dev = mask.to(x.device) if mask is not None else None

    layer_input = x
    finals = [[] for _ in states]
    for layer in range(L):
        outs = []
        for d in range(D):
            i = layer * D + d
            out, last = run(layer, d, layer_input, tuple(s[i] for s in s0), mask_dev)
            outs.append(impl.layer_output(module, out))
            for f, v in zip(finals, last):
                f.append(v)
        layer_out = outs[0] if D == 1 else torch.cat(outs, dim=-1)
        if layer < L - 1 and module.dropout and module.training:
            layer_out = F.dropout(layer_out, p=module.dropout, training=True)
        layer_input = layer_out
    output = layer_input
    if clone_output and D == 1 and not packed:
        # a kernel saved this tensor for its backward, and the caller may modify the output in place
        # as the fused path allows (cat, flip and packing already give a new tensor)
        output = output.clone()
    hn = [torch.stack(f) for f in finals]
    if packed:
        output = PackedSequence(output[t_idx, b_idx], batch_sizes, sorted_idx, unsorted_idx)
        if unsorted_idx is not None:
            hn = [h.index_select(1, unsorted_idx) for h in hn]
    elif unbatched:
        output = output.squeeze(1)
        hn = [h.squeeze(1) for h in hn]
    elif module.batch_first:
        output = output.transpose(0, 1)
    return output, (hn[0] if len(hn) == 1 else tuple(hn))


def _initial_states(path, hx, x, states, sizes, LD, B, unbatched, sorted_idx):
    """Initial states, one [L·D, B, S] tensor per state (zeros when ``hx`` is None)."""
    if hx is None:
        return [x.new_zeros(LD, B, sizes[s]) for s in states]
    parts = [hx] if len(states) == 1 and isinstance(hx, torch.Tensor) else list(hx)
    if len(parts) != len(states) or not all(isinstance(p, torch.Tensor) for p in parts):
        raise GradflowError(f"module '{path}': hx must be {'a tensor' if len(states) == 1 else 'a tuple'} of "
                            f"{len(states)} state(s) {states}")
    out = []
    for name, p in zip(states, parts):
        p = p.unsqueeze(1) if unbatched else p
        if sorted_idx is not None:
            p = p.index_select(1, sorted_idx)
        if tuple(p.shape) != (LD, B, sizes[name]):
            raise GradflowError(f"module '{path}': initial state {name!r} has shape {tuple(p.shape)}, expected "
                                f"{(LD, B, sizes[name])}")
        out.append(p)
    return out


def processing_order(x: torch.Tensor | None, reverse: bool):
    """Position order <-> processing order along dim 0 (a flip for the reverse direction)."""
    return x.flip(0) if reverse and x is not None else x


class RecurrentLayer(nn.Module):
    """Base of gradflow's own sequence layers (see the module docstring); ``kind_name`` names the kind."""

    kind_name = ""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False):
        super().__init__()
        name = type(self).__name__
        for what, v in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise GradflowError(f"{name}: {what} must be an integer >= 1, got {v!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise GradflowError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional = bool(bidirectional)
        impl = self.impl
        info = impl.cell_info(self)
        D = 2 if self.bidirectional else 1
        for layer in range(num_layers):
            li = layer_info(info, layer, impl.output_size(info), D)
            for d in range(D):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                for pname, shape in impl.param_shapes(li, li.input_size).items():
                    self.register_parameter(pname + sfx, nn.Parameter(torch.empty(shape)))
        self.reset_parameters()

    @property
    def impl(self):
        from . import get

        return get(self.kind_name).impl

    def reset_parameters(self) -> None:
        """The kind's initialisation, layer by layer and direction by direction."""
        D = 2 if self.bidirectional else 1
        with torch.no_grad():
            for layer in range(self.num_layers):
                for d in range(D):
                    self.impl.reset(self, self.impl.layer_params(self, layer, d))

    def forward(self, input, hx=None):
        impl = self.impl

        def run(layer, d, x, s0, mask):
            p = impl.layer_params(self, layer, d)
            rev = bool(d)
            out, last = impl.scan(processing_order(x, rev), p, s0, processing_order(mask, rev))
            return processing_order(out, rev), last

        return run_layers(self, impl, type(self).__name__, input, hx, run, clone_output=False)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for k, default in (("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False)):
            if getattr(self, k) != default:
                s += f", {k}={getattr(self, k)}"
        return s
