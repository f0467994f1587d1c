"""The Linear Recurrent Unit (Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De 2023): kind ``lru``.

    h_t = λ ⊙ h_{t-1} + γ ⊙ (B x_t),    y_t = Re(C h_t) + D x_t,    output = GELU(y_t) (or y_t)

with a complex diagonal λ = exp(−exp(ν) + i·exp(θ)), the normalisation γ = exp(γ_log) (initialised to
√(1 − |λ|²)), complex B [N, F] and C [H, N], and a real D [H, F] (the paper's D is diagonal, for
F = H). The GELU is the nonlinearity of the paper's sequence layer (``activation="none"`` leaves
y_t); its GLU, normalisation and residual are not part of this layer. N = H here.

**State convention.** The complex state h ∈ Cᴺ is recorded, returned (``h_n``) and analysed as the
real vector s = [Re h; Im h] of size 2N, so every real-valued analysis applies unchanged. Its
Jacobian is then J = [[diag(Re λ), −diag(Im λ)], [diag(Im λ), diag(Re λ)]] (structure
``complex_diagonal``), constant over time: each unit contributes |λ_j| twice to every spectrum, and
the Lyapunov exponents are ln|λ_j| = −exp(ν_j), each twice, exactly.

**Initialisation** (the paper's ring init): |λ| uniform on the ring r_min ≤ |λ| ≤ r_max of the
complex plane (ν = ln(−½ ln(u₁(r_max² − r_min²) + r_min²)), u₁ ~ U(0, 1)), phase θ uniform in
[0, max_phase], γ_log = ln √(1 − |λ|²), B ~ N(0, 1/(2F)) per real and imaginary part, C ~ N(0, 1/N)
likewise, D ~ N(0, 1/F).

Parameters per layer-direction: ``nu_log``, ``theta_log``, ``gamma_log`` [N]; ``B_re``, ``B_im``
[N, F]; ``C_re``, ``C_im`` [H, N]; ``D`` [H, F].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import GradflowError, TaskError
from ._elementwise import ElementwiseKind
from ._layers import RecurrentLayer

ACTIVATIONS = ("gelu", "none")


def _check(r_min, r_max, max_phase, activation, error=GradflowError, where="LRU"):
    nums = {"r_min": r_min, "r_max": r_max, "max_phase": max_phase}
    for k, v in nums.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise error(f"{where}: {k}={v!r} must be a finite number")
    if not (0.0 <= r_min < r_max <= 1.0):
        raise error(f"{where}: need 0 <= r_min < r_max <= 1 for the ring init, got r_min={r_min}, r_max={r_max}")
    if not max_phase > 0:
        raise error(f"{where}: max_phase={max_phase} must be > 0")
    if activation not in ACTIVATIONS:
        raise error(f"{where}: activation={activation!r} is not one of {', '.join(ACTIVATIONS)}")


class LRU(RecurrentLayer):
    """``LRU(input_size, hidden_size, num_layers=1, batch_first=False, dropout=0.0, bidirectional=False,
    r_min=0.0, r_max=1.0, max_phase=2π, activation="gelu")``; ``forward(x, h0=None) -> (output
    [T, B, D·H], h_n [L·D, B, 2H])``, h in the [Re h; Im h] convention of the module docstring."""

    kind_name = "lru"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, *, r_min: float = 0.0, r_max: float = 1.0,
                 max_phase: float = 2 * math.pi, activation: str = "gelu"):
        _check(r_min, r_max, max_phase, activation)
        self.r_min, self.r_max, self.max_phase = float(r_min), float(r_max), float(max_phase)
        self.activation = activation
        super().__init__(input_size, hidden_size, num_layers, bias=False, batch_first=batch_first, dropout=dropout,
                         bidirectional=bidirectional)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_min={self.r_min}, r_max={self.r_max}, max_phase={self.max_phase:.4g}"
                f", activation={self.activation!r}")


def _lam(p):
    """(Re λ, Im λ) [N] from ν and θ."""
    mod = torch.exp(-torch.exp(p["nu_log"]))
    phase = torch.exp(p["theta_log"])
    return mod * torch.cos(phase), mod * torch.sin(phase)


class LRUKind(ElementwiseKind):
    layer = LRU
    identity_readout = False

    def state_sizes(self, hidden, proj=0):
        return {"h": 2 * hidden}

    def output_size(self, cell):
        return cell.hidden_size

    def param_shapes(self, cell, F):
        N = H = cell.hidden_size
        return {"nu_log": (N,), "theta_log": (N,), "gamma_log": (N,), "B_re": (N, F), "B_im": (N, F),
                "C_re": (H, N), "C_im": (H, N), "D": (H, F)}

    def reset(self, module, p):
        N, Fin = p["B_re"].shape
        u1, u2 = torch.rand(N, dtype=torch.float64), torch.rand(N, dtype=torch.float64)
        r2 = u1 * (module.r_max ** 2 - module.r_min ** 2) + module.r_min ** 2
        p["nu_log"].copy_(torch.log(-0.5 * torch.log(r2)))
        p["theta_log"].copy_(torch.log(module.max_phase * u2))
        p["gamma_log"].copy_(0.5 * torch.log1p(-r2))  # ln √(1 − |λ|²), |λ|² = r2
        for name, std in (("B_re", 1 / math.sqrt(2 * Fin)), ("B_im", 1 / math.sqrt(2 * Fin)),
                          ("C_re", 1 / math.sqrt(N)), ("C_im", 1 / math.sqrt(N)), ("D", 1 / math.sqrt(Fin))):
            p[name].normal_(0.0, std)

    def project(self, p, x):
        g = torch.exp(p["gamma_log"])
        return F.linear(x, torch.cat([p["B_re"], p["B_im"]])) * torch.cat([g, g])

    def prepare(self, p):
        """λ as the two factors of s -> λ·s on [Re h; Im h]: A = [Re λ; Re λ], Bs = [−Im λ; Im λ]."""
        a, b = _lam(p)
        return {**p, "A": torch.cat([a, a]), "Bs": torch.cat([-b, b])}

    def recur(self, q, P, s):
        swapped = torch.roll(s, q["nu_log"].shape[0], -1)  # [Im h; Re h]
        return torch.addcmul(torch.addcmul(P, q["A"], s), q["Bs"], swapped)  # λ·h + γ B x

    def readout(self, p, S, x):
        return F.linear(S, torch.cat([p["C_re"], -p["C_im"]], 1)) + F.linear(x, p["D"])

    def layer_output(self, module, out):
        return F.gelu(out) if module.activation == "gelu" else out

    def diag(self, p, P, prev):
        a, b = _lam(p)
        lead = P.shape[:-1]
        return {"re": a.expand(*lead, a.shape[0]), "im": b.expand(*lead, b.shape[0])}

    def check_options(self, options):
        o = {**self.kind.options, **options}
        _check(o["r_min"], o["r_max"], o["max_phase"], o["activation"], TaskError, f"model {self.kind.name!r}")

    def build(self, input_size, hidden, layers, dropout, options):
        return LRU(input_size, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                   **{**self.kind.options, **options})


LRU_KIND = LRUKind()
