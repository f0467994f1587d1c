"""The Elman RNN, ``rnn_tanh`` and ``rnn_relu``: h_t = φ(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

Recorded from ``nn.RNN`` (through the weight-sharing unroll) and ``nn.RNNCell`` (one call per
step). Linearization: J_t = diag(φ'(a_t)) W_hh with φ' = 1 − h_t² (tanh) or [a_t > 0] (ReLU; a NaN
pre-activation gives a NaN row, not a dead unit). Coefficients: ``d`` [T, B, H] = φ'(a_t);
weights: ``weight_hh`` [H, H].
"""

from __future__ import annotations

import torch
from torch import nn
from ._once import once_differentiable

from ..errors import UnsupportedModuleError
from . import _kernel as K
from ._gated import GatedKind, hh_right, preactivations, promoted, rows_matmul, rows_matmul_hh


class RNNRecurrence(torch.autograd.Function):
    """h' = act(W_ih x + b + W_hh h) with b = b_ih + b_hh, act = tanh or relu.

    ``fused``: the arguments of ``torch._VF.rnn_tanh/rnn_relu`` for this layer-direction (flat
    weights, has_biases), or None. Forward routes (:func:`_kernel.route`): ``steps`` runs the
    recurrence step by step; ``fused`` runs PyTorch's fused kernel (the plain module's own numbers),
    whose h_t are all the backward needs. Both share the backward."""

    @staticmethod
    def forward(ctx, x, w_ih, b, h0, w_hh, relu, mask, sink, fused):
        x = x.contiguous()
        T, B = x.shape[:2]
        if K.route("rnn", x, mask, w_hh, fused) == "fused":
            run = torch._VF.rnn_relu if relu else torch._VF.rnn_tanh
            out, h_n = run(x, h0.unsqueeze(0), *fused, 1, 0.0, False, False, False)
            h_n = h_n[0]
        else:
            H = w_hh.shape[0]
            out = K.empty(sink, (T, B, H), x)  # the pre-activations, then h_t in place
            K.project(x, w_ih, b, out)
            w_hh_t = K.step_weight(w_hh)
            h = h0
            for t, a in enumerate(out.unbind(0)):
                a.addmm_(h, w_hh_t)
                if relu:
                    a.relu_()
                else:
                    a.tanh_()
                if mask is not None:
                    torch.where(mask[t].unsqueeze(1), a, h, out=a)
                h = a
            h_n = out[T - 1].clone()
        ctx.save_for_backward(x, w_ih, out, h0, w_hh)
        ctx.mask, ctx.sink, ctx.relu, ctx.has_b = mask, sink, relu, b.numel() > 0
        if sink is not None:
            sink.forward(h=out)
        return out, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hn):
        x, w_ih, out, h0, w_hh = ctx.saved_tensors
        mask, sink = ctx.mask, ctx.sink
        T, B, H = out.shape
        d_pre = K.empty(sink, out.shape, out)  # act'(pre), then dL/d(pre) in place
        d_h = K.empty(sink, out.shape, out)
        torch.add(g_out[T - 1], g_hn, out=d_h[T - 1])
        notm = None if mask is None else (~mask).unsqueeze(-1).to(out.dtype)
        dh0 = None
        for s, e in K.blocks(T):
            f = d_pre[s:e]
            if ctx.relu:
                torch.gt(out[s:e], 0, out=f)
            else:
                torch.mul(out[s:e], out[s:e], out=f)
                f.neg_().add_(1)
            if mask is not None:
                f.mul_(mask[s:e].unsqueeze(-1))
            lo = max(s - 1, 0)
            DP, DH, GO = f.unbind(0), d_h[lo:e].unbind(0), g_out[lo:e].unbind(0)
            for t in range(e - 1, s - 1, -1):
                j, k = t - s, t - lo
                dp = DP[j].mul_(DH[k])
                if t > 0:
                    dh_prev = torch.addmm(GO[k - 1], dp, w_hh, out=DH[k - 1])
                else:
                    dh_prev = dh0 = dp.matmul(w_hh)
                if notm is not None:
                    dh_prev.addcmul_(notm[t], DH[k])
        if sink is not None:
            sink.backward("h", d_h)
        g_whh = K.recurrent_grad(d_pre, out, h0)
        dx, dw_ih, db = K.input_grads(ctx, d_pre, x, w_ih, ctx.has_b)
        return dx, dw_ih, db, dh0, g_whh, None, None, None, None


