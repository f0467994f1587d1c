"""The GRU, ``gru``: gates r, z, n as PyTorch defines them.

r, z = σ(W_i{r,z} x_t + b_i{r,z} + W_h{r,z} h_{t-1} + b_h{r,z}); n = tanh(W_in x_t + b_in + r (W_hn h_{t-1} + b_hn));
h_t = (1 − z) n + z h_{t-1}. Recorded from ``nn.GRU`` (weight-sharing unroll) and ``nn.GRUCell``.

Linearization: J_t = diag(z) + diag(c_r) W_hr + diag(c_z) W_hz + diag(c_n) W_hn with
c_z = (h_{t-1} − n) σ'(a_z), c_n = (1 − z)(1 − n²) r, c_r = (1 − z)(1 − n²) (W_hn h_{t-1} + b_hn) σ'(a_r).
Coefficients: ``z`` [T, B, H] and ``c3`` [T, B, 3H] (c_r, c_z, c_n in W_hh's gate order); weights
``weight_hh`` [3H, H].
"""

from __future__ import annotations

import torch
from torch import nn
from ._once import once_differentiable

from . import _kernel as K
from ._gated import GatedKind, preactivations, promoted, rows_matmul, rows_matmul_hh


class GRURecurrence(torch.autograd.Function):
    """xw = W_ih x + b_ih; per step gh = W_hh h + b_hh; r, z = σ(xw_rz + gh_rz);
    n = tanh(xw_n + r·gh_n); h' = n + z(h − n).

    ``fused``: the arguments of ``torch._VF.gru`` for this layer-direction (flat weights,
    has_biases), or None. Forward routes (:func:`_kernel.route`): ``steps`` runs the recurrence step
    by step; ``fused`` runs PyTorch's fused kernel (the plain module's own numbers), then recovers
    r, z, n and W_hn h + b_hn of every step with one GEMM per block of steps and no per-step op.
    Both keep the same tensors and share the backward."""

    @staticmethod
    def forward(ctx, x, w_ih, b_ih, h0, w_hh, b_hh, mask, sink, fused):
        x = x.contiguous()
        T, B = x.shape[:2]
        H = w_hh.shape[1]
        rzn = K.empty(sink, (T, B, 3 * H), x)  # xw, overwritten with (r, z, n)
        K.project(x, w_ih, b_ih, rzn)
        hns = K.empty(sink, (T, B, H), x)  # W_hn h + b_hn
        has_b = b_hh.numel() > 0
        if K.route("gru", x, mask, w_hh, fused) == "fused":
            out, h_n = torch._VF.gru(x, h0.unsqueeze(0), *fused, 1, 0.0, False, False, False)
            GRURecurrence._recover(rzn, hns, out, h0, w_hh, b_hh)
            h_n = h_n[0]
        else:
            out = K.empty(sink, (T, B, H), x)
            GRURecurrence._steps(rzn, hns, out, h0, w_hh, b_hh, mask)
            h_n = out[T - 1].clone()
        ctx.save_for_backward(x, w_ih, rzn, hns, out, h0, w_hh)
        ctx.mask, ctx.sink, ctx.has_b, ctx.has_b_ih = mask, sink, has_b, b_ih.numel() > 0
        if sink is not None:
            sink.forward(h=out)
        return out, h_n

    @staticmethod
    def _steps(rzn, hns, out, h0, w_hh, b_hh, mask):
        T, B, G = rzn.shape
        H = G // 3
        gh = rzn.new_empty(B, 3 * H)
        dh = rzn.new_empty(B, H)
        w_hh_t = K.step_weight(w_hh)
        has_b = b_hh.numel() > 0
        RZ, N_, HN, OUT = (rzn[..., : 2 * H].unbind(0), rzn[..., 2 * H:].unbind(0), hns.unbind(0),
                           out.unbind(0))
        R_, Z_ = rzn[..., :H].unbind(0), rzn[..., H: 2 * H].unbind(0)
        gh_rz, gh_n = gh[:, : 2 * H], gh[:, 2 * H:]
        h = h0
        for t in range(T):
            if has_b:
                torch.addmm(b_hh, h, w_hh_t, out=gh)
            else:
                torch.mm(h, w_hh_t, out=gh)
            RZ[t].add_(gh_rz).sigmoid_()
            HN[t].copy_(gh_n)
            n = N_[t].addcmul_(R_[t], gh_n).tanh_()
            torch.sub(h, n, out=dh)
            torch.addcmul(n, Z_[t], dh, out=OUT[t])
            if mask is not None:
                torch.where(mask[t].unsqueeze(1), OUT[t], h, out=OUT[t])
            h = OUT[t]

    @staticmethod
    def _recover(rzn, hns, out, h0, w_hh, b_hh):
        """After the fused forward: rzn (holding W_ih x + b_ih) <- r, z, n and hns <- W_hn h_{t-1} + b_hn,
        one GEMM per block of steps from the returned h_t."""
        T, B, G = rzn.shape
        H = G // 3
        gh = rzn.new_empty(min(T, K.BLOCK), B, G)
        w_hh_t = w_hh.t()
        for s, e in K.blocks(T, reverse=False):
            n = e - s
            g = gh[:n]
            g2 = g.view(n * B, G)
            if s == 0:
                torch.mm(h0, w_hh_t, out=g[0])
                if n > 1:
                    torch.mm(out[: e - 1].view((n - 1) * B, -1), w_hh_t, out=g[1:].view((n - 1) * B, G))
            else:
                torch.mm(out[s - 1: e - 1].view(n * B, -1), w_hh_t, out=g2)
            if b_hh.numel():
                g2.add_(b_hh)
            a = rzn[s:e]
            a[..., : 2 * H].add_(g[..., : 2 * H]).sigmoid_()
            hns[s:e] = g[..., 2 * H:]
            a[..., 2 * H:].addcmul_(a[..., :H], g[..., 2 * H:]).tanh_()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hn):
        x, w_ih, rzn, hns, out, h0, w_hh = ctx.saved_tensors
        mask, sink = ctx.mask, ctx.sink
        T, B, H = out.shape
        d_x = K.empty(sink, (T, B, 3 * H), out)  # dL/d(W_ih x + b_ih)
        d_gh = K.empty(sink, (T, B, 3 * H), out)  # factors, then dL/d(W_hh h + b_hh) in place
        d_h = K.empty(sink, out.shape, out)
        torch.add(g_out[T - 1], g_hn, out=d_h[T - 1])
        n_ = min(T, K.BLOCK)
        hp, tmp = out.new_empty(n_, B, H), out.new_empty(n_, B, H)
        dv = out.new_empty(B, 1, H) if mask is not None else None
        notm = None if mask is None else (~mask).unsqueeze(-1).to(out.dtype)
        maskf = None if mask is None else mask.unsqueeze(-1).to(out.dtype)
        dh0 = None
        for s, e in K.blocks(T):
            a = rzn[s:e]
            r, z, n = a[..., :H], a[..., H: 2 * H], a[..., 2 * H:]
            m = e - s
            h_prev = K.prev(out, h0, s, e, hp)
            # dg = v·[fn·fr, fz, fn·r] with fn = (1 − z)(1 − n²), fr = r(1 − r)·hn, fz = z(1 − z)(h_prev − n);
            # dx = [dg_r, dg_z, v·fn]
            c3 = d_gh[s:e]
            fr, fz, fnr = c3[..., :H], c3[..., H: 2 * H], c3[..., 2 * H:]
            fn, tp = d_x[s:e, :, 2 * H:], tmp[:m]
            K.dtanh_times(n, torch.neg(z, out=fn).add_(1), tp, fn)
            K.dsigmoid_times(z, torch.sub(h_prev, n, out=fz), tp, fz)
            K.dsigmoid_times(r, hns[s:e], tp, fr).mul_(fn)
            torch.mul(fn, r, out=fnr)
            lo = max(s - 1, 0)
            DG3, DG, Z_ = c3.view(m, B, 3, H).unbind(0), c3.unbind(0), z.unbind(0)
            DH, DH1, GO = d_h[lo:e].unbind(0), d_h[lo:e].unsqueeze(2).unbind(0), g_out[lo:e].unbind(0)
            for t in range(e - 1, s - 1, -1):
                j, k = t - s, t - lo
                if mask is None:
                    v, v1 = DH[k], DH1[k]
                else:
                    v1 = torch.mul(DH1[k], maskf[t].unsqueeze(1), out=dv)
                    v = v1.view(B, H)
                DG3[j].mul_(v1)
                if t > 0:
                    dh_prev = torch.addmm(GO[k - 1], DG[j], w_hh, out=DH[k - 1])
                else:
                    dh_prev = dh0 = DG[0].matmul(w_hh)
                dh_prev.addcmul_(v, Z_[j])
                if notm is not None:
                    dh_prev.addcmul_(notm[t], DH[k])
            dxb = d_x[s:e]
            dxb[..., : 2 * H] = c3[..., : 2 * H]
            dxb[..., 2 * H:].mul_(d_h[s:e] if mask is None else d_h[s:e] * maskf[s:e])
        del hp, tmp
        if sink is not None:
            sink.backward("h", d_h)
        g_whh = K.recurrent_grad(d_gh, out, h0)
        g_bhh = d_gh.view(T * B, -1).sum(0) if ctx.has_b else None
        dx, dw_ih, db_ih = K.input_grads(ctx, d_x, x, w_ih, ctx.has_b_ih)
        return dx, dw_ih, db_ih, dh0, g_whh, g_bhh, None, None, None


