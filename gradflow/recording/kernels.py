"""Recurrences with a hand-written backward that yields δ_t explicitly.

Each ``*Recurrence`` is a ``torch.autograd.Function`` over one layer-direction in processing order
(time-major; the reverse direction is run on time-flipped tensors). Forward runs the steps without
building an autograd graph per op; backward runs the adjoint recursion

    δ_t = ∂L/∂out_t + J_{t+1}ᵀ δ_{t+1}      (δ_{T-1} also gets ∂L/∂h_n, ∂L/∂c_n)

step by step, hands every δ_t (h, and c for LSTM) to ``sink.backward(state, tensor [T, B, S])``, and forms the
recurrent weight gradients with one GEMM over all steps (instead of one per step). The input
projection ``xw = W_ih x + b`` is computed outside with ordinary autograd.

``mask`` [T, B] bool (or None): where False the step does not exist for that sequence and the
state is carried unchanged (PackedSequence semantics).

Shapes: xw [T, B, G·H]; h0 [B, P]; c0 [B, H]; w_hh [G·H, P]; w_hr [P, H] (proj) or empty.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _recurrent_grad(d_pre: torch.Tensor, out: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """dL/dW for pre-activations W h_{t-1} over all steps in one GEMM: Σ_t d_pre_tᵀ h_{t-1}.
    d_pre [T, B, G], out (the h_t) [T, B, P], h0 [B, P] -> [G, P]."""
    T, B, G = d_pre.shape
    h_prev = torch.cat([h0.unsqueeze(0), out[:-1]])
    return d_pre.reshape(T * B, G).t().matmul(h_prev.reshape(T * B, -1))


def _where(m, a, b):
    return a if m is None else torch.where(m, a, b)


class LSTMRecurrence(torch.autograd.Function):
    """[i f g o] = xw_t + W_hh h_{t-1} (xw holds W_ih x + b_ih + b_hh); c_t = σ(f)c_{t-1} + σ(i)tanh(g);
    h_t = σ(o)tanh(c_t), then W_hr h_t with proj_size. Few ops per step: buffers are written in place
    and the backward's gate-derivative factors are formed for all steps at once."""

    @staticmethod
    def forward(ctx, xw, h0, c0, w_hh, w_hr, mask, sink):
        T, B, G = xw.shape
        H = G // 4
        proj = w_hr.numel() > 0
        P = h0.shape[-1]
        gates = torch.empty_like(xw)
        out = xw.new_empty(T, B, P)
        cs = xw.new_empty(T, B, H)  # c_t (after masking): the state
        ks = xw.new_empty(T, B, H)  # tanh(c̃_t)
        ms = xw.new_empty(T, B, H) if proj else None  # o·tanh(c̃_t) before the projection
        ctmp = xw.new_empty(B, H) if mask is not None else None
        htmp = xw.new_empty(B, P) if mask is not None else None
        w_hh_t = w_hh.t()
        w_hr_t = w_hr.t() if proj else None
        h, c = h0, c0
        for t in range(T):
            a = gates[t]
            torch.addmm(xw[t], h, w_hh_t, out=a)
            a[:, : 2 * H].sigmoid_()
            a[:, 2 * H: 3 * H].tanh_()
            a[:, 3 * H:].sigmoid_()
            i, f, g, o = a[:, :H], a[:, H: 2 * H], a[:, 2 * H: 3 * H], a[:, 3 * H:]
            if mask is None:
                c_new = torch.mul(f, c, out=cs[t]).addcmul_(i, g)
                k = torch.tanh(c_new, out=ks[t])
                if proj:
                    torch.matmul(torch.mul(o, k, out=ms[t]), w_hr_t, out=out[t])
                else:
                    torch.mul(o, k, out=out[t])
            else:
                m_t = mask[t].unsqueeze(1)
                c_new = torch.addcmul(f * c, i, g, out=ctmp)
                k = torch.tanh(c_new, out=ks[t])
                if proj:
                    torch.matmul(torch.mul(o, k, out=ms[t]), w_hr_t, out=htmp)
                else:
                    torch.mul(o, k, out=htmp)
                torch.where(m_t, htmp, h, out=out[t])
                torch.where(m_t, c_new, c, out=cs[t])
            h, c = out[t], cs[t]
        ctx.save_for_backward(gates, out, cs, ks, ms if proj else torch.empty(0), h0, c0, w_hh, w_hr)
        ctx.mask, ctx.sink = mask, sink
        if sink is not None:
            sink.forward(c=cs)
        return out, out[T - 1].clone(), cs[T - 1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hn, g_cn):
        gates, out, cs, ks, ms, h0, c0, w_hh, w_hr = ctx.saved_tensors
        mask = ctx.mask
        T, B, G = gates.shape
        H = G // 4
        proj = w_hr.numel() > 0
        # gate-derivative factors for all steps at once: da = Q ⊙ [dc̃, dc̃, dc̃, dm]
        i, f, g, o = gates[..., :H], gates[..., H: 2 * H], gates[..., 2 * H: 3 * H], gates[..., 3 * H:]
        c_prev = torch.cat([c0.unsqueeze(0), cs[:-1]])
        Q = gates.new_empty(T, B, 4, H)
        torch.mul(i - i * i, g, out=Q[:, :, 0])
        torch.mul(f - f * f, c_prev, out=Q[:, :, 1])
        torch.mul(1 - g * g, i, out=Q[:, :, 2])
        torch.mul(o - o * o, ks, out=Q[:, :, 3])
        kd = 1 - ks * ks
        del c_prev
        d_gates = torch.empty_like(gates)
        d_h = torch.empty_like(out)  # δ^h_t
        d_c = torch.empty_like(cs)  # δ^c_t
        d_ht = torch.empty_like(out) if proj else None
        torch.add(g_out[T - 1], g_hn, out=d_h[T - 1])
        d_c[T - 1] = g_cn
        notm = None if mask is None else (~mask).unsqueeze(-1).to(gates.dtype)
        dh0 = dc0 = None
        for t in range(T - 1, -1, -1):
            dh_t, dc_t = d_h[t], d_c[t]
            if notm is None:
                dv, dc_in = dh_t, dc_t
            else:
                m_t = mask[t].unsqueeze(1)
                dv, dc_in = dh_t * m_t, dc_t * m_t
            if proj:
                d_ht[t] = dv
                dm = dv.matmul(w_hr)
            else:
                dm = dv
            dct = torch.addcmul(dc_in, dm * o[t], kd[t])
            da4 = d_gates[t].view(B, 4, H)
            torch.mul(Q[t, :, :3], dct.unsqueeze(1), out=da4[:, :3])
            torch.mul(Q[t, :, 3], dm, out=da4[:, 3])
            da = d_gates[t]
            if t > 0:
                dh_prev = torch.addmm(g_out[t - 1], da, w_hh, out=d_h[t - 1])
                dc_prev = torch.mul(dct, f[t], out=d_c[t - 1])
            else:
                dh_prev = dh0 = da.matmul(w_hh)
                dc_prev = dc0 = dct * f[t]
            if notm is not None:
                dh_prev.addcmul_(notm[t], dh_t)
                dc_prev.addcmul_(notm[t], dc_t)
        if ctx.sink is not None:
            ctx.sink.backward("h", d_h)
            ctx.sink.backward("c", d_c)
        del Q, kd
        g_whh = _recurrent_grad(d_gates, out, h0)
        g_whr = d_ht.reshape(T * B, -1).t().matmul(ms.reshape(T * B, H)) if proj else None
        return d_gates, dh0, dc0, g_whh, g_whr, None, None


