"""minGRU (Feng et al. 2024, "Were RNNs all we needed?"), sequential form: kind ``mingru``.

    z_t = σ(W_z x_t + b_z),   h̃_t = W_h x_t + b_h,   h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t

The gate and the candidate depend on the input only, so J_t = ∂h_t/∂h_{t-1} = diag(1 − z_t)
(structure ``diagonal``). Parameters per layer-direction: ``weight_ih`` [2H, F] (rows: z, then h̃)
and ``bias_ih`` [2H] (absent with ``bias=False``), initialised like ``nn.Linear``: U(−1/√F, 1/√F).
Gate statistics report z (near 0 keeps the state, near 1 takes the candidate).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._elementwise import ElementwiseKind
from ._layers import RecurrentLayer


class MinGRU(RecurrentLayer):
    """``MinGRU(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False)``; ``forward(x, h0=None) -> (output [T, B, D·H], h_n [L·D, B, H])`` as ``nn.GRU``."""

    kind_name = "mingru"


def _split(P):
    """(z's pre-activation, h̃) from P [..., 2H]: unbind, whose backward stacks (slices would each
    fill a zero [.., 2H] gradient)."""
    return P.unflatten(-1, (2, -1)).unbind(-2)


class MinGRUKind(ElementwiseKind):
    layer = MinGRU
    gate_blocks = 2

    def param_shapes(self, cell, F):
        H = cell.hidden_size
        return {"weight_ih": (2 * H, F), **({"bias_ih": (2 * H,)} if cell.bias else {})}

    def reset(self, module, p):
        bound = 1 / math.sqrt(p["weight_ih"].shape[1])
        for v in p.values():
            v.uniform_(-bound, bound)

    def project(self, p, x):
        return F.linear(x, p["weight_ih"], p.get("bias_ih"))

    def recur(self, p, P, h):
        a, cand = _split(P)
        return torch.lerp(h, cand, torch.sigmoid(a))  # h + z (h̃ − h)

    def diag(self, p, P, prev):
        return {"d": 1 - torch.sigmoid(_split(P)[0])}

    def gates(self, cell, params, x, prev, dtype):
        dtype = dtype or torch.promote_types(x.dtype, params["weight_ih"].dtype)
        P = self.project({n: v.to(dtype) for n, v in params.items()}, x.to(dtype))
        return {"z": torch.sigmoid(P[..., :cell.hidden_size])}


MINGRU = MinGRUKind()
