"""IndRNN (Li, Li, Cook, Zhu & Gao 2018), ReLU: kind ``indrnn``.

    h_t = relu(W x_t + b + u ⊙ h_{t-1})

Each unit sees only its own past through one recurrent weight u_j, so J_t = diag(u ⊙ [a_t > 0])
with a_t the pre-activation (structure ``diagonal``; a NaN pre-activation gives a NaN entry, not a
dead unit). Parameters per layer-direction: ``weight_ih`` [H, F] and ``bias_ih`` [H] (like
``nn.Linear``, U(−1/√F, 1/√F); no bias with ``bias=False``) and ``weight_hh`` [H], the vector u,
U(0, 1). The zoo's ``init="identity"`` sets u = gain (all units at the edge of stability for gain 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._elementwise import ElementwiseKind
from ._layers import RecurrentLayer


class IndRNN(RecurrentLayer):
    """``IndRNN(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False)``; ``forward(x, h0=None) -> (output [T, B, D·H], h_n [L·D, B, H])``."""

    kind_name = "indrnn"


class IndRNNKind(ElementwiseKind):
    layer = IndRNN
    inits = ("default", "identity")

    def param_shapes(self, cell, F):
        H = cell.hidden_size
        return {"weight_ih": (H, F), "weight_hh": (H,), **({"bias_ih": (H,)} if cell.bias else {})}

    def reset(self, module, p):
        bound = 1 / math.sqrt(p["weight_ih"].shape[1])
        p["weight_ih"].uniform_(-bound, bound)
        if "bias_ih" in p:
            p["bias_ih"].uniform_(-bound, bound)
        p["weight_hh"].uniform_(0.0, 1.0)

    def project(self, p, x):
        return F.linear(x, p["weight_ih"], p.get("bias_ih"))

    def recur(self, p, P, h):
        return torch.relu(torch.addcmul(P, p["weight_hh"], h))

    def diag(self, p, P, prev):
        a = torch.addcmul(P, p["weight_hh"], prev)
        d = (a > 0).to(a.dtype) * p["weight_hh"]
        return {"d": torch.where(torch.isnan(a), a, d)}

    def recurrent_blocks(self, module):
        """The per-unit recurrent weight vectors u [H], layer by layer."""
        return [getattr(module, f"weight_hh_l{layer}") for layer in range(module.num_layers)]

    def initialise(self, module, init, gain):
        if init == "identity":
            with torch.no_grad():
                for u in self.recurrent_blocks(module):
                    u.fill_(gain)


INDRNN = IndRNNKind()
