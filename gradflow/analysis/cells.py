"""Closed-form cell math: gate activations and the per-step Jacobian coefficients, for all steps at once.

Every formula follows PyTorch's parameterisation (names and gate order as in :class:`CellInfo`).
With a = W_ih x_t + b_ih + W_hh s_{t-1} + b_hh, P = proj_size or H, and σ the logistic function:

* rnn_tanh / rnn_relu: h_t = φ(a); J_t = diag(φ'(a)) W_hh (φ' = 1 - h_t² or [a > 0]).
* lstm (gates i, f, g, o; state [h; c]): c_t = f c_{t-1} + i g, m_t = o tanh(c_t), h_t = W_hr m_t
  (h_t = m_t without projection). With W_i, W_f, W_g, W_o the gate blocks of W_hh [H, P]:
  ∂c/∂h_{t-1} = diag(k_i) W_i + diag(k_f) W_f + diag(k_g) W_g, k_i = g σ'(a_i), k_f = c_{t-1} σ'(a_f),
  k_g = i (1 - g²); ∂c/∂c_{t-1} = diag(f); ∂m/∂s = diag(k_o) [W_o, 0] + diag(k_c) ∂c/∂s with
  k_o = tanh(c_t) σ'(a_o), k_c = o (1 - tanh²c_t); ∂h/∂s = W_hr ∂m/∂s.
* gru (gates r, z, n): n = tanh(W_in x + b_in + r (W_hn h + b_hn)), h_t = (1 - z) n + z h_{t-1};
  J_t = diag(z) + diag(c_r) W_hr + diag(c_z) W_hz + diag(c_n) W_hn with c_z = (h_{t-1} - n) σ'(a_z),
  c_n = (1 - z)(1 - n²) r, c_r = (1 - z)(1 - n²) (W_hn h_{t-1} + b_hn) σ'(a_r).

The per-step vectors (k_*, f, z, c_*) are the *coefficients*; together with the fixed weights they
represent every J_t exactly without forming it (see :mod:`gradflow.analysis.linear`).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..errors import GradflowError
from ..trace import CellInfo

__all__ = ["gate_values"]

GATES = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
GATE_NAMES = {"lstm": ("i", "f", "g", "o"), "gru": ("r", "z", "n"), "rnn_tanh": (), "rnn_relu": ()}


def check_inputs(cell: CellInfo, params: Mapping[str, torch.Tensor], x: torch.Tensor, prev: tuple) -> None:
    """One-line GradflowError naming the parameter/state and the shape expected."""
    if not isinstance(cell, CellInfo):
        raise GradflowError(f"expected a CellInfo, got {type(cell).__name__}")
    if cell.kind not in GATES:
        raise GradflowError(f"cell kind {cell.kind!r} has no closed form (kinds: {', '.join(GATES)}); "
                            "use a custom cell's step function")
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        raise GradflowError(f"{cell.kind}: inputs x must be a tensor [T, B, F], got "
                            f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    T, B, F = x.shape
    H, G = cell.hidden_size, GATES[cell.kind]
    P = (cell.proj_size or H) if cell.kind == "lstm" else H
    want = {"weight_ih": (G * H, F), "weight_hh": (G * H, P)}
    if cell.bias:
        want.update(bias_ih=(G * H,), bias_hh=(G * H,))
    if cell.kind == "lstm" and cell.proj_size:
        want["weight_hr"] = (P, H)
    for name, shape in want.items():
        if name not in params:
            raise GradflowError(f"{cell.kind} cell (bias={cell.bias}, proj_size={cell.proj_size}): missing "
                                f"parameter {name!r} of shape {shape}")
        if tuple(params[name].shape) != shape:
            raise GradflowError(f"{cell.kind} cell: parameter {name!r} has shape {tuple(params[name].shape)}, "
                                f"expected {shape} (hidden_size={H}, input F={F})")
    sizes = (P, H) if cell.kind == "lstm" else (H,)
    if not isinstance(prev, (tuple, list)) or len(prev) != len(sizes):
        raise GradflowError(f"{cell.kind}: prev must be a tuple of {len(sizes)} state tensor(s) [T, B, S]")
    for name, s, size in zip(("h", "c"), prev, sizes):
        if tuple(s.shape) != (T, B, size):
            raise GradflowError(f"{cell.kind}: previous state {name!r} has shape {tuple(s.shape)}, "
                                f"expected {(T, B, size)}")


def _pre(params, x, h, dtype):
    """(W_ih x + b_ih, W_hh h + b_hh) for all steps: one GEMM each over the flattened [T*B] rows,
    the bias added by the GEMM itself (no second pass over a fresh [T, B, G*H] buffer)."""
    w_ih, w_hh = params["weight_ih"].to(dtype), params["weight_hh"].to(dtype)
    x2, h2 = x.to(dtype).reshape(-1, x.shape[-1]), h.to(dtype).reshape(-1, h.shape[-1])
    if "bias_ih" in params:
        gi = torch.addmm(params["bias_ih"].to(dtype), x2, w_ih.T)
        gh = torch.addmm(params["bias_hh"].to(dtype), h2, w_hh.T)
    else:
        gi, gh = x2 @ w_ih.T, h2 @ w_hh.T
    lead = tuple(x.shape[:-1])
    return gi.view(*lead, -1), gh.view(*lead, -1)


def forward(cell: CellInfo, params, x, prev, dtype=None):
    """Gate activations and Jacobian coefficients for every step: dict of [T, B, H] tensors.

    Keys: gates (``i f g o`` / ``r z n``), and the coefficients named in the module docstring
    (``d``; ``k_i k_f k_g k_o k_c f``; ``z c_r c_z c_n``). The gate coefficients are views of one
    stacked tensor in W_hh's gate order, also returned: ``k4`` [T, B, 4H] (LSTM), ``c3`` [T, B, 3H]
    (GRU). Computed in place where possible: every fresh multi-MB buffer costs page faults."""
    check_inputs(cell, params, x, prev)
    if dtype is None:
        dtype = torch.promote_types(x.dtype, params["weight_hh"].dtype)
        for s in prev:
            dtype = torch.promote_types(dtype, s.dtype)
    H = cell.hidden_size
    h = prev[0].to(dtype)
    gi, gh = _pre(params, x, h, dtype)
    if cell.kind in ("rnn_tanh", "rnn_relu"):
        a = gi.add_(gh)
        if cell.kind == "rnn_tanh":
            out = torch.tanh(a)
            return {"a": a, "h": out, "d": torch.addcmul(torch.ones_like(out), out, out, value=-1)}
        d = (a > 0).to(dtype)
        return {"a": a, "h": torch.relu(a), "d": torch.where(torch.isnan(a), a, d)}  # NaN stays NaN, not "dead"
    if cell.kind == "lstm":
        c_prev = prev[1].to(dtype)
        a = gi.add_(gh)  # [.., 4H] pre-activations, gates i f g o
        act = torch.empty_like(a)
        torch.sigmoid(a, out=act)
        torch.tanh(a[..., 2 * H:3 * H], out=act[..., 2 * H:3 * H])
        i, f, g, o = act.split(H, -1)
        c = torch.addcmul(f * c_prev, i, g)
        tc = torch.tanh(c)
        k4 = torch.empty_like(a)  # σ'(a) = σ(1 - σ) for i, f, o; tanh' = 1 - g² for g
        torch.addcmul(act, act, act, value=-1, out=k4)
        k_i, k_f, k_g, k_o = k4.split(H, -1)
        k_g.add_(1).sub_(g)  # g - g² + 1 - g = 1 - g², in place
        k_i.mul_(g)
        k_f.mul_(c_prev)
        k_g.mul_(i)
        k_o.mul_(tc)
        k_c = torch.addcmul(torch.ones_like(tc), tc, tc, value=-1).mul_(o)
        return {"i": i, "f": f, "g": g, "o": o, "c": c, "k4": k4,
                "k_i": k_i, "k_f": k_f, "k_g": k_g, "k_o": k_o, "k_c": k_c}
    # gru
    rz = torch.sigmoid(gi[..., :2 * H].add_(gh[..., :2 * H]))
    r, z = rz.split(H, -1)
    hn = gh[..., 2 * H:]
    n = torch.tanh(torch.addcmul(gi[..., 2 * H:], r, hn))
    c3 = torch.empty_like(gi)
    c_r, c_z, c_n = c3.split(H, -1)
    dn = torch.addcmul(torch.ones_like(n), n, n, value=-1).mul_(1 - z)  # (1 - z)(1 - n²)
    torch.mul(dn, r, out=c_n)
    torch.addcmul(r, r, r, value=-1, out=c_r).mul_(hn).mul_(dn)  # dn · hn · σ'(a_r)
    torch.addcmul(z, z, z, value=-1, out=c_z).mul_(h - n)  # (h - n) · σ'(a_z)
    return {"r": r, "z": z, "n": n, "c3": c3, "c_z": c_z, "c_n": c_n, "c_r": c_r}


def gate_values(cell: CellInfo, params: Mapping[str, torch.Tensor], x: torch.Tensor, prev: tuple,
                dtype=None) -> dict[str, torch.Tensor]:
    """Gate activations of every step, each [T, B, H]: LSTM ``i, f, g, o``; GRU ``r, z, n``
    (empty for tanh/ReLU RNNs). ``x`` [T, B, F]; ``prev`` the tuple of states fed into each step."""
    out = forward(cell, params, x, prev, dtype)
    return {g: out[g] for g in GATE_NAMES[cell.kind]}