class RNNKind(GatedKind):
    fused, cell = nn.RNN, nn.RNNCell
    gate_blocks = 1
    householder_from = 128  # tanh: S=128 1.3x faster; S=64 1.25x slower

    def __init__(self, relu: bool):
        self.relu = relu

    def claims(self, module):
        return isinstance(module, self.fused) and (module.nonlinearity == "relu") == self.relu

    def claims_cell(self, module):
        return isinstance(module, self.cell) and (module.nonlinearity == "relu") == self.relu

    def check_module(self, path, module):
        if module.nonlinearity not in ("tanh", "relu"):
            raise UnsupportedModuleError(f"module '{path}': nonlinearity={module.nonlinearity!r} is not supported")
        mode = getattr(module, "mode", None)
        if isinstance(module, nn.RNNBase) and mode not in ("RNN_TANH", "RNN_RELU"):
            raise UnsupportedModuleError(f"module '{path}': mode={mode!r} is not supported")

    def module_kwargs(self):
        return {"nonlinearity": "relu" if self.relu else "tanh"}

    def record(self, x, params, s0, mask, sink):
        w_ih, w_hh = params["weight_ih"], params["weight_hh"]
        b = params["bias_ih"] + params["bias_hh"] if "bias_ih" in params else w_hh.new_empty(0)
        fused = (K.flat_weights(params, ("weight_ih", "weight_hh", "bias_ih", "bias_hh")), "bias_ih" in params)
        out, h = RNNRecurrence.apply(x, w_ih, b, s0[0], w_hh, self.relu, mask, sink, fused)
        return out, (h,)

    # ------------------------------------------------------------------ linearization
    def _forward(self, params, x, prev, dtype):
        gi, gh = preactivations(params, x, prev[0], promoted(x, params, prev, dtype))
        a = gi.add_(gh)
        if not self.relu:
            h = torch.tanh(a)
            return a, torch.addcmul(torch.ones_like(h), h, h, value=-1)
        d = (a > 0).to(a.dtype)
        return a, torch.where(torch.isnan(a), a, d)  # NaN stays NaN, not "dead"

    def linearize(self, cell, params, x, prev, dtype):
        _, d = self._forward(params, x, prev, dtype)
        return {"d": d}, self.weights(cell, params, d.dtype)

    def apply(self, lin, R, transpose, coef=None, unsqueeze=True):
        d = (lin.coef if coef is None else coef)["d"]
        d = d.unsqueeze(-2) if unsqueeze else d
        W = lin.weights["weight_hh"]
        return rows_matmul_hh(d * R, lin) if transpose else d * rows_matmul(R, W.T)

    def apply_rows(self, lin, R, k, transpose, full, out=None):
        if not full or out is None:
            return None
        d = lin.coef["d"][k]  # one scaling and one GEMM, written in place
        W = lin.weights["weight_hh"]
        tmp = d * R if transpose else rows_matmul(R, W.T)
        if transpose:
            torch.mm(tmp.view(-1, R.shape[-1]), hh_right(lin), out=out.view(-1, R.shape[-1]))
        else:
            torch.mul(d, tmp, out=out)
        return out

    def dense(self, lin, out):
        torch.mul(lin.coef["d"].unsqueeze(-1), lin.weights["weight_hh"], out=out)


TANH = RNNKind(relu=False)
RELU = RNNKind(relu=True)
