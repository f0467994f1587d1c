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
    """(W_ih x + b_ih, W_hh h + b_hh) for all steps: two GEMMs over the flattened [T*B] rows."""
    w_ih, w_hh = params["weight_ih"].to(dtype), params["weight_hh"].to(dtype)
    gi = torch.matmul(x.to(dtype), w_ih.T)
    gh = torch.matmul(h.to(dtype), w_hh.T)
    if "bias_ih" in params:
        gi = gi + params["bias_ih"].to(dtype)
        gh = gh + params["bias_hh"].to(dtype)
    return gi, gh


def forward(cell: CellInfo, params, x, prev, dtype=None):
    """Gate activations and Jacobian coefficients for every step: dict of [T, B, H] tensors.

    Keys: gates (``i f g o`` / ``r z n``), and the coefficients named in the module docstring
    (``d``; ``k_i k_f k_g k_o k_c f``; ``z c_r c_z c_n``)."""
    check_inputs(cell, params, x, prev)
    if dtype is None:
        dtype = torch.promote_types(x.dtype, params["weight_hh"].dtype)
        for s in prev:
            dtype = torch.promote_types(dtype, s.dtype)
    H = cell.hidden_size
    h = prev[0].to(dtype)
    gi, gh = _pre(params, x, h, dtype)
    if cell.kind in ("rnn_tanh", "rnn_relu"):
        a = gi + gh
        if cell.kind == "rnn_tanh":
            out = torch.tanh(a)
            return {"a": a, "h": out, "d": 1 - out * out}
        return {"a": a, "h": torch.relu(a), "d": (a > 0).to(dtype)}
    if cell.kind == "lstm":
        c_prev = prev[1].to(dtype)
        a = gi + gh
        i, f, o = (torch.sigmoid(a[..., k * H:(k + 1) * H]) for k in (0, 1, 3))
        g = torch.tanh(a[..., 2 * H:3 * H])
        c = f * c_prev + i * g
        tc = torch.tanh(c)
        return {
            "i": i, "f": f, "g": g, "o": o, "c": c,
            "k_i": g * i * (1 - i), "k_f": c_prev * f * (1 - f), "k_g": i * (1 - g * g),
            "k_o": tc * o * (1 - o), "k_c": o * (1 - tc * tc),
        }
    # gru
    r = torch.sigmoid(gi[..., :H] + gh[..., :H])
    z = torch.sigmoid(gi[..., H:2 * H] + gh[..., H:2 * H])
    hn = gh[..., 2 * H:]
    n = torch.tanh(gi[..., 2 * H:] + r * hn)
    dn = (1 - z) * (1 - n * n)
    return {"r": r, "z": z, "n": n, "c_z": (h - n) * z * (1 - z), "c_n": dn * r, "c_r": dn * hn * r * (1 - r)}


def gate_values(cell: CellInfo, params: Mapping[str, torch.Tensor], x: torch.Tensor, prev: tuple,
                dtype=None) -> dict[str, torch.Tensor]:
    """Gate activations of every step, each [T, B, H]: LSTM ``i, f, g, o``; GRU ``r, z, n``
    (empty for tanh/ReLU RNNs). ``x`` [T, B, F]; ``prev`` the tuple of states fed into each step."""
    out = forward(cell, params, x, prev, dtype)
    return {g: out[g] for g in GATE_NAMES[cell.kind]}
