"""minLSTM (Feng et al. 2024, "Were RNNs all we needed?"), sequential form: kind ``minlstm``.

    f_t = σ(W_f x_t + b_f),  i_t = σ(W_i x_t + b_i),  h̃_t = W_h x_t + b_h,
    f′_t = f_t / (f_t + i_t),  i′_t = i_t / (f_t + i_t),   h_t = f′_t ⊙ h_{t-1} + i′_t ⊙ h̃_t

(the length-independent normalisation of the paper). The gates depend on the input only, so
J_t = diag(f′_t) (structure ``diagonal``). Parameters per layer-direction: ``weight_ih`` [3H, F]
(rows: f, i, h̃) and ``bias_ih`` [3H] (absent with ``bias=False``), initialised like ``nn.Linear``.
Gate statistics report the normalised gates f′ and i′ (they sum to 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._elementwise import ElementwiseKind
from ._layers import RecurrentLayer


class MinLSTM(RecurrentLayer):
    """``MinLSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False)``; ``forward(x, h0=None) -> (output [T, B, D·H], h_n [L·D, B, H])``. One state h
    (the minLSTM has no separate cell state)."""

    kind_name = "minlstm"


def _normalised(P):
    """(f′, i′, h̃) from the projections P [..., 3H] (unbound: its backward stacks, where slices would
    each fill a zero [.., 3H] gradient)."""
    a_f, a_i, cand = P.unflatten(-1, (3, -1)).unbind(-2)
    f, i = torch.sigmoid(a_f), torch.sigmoid(a_i)
    s = f + i
    return f / s, i / s, cand


class MinLSTMKind(ElementwiseKind):
    layer = MinLSTM
    gate_blocks = 3

    def param_shapes(self, cell, F):
        H = cell.hidden_size
        return {"weight_ih": (3 * H, F), **({"bias_ih": (3 * H,)} if cell.bias else {})}

    def reset(self, module, p):
        bound = 1 / math.sqrt(p["weight_ih"].shape[1])
        for v in p.values():
            v.uniform_(-bound, bound)

    def project(self, p, x):
        return F.linear(x, p["weight_ih"], p.get("bias_ih"))

    def recur(self, p, P, h):
        f, i, cand = _normalised(P)
        return f * h + i * cand

    def diag(self, p, P, prev):
        return {"d": _normalised(P)[0]}

    def gates(self, cell, params, x, prev, dtype):
        dtype = dtype or torch.promote_types(x.dtype, params["weight_ih"].dtype)
        f, i, _ = _normalised(self.project({n: v.to(dtype) for n, v in params.items()}, x.to(dtype)))
        return {"f": f, "i": i}


MINLSTM = MinLSTMKind()