class GRURecurrence(torch.autograd.Function):
    """xw = W_ih x + b_ih; per step gh = W_hh h + b_hh; r, z = σ(xw_rz + gh_rz);
    n = tanh(xw_n + r·gh_n); h' = n + z(h − n)."""

    @staticmethod
    def forward(ctx, xw, h0, w_hh, b_hh, mask, sink):
        T, B, G = xw.shape
        H = G // 3
        rz = xw.new_empty(T, B, 2 * H)
        ns = xw.new_empty(T, B, H)
        hns = xw.new_empty(T, B, H)  # W_hn h + b_hn
        out = xw.new_empty(T, B, H)
        w_hh_t = w_hh.t()
        has_b = b_hh.numel() > 0
        h = h0
        for t in range(T):
            gh = torch.addmm(b_hh, h, w_hh_t) if has_b else h.matmul(w_hh_t)
            x = xw[t]
            torch.add(x[:, : 2 * H], gh[:, : 2 * H], out=rz[t]).sigmoid_()
            r, z = rz[t, :, :H], rz[t, :, H:]
            hns[t] = gh[:, 2 * H:]
            n = torch.addcmul(x[:, 2 * H:], r, gh[:, 2 * H:], out=ns[t]).tanh_()
            h_new = torch.addcmul(n, z, h - n)
            h = _where(None if mask is None else mask[t].unsqueeze(1), h_new, h)
            out[t] = h
        ctx.save_for_backward(rz, ns, hns, out, h0, w_hh)
        ctx.mask, ctx.sink, ctx.has_b = mask, sink, has_b
        return out, h

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hn):
        rz, ns, hns, out, h0, w_hh = ctx.saved_tensors
        mask = ctx.mask
        T, B, H = out.shape
        d_x = out.new_empty(T, B, 3 * H)
        d_gh = out.new_empty(T, B, 3 * H)
        d_h = torch.empty_like(out)
        dh = g_hn
        for t in range(T - 1, -1, -1):
            dh_t = g_out[t] + dh
            d_h[t] = dh_t
            h_prev = out[t - 1] if t > 0 else h0
            r, z, n = rz[t, :, :H], rz[t, :, H:], ns[t]
            m_t = None if mask is None else mask[t].unsqueeze(1)
            dv = dh_t if m_t is None else dh_t * m_t
            dn = dv * (1 - z)
            dan = dn * (1 - n * n)
            dx, dg = d_x[t], d_gh[t]
            torch.mul(dan * hns[t], r * (1 - r), out=dx[:, :H])
            torch.mul(dv * (h_prev - n), z * (1 - z), out=dx[:, H: 2 * H])
            dx[:, 2 * H:] = dan
            dg[:, : 2 * H] = dx[:, : 2 * H]
            torch.mul(dan, r, out=dg[:, 2 * H:])
            dh_prev = torch.addmm(dv * z, dg, w_hh)
            if m_t is not None:
                dh_prev = torch.where(m_t, dh_prev, dh_t)
            dh = dh_prev
        if ctx.sink is not None:
            ctx.sink.backward("h", d_h)
        g_whh = _recurrent_grad(d_gh, out, h0)
        g_bhh = d_gh.sum((0, 1)) if ctx.has_b else None
        return d_x, dh, g_whh, g_bhh, None, None