class GRUKind(GatedKind):
    fused, cell = nn.GRU, nn.GRUCell
    gate_blocks = 3
    householder_from = 128  # S=128 1.14x faster; S=64 even

    def record(self, x, params, s0, mask, sink):
        empty = params["weight_hh"].new_empty(0)
        fused = (K.flat_weights(params, ("weight_ih", "weight_hh", "bias_ih", "bias_hh")), "bias_ih" in params)
        out, h = GRURecurrence.apply(x, params["weight_ih"], params.get("bias_ih", empty), s0[0],
                                     params["weight_hh"], params.get("bias_hh", empty), mask, sink, fused)
        return out, (h,)

    # ------------------------------------------------------------------ linearization
    def forward(self, cell, params, x, prev, dtype=None):
        """Gates r, z, n and the coefficients ``c3`` of every step."""
        dtype = promoted(x, params, prev, dtype)
        H = cell.hidden_size
        h = prev[0].to(dtype)
        gi, gh = preactivations(params, x, h, dtype)
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
        return {"r": r, "z": z, "n": n, "c3": c3}

    def linearize(self, cell, params, x, prev, dtype):
        out = self.forward(cell, params, x, prev, dtype)
        return {"z": out["z"], "c3": out["c3"]}, self.weights(cell, params, out["z"].dtype)

    def gates(self, cell, params, x, prev, dtype):
        out = self.forward(cell, params, x, prev, dtype)
        return {g: out[g] for g in ("r", "z", "n")}

    def apply(self, lin, R, transpose, coef=None, unsqueeze=True):
        coef = lin.coef if coef is None else coef
        c = {n: v.unsqueeze(-2) for n, v in coef.items()} if unsqueeze else coef
        W, H = lin.weights["weight_hh"], lin.cell.hidden_size
        c3 = c["c3"].unflatten(-1, (3, H))
        if transpose:  # Jᵀu = z u + [c_r u, c_z u, c_n u] W
            X = (c3 * R.unsqueeze(-2)).flatten(-2)
            return rows_matmul_hh(X, lin).addcmul_(c["z"], R)
        A = rows_matmul(R, W.T).unflatten(-1, (3, H)).mul_(c3)  # J v = z v + Σ_gates c_gate (W_gate v)
        return A.sum(-2).addcmul_(c["z"], R)

    def dense(self, lin, out):
        W, H = lin.weights["weight_hh"], lin.cell.hidden_size
        c = lin.coef["c3"].unsqueeze(-1)  # column scalings [.., 3H, 1]
        torch.mul(c[..., :H, :], W[:H], out=out)
        out.addcmul_(c[..., H:2 * H, :], W[H:2 * H]).addcmul_(c[..., 2 * H:, :], W[2 * H:])
        out.diagonal(dim1=-2, dim2=-1).add_(lin.coef["z"])

    def matvec_flops(self, cell):
        """J v reads all three gate blocks of W_hh [3H, H]: 6·H² flops, three times a dense product's."""
        return 6.0 * cell.hidden_size ** 2

    def dense_sweep(self, k, S):
        """A J v costs a GEMM with all three gate blocks of W_hh (3H columns): once the frame has more
        than S/3 columns, forming each J_t (vectorised over steps) and one batched J Q is cheaper."""
        return 3 * k > S


GRU = GRUKind()
