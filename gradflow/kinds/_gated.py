"""Shared parts of the kinds that PyTorch ships as fused modules and cells (tanh/ReLU RNN, LSTM, GRU).

Parameters as PyTorch names them, gate order as PyTorch stacks them: ``weight_ih [G·H, F]``,
``weight_hh [G·H, P]``, ``bias_ih [G·H]``, ``bias_hh [G·H]`` (absent when ``bias=False``) and, for an
LSTM with ``proj_size``, ``weight_hr [P, H]``; G = 1 (RNN), 4 (LSTM), 3 (GRU), P = proj_size or H.
"""

from __future__ import annotations

import torch
from torch import nn

from ..trace import CellInfo
from ._base import KindImpl


def promoted(x, params, prev, dtype=None):
    """The dtype a linearization is evaluated in: ``dtype``, else the promotion of inputs, W_hh, states."""
    if dtype is not None:
        return dtype
    dtype = torch.promote_types(x.dtype, params["weight_hh"].dtype)
    for s in prev:
        dtype = torch.promote_types(dtype, s.dtype)
    return dtype


def rows_matmul(R: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """R [..., n] @ W [n, m] as one GEMM over every leading dim. ``torch.matmul`` folds the leading
    dims only when they flatten to a view; otherwise (e.g. ``V.mT`` of a [.., S, 1] block, whose
    size-1 dim has stride 1) it runs a batched product that reads W once per row: 450 ms instead of
    47 ms for 1000 rows of an LSTM's W_hh [2048, 512] in float64. ``reshape`` copies R only then."""
    return R.reshape(-1, R.shape[-1]).mm(W).view(*R.shape[:-1], W.shape[-1])


def hh_right(lin) -> torch.Tensor:
    """W_hh as the right factor of R @ W_hh (the transposed products Jᵀ u): the transposed view of
    the row-major copy of W_hhᵀ that a Linearization keeps for a large W_hh
    (``Linearization.weight_hh_t``), else W_hh itself."""
    Wt = getattr(lin, "weight_hh_t", None)
    return lin.weights["weight_hh"] if Wt is None else Wt.T


def rows_matmul_hh(R: torch.Tensor, lin) -> torch.Tensor:
    """R @ W_hh by :func:`rows_matmul`, with W_hh as :func:`hh_right` gives it."""
    return rows_matmul(R, hh_right(lin))


def preactivations(params, x, h, dtype):
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


class GatedKind(KindImpl):
    """A kind recorded from ``torch.nn``'s fused module (``fused``) and cell (``cell``) with G gate blocks."""

    fused: type = nn.Module
    cell: type = nn.Module

    @property
    def module_types(self):
        return (self.fused,)

    @property
    def cell_types(self):
        return (self.cell,)

    def param_shapes(self, cell: CellInfo, F: int) -> dict[str, tuple]:
        H, G = cell.hidden_size, self.gate_blocks
        P = cell.proj_size or H
        want = {"weight_ih": (G * H, F), "weight_hh": (G * H, P)}
        if cell.bias:
            want.update(bias_ih=(G * H,), bias_hh=(G * H,))
        if cell.proj_size:
            want["weight_hr"] = (P, H)
        return want

    def param_names(self, module):
        names = super().param_names(module)
        return names + (("weight_hr",) if getattr(module, "proj_size", 0) else ())

    def weights(self, cell, params, dtype) -> dict[str, torch.Tensor]:
        w = {"weight_hh": params["weight_hh"].to(dtype)}
        if cell.proj_size:
            w["weight_hr"] = params["weight_hr"].to(dtype)
        return w

    # ------------------------------------------------------------------ the model zoo
    def build(self, input_size, hidden, layers, dropout, options):
        return self.fused(input_size, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                          **self.module_kwargs())

    def module_kwargs(self) -> dict:
        return {}

    def recurrent_blocks(self, module):
        return [b for layer in range(module.num_layers)
                for b in getattr(module, f"weight_hh_l{layer}").chunk(self.gate_blocks, dim=0)]