class RNNRecurrence(torch.autograd.Function):
    """xw = W_ih x + b_ih + b_hh; h' = act(xw + W_hh h), act = tanh or relu."""

    @staticmethod
    def forward(ctx, xw, h0, w_hh, relu, mask, sink):
        T, B, H = xw.shape
        out = torch.empty_like(xw)
        w_hh_t = w_hh.t()
        h = h0
        for t in range(T):
            pre = torch.addmm(xw[t], h, w_hh_t)
            h_new = pre.relu_() if relu else pre.tanh_()
            h = _where(None if mask is None else mask[t].unsqueeze(1), h_new, h)
            out[t] = h
        ctx.save_for_backward(out, h0, w_hh)
        ctx.mask, ctx.sink, ctx.relu = mask, sink, relu
        return out, h

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hn):
        out, h0, w_hh = ctx.saved_tensors
        mask = ctx.mask
        T, B, H = out.shape
        d_pre = torch.empty_like(out)
        d_h = torch.empty_like(out)
        dh = g_hn
        for t in range(T - 1, -1, -1):
            dh_t = g_out[t] + dh
            d_h[t] = dh_t
            h = out[t]
            m_t = None if mask is None else mask[t].unsqueeze(1)
            dv = dh_t if m_t is None else dh_t * m_t
            dp = d_pre[t]
            if ctx.relu:
                torch.mul(dv, h > 0, out=dp)
            else:
                torch.mul(dv, 1 - h * h, out=dp)
            dh_prev = dp.matmul(w_hh)
            if m_t is not None:
                dh_prev = torch.where(m_t, dh_prev, dh_t)
            dh = dh_prev
        if ctx.sink is not None:
            ctx.sink.backward("h", d_h)
        g_whh = _recurrent_grad(d_pre, out, h0)
        return d_pre, dh, g_whh, None, None, None
