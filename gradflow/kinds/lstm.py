"""The LSTM, ``lstm``: gates i, f, g, o; state (h, c) as independent coordinates; optional proj_size.

[i f g o] = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh; c_t = σ(f)c_{t-1} + σ(i)tanh(g); m_t = σ(o)tanh(c_t);
h_t = W_hr m_t (h_t = m_t without projection). Recorded from ``nn.LSTM`` (weight-sharing unroll) and
``nn.LSTMCell``. The c-block of δ_t is dL/dc_t with h_t held as a separate coordinate (the gradient
arriving through step t+1 and c_n, not the same-step path through h_t = o_t·tanh(c_t)).

Linearization (state [h; c], sizes P and H, P = proj_size or H; W_i, W_f, W_g, W_o the gate blocks
of W_hh [4H, P]): ∂c/∂h_{t-1} = diag(k_i) W_i + diag(k_f) W_f + diag(k_g) W_g with k_i = g σ'(a_i),
k_f = c_{t-1} σ'(a_f), k_g = i (1 − g²); ∂c/∂c_{t-1} = diag(f); ∂m/∂s = diag(k_o) [W_o, 0] +
diag(k_c) ∂c/∂s with k_o = tanh(c_t) σ'(a_o), k_c = o (1 − tanh²c_t); ∂h/∂s = W_hr ∂m/∂s.
Coefficients: ``k4`` [T, B, 4H] (k_i, k_f, k_g, k_o stacked in W_hh's gate order, so one product
scales every gate block at once), ``k_c`` and ``f`` [T, B, H]; weights ``weight_hh`` (and ``weight_hr``).
"""

from __future__ import annotations

import torch
from torch import nn
from ._once import once_differentiable

from ..errors import TaskError
from . import _kernel as K
from ._gated import GatedKind, hh_right, preactivations, promoted, rows_matmul


def _gate_scaled(w: torch.Tensor) -> torch.Tensor:
    """A copy of the gate-stacked ``w`` [4H, ...] with the i rows doubled and the g rows times 4.
    The backward's d_gates holds dL/da ⊙ R, R = [1/2, 1, 1/4, 1] by gate block (i, f, g, o), and
    multiplies it by weights scaled so: that saves two elementwise passes in ``_factors`` and is exact
    (powers of two)."""
    return _gate_scale_(w.clone())


def _gate_scale_(g: torch.Tensor) -> torch.Tensor:
    """``g`` [4H, ...], a gradient formed from d_gates, with the i rows doubled and the g rows
    times 4 in place: dL/dW from (dL/da ⊙ R)."""
    H = g.shape[0] // 4
    g[:H].mul_(2.0)
    g[2 * H: 3 * H].mul_(4.0)
    return g


class LSTMRecurrence(torch.autograd.Function):
    """[i f g o] = W_ih x_t + b + W_hh h_{t-1} (b = b_ih + b_hh); c_t = σ(f)c_{t-1} + σ(i)tanh(g);
    h_t = σ(o)tanh(c_t), then W_hr h_t with proj_size.

    ``fused``: the arguments of ``torch._VF.lstm`` for this layer-direction (flat weights with the
    module's own b_ih and b_hh, has_biases), or None. Two forward routes (:func:`_kernel.route`): the
    ``steps`` route runs the recurrence step by step; the ``fused`` route runs PyTorch's fused kernel
    (the plain module's own numbers), then recovers every pre-activation with one GEMM over all steps
    from the returned h_t, and c_t with one elementwise op per step. Both keep the gate activations
    (with s = σ(2a_g) in place of g = tanh(a_g) = 2s − 1, so that one sigmoid covers every gate),
    h_t, c_t and tanh(c̃_t), and share the backward."""

    @staticmethod
    def forward(ctx, x, w_ih, b, h0, c0, w_hh, w_hr, mask, sink, fused):
        x = x.contiguous()
        T, B = x.shape[:2]
        G = w_ih.shape[0]
        H = G // 4
        proj = w_hr.numel() > 0
        P = h0.shape[-1]
        # g = tanh(a_g) = 2σ(2a_g) − 1: with the g rows of the weights doubled (exact in floating point),
        # one sigmoid per step covers all four gates; the buffer keeps s = σ(2a_g) in the g block
        w_ih2, w_hh2, b2 = (K.scaled_rows(w, 2 * H, 3 * H, 2.0) for w in (w_ih, w_hh, b))
        gates = K.empty(sink, (T, B, G), x)
        K.project(x, w_ih2, b2, gates)
        cs = K.empty(sink, (T, B, H), x)  # c_t (after masking): the state
        ms = K.empty(sink, (T, B, H), x) if proj else None  # o·tanh(c̃_t) before the projection
        tcs = K.empty(sink, (T, B, H), x)  # tanh(c̃_t), for the backward's factors
        if K.route("lstm", x, mask, w_hh, fused) == "fused":
            out, h_n, c_n = torch._VF.lstm(x, (h0.unsqueeze(0), c0.unsqueeze(0)), *fused, 1, 0.0, False, False, False)
            LSTMRecurrence._recover(gates, out, cs, tcs, ms, h0, c0, w_hh2)
            h_n, c_n = h_n[0], c_n[0]
        else:
            out = K.empty(sink, (T, B, P), x)
            LSTMRecurrence._steps(gates, out, cs, tcs, ms, h0, c0, w_hh2, w_hr, mask)
            h_n, c_n = out[T - 1].clone(), cs[T - 1].clone()
        ctx.save_for_backward(x, w_ih, gates, out, cs, tcs, ms if proj else x.new_empty(0), h0, c0, w_hh, w_hr)
        ctx.mask, ctx.sink, ctx.has_b = mask, sink, b.numel() > 0
        if sink is not None:
            sink.forward(h=out, c=cs)
        return out, h_n, c_n

    @staticmethod
    def _steps(gates, out, cs, tcs, ms, h0, c0, w_hh2, w_hr, mask):
        """The step-by-step forward: gates [T, B, 4H] hold W_ih x + b (g rows doubled) and become
        [σ(i), σ(f), s, σ(o)] with s = σ(2a_g), g = 2s − 1; c_t = f c_{t-1} + 2 i s − i; tcs <- tanh(c̃_t)."""
        B, H = cs.shape[1:]
        P = out.shape[-1]
        proj = ms is not None
        ctmp = gates.new_empty(B, H) if mask is not None else None
        htmp = gates.new_empty(B, P) if mask is not None else None
        w_hh_t = K.step_weight(w_hh2)
        w_hr_t = w_hr.t() if proj else None
        A_, I_, F_ = gates.unbind(0), gates[..., :H].unbind(0), gates[..., H: 2 * H].unbind(0)
        S_, O_ = gates[..., 2 * H: 3 * H].unbind(0), gates[..., 3 * H:].unbind(0)
        C_, OUT, K_ = cs.unbind(0), out.unbind(0), tcs.unbind(0)
        M_ = ms.unbind(0) if proj else None
        h, c = h0, c0
        for t in range(len(A_)):
            A_[t].addmm_(h, w_hh_t).sigmoid_()
            i = I_[t]
            c_new = torch.mul(F_[t], c, out=C_[t] if mask is None else ctmp).addcmul_(i, S_[t], value=2).sub_(i)
            k = torch.tanh(c_new, out=K_[t])
            h_new = OUT[t] if mask is None else htmp
            if proj:
                torch.mm(torch.mul(O_[t], k, out=M_[t]), w_hr_t, out=h_new)
            else:
                torch.mul(O_[t], k, out=h_new)
            if mask is not None:
                m_t = mask[t].unsqueeze(1)
                torch.where(m_t, htmp, h, out=OUT[t])
                torch.where(m_t, c_new, c, out=C_[t])
            h, c = OUT[t], C_[t]

    @staticmethod
    def _recover(gates, out, cs, tcs, ms, h0, c0, w_hh2):
        """After the fused forward: gates [T, B, 4H] (holding W_ih x + b, g rows doubled) <- the
        activations as :meth:`_steps` leaves them, adding W_hh h_{t-1} with one GEMM per block of
        steps; cs <- c_t (one op per step); tcs <- tanh(c_t); ms <- o·tanh(c_t). Block by block, so that each block's
        activations and scan run while it is in cache."""
        T, B, G = gates.shape
        H = G // 4
        w_hh_t = w_hh2.t()
        c = c0
        for s, e in K.blocks(T, reverse=False):
            a = gates[s:e]
            if s == 0:
                a[0].addmm_(h0, w_hh_t)
                if e > 1:
                    a[1:].view((e - 1) * B, G).addmm_(out[: e - 1].view((e - 1) * B, -1), w_hh_t)
            else:
                a.view((e - s) * B, G).addmm_(out[s - 1: e - 1].view((e - s) * B, -1), w_hh_t)
            a.sigmoid_()
            cb = cs[s:e]
            i = a[..., :H]
            torch.mul(i, a[..., 2 * H: 3 * H], out=cb).mul_(2).sub_(i)  # i·g, then + f·c_{t-1} step by step
            for f_t, c_t in zip(a[..., H: 2 * H].unbind(0), cb.unbind(0)):
                c = c_t.addcmul_(f_t, c)
            torch.tanh(cb, out=tcs[s:e])
            if ms is not None:
                torch.mul(a[..., 3 * H:], tcs[s:e], out=ms[s:e])

    @staticmethod
    def _factors(gates, cs, tcs, c0, s, e, Q, A):
        """Gate-derivative factors of steps s..e-1: Q [n, B, 4H] with da = Q ⊙ [dc̃, dc̃, dc̃, dm] ⊙ R and
        A = o·(1 − tanh²c) [n, B, H], so that dc̃ = dc_in + dm ⊙ A; R = [1/2, 1, 1/4, 1] by gate block
        (:func:`_gate_scaled`). (Masked steps, where c_t is
        the carried c_{t-1} rather than c̃_t, get finite factors that only ever multiply zeros.)"""
        H = cs.shape[-1]
        a = gates[s:e]
        i, sg, o = a[..., :H], a[..., 2 * H: 3 * H], a[..., 3 * H:]
        torch.addcmul(a, a, a, value=-1, out=Q)  # a(1 − a): σ' of i, f, o; s(1 − s) = (1 − g²)/4 for g
        qi, qf, qg, qo = (Q[..., k * H: (k + 1) * H] for k in range(4))
        qi.mul_(torch.sub(sg, 0.5, out=A))  # σ'(i)·g/2 with g = 2s − 1 (A as scratch)
        qg.mul_(i)  # (1 − g²)·i/4
        if s == 0:
            qf[0].mul_(c0)
            qf[1:].mul_(cs[: e - 1])
        else:
            qf.mul_(cs[s - 1: e - 1])
        k = tcs[s:e]  # tanh(c̃_t), kept by the forward
        qo.mul_(k)
        torch.addcmul(o, o, torch.mul(k, k, out=A), value=-1, out=A)  # o(1 − tanh²c)

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hn, g_cn):
        x, w_ih, gates, out, cs, tcs, ms, h0, c0, w_hh, w_hr = ctx.saved_tensors
        mask, sink = ctx.mask, ctx.sink
        T, B, G = gates.shape
        H = G // 4
        proj = w_hr.numel() > 0
        d_gates = K.empty(sink, gates.shape, gates)  # the factors Q, then dL/d(pre-activation) in place
        d_h = K.empty(sink, out.shape, out)  # δ^h_t
        d_c = K.empty(sink, cs.shape, cs)  # δ^c_t
        torch.add(g_out[T - 1], g_hn, out=d_h[T - 1])
        d_c[T - 1] = g_cn
        A = gates.new_empty(min(T, K.BLOCK), B, H)
        dct = gates.new_empty(B, 1, H)  # dc̃_t = δ^c_t + dm_t ⊙ A_t
        dct2 = dct.view(B, H)
        dv = gates.new_empty(B, out.shape[-1]) if mask is not None else None
        dcm = gates.new_empty(B, H) if mask is not None else None
        dmb = gates.new_empty(B, H) if proj else None
        notm = None if mask is None else (~mask).unsqueeze(-1).to(gates.dtype)
        maskf = None if mask is None else mask.unsqueeze(-1).to(gates.dtype)
        q4 = d_gates.view(T, B, 4, H)
        f = gates[..., H: 2 * H]
        w_hh_s = _gate_scaled(w_hh)  # d_gates holds dL/da ⊙ R (see _factors)
        dh0 = dc0 = None
        for s, e in K.blocks(T):
            LSTMRecurrence._factors(gates, cs, tcs, c0, s, e, d_gates[s:e], A[: e - s])
            Q3, Qo = q4[s:e, :, :3].unbind(0), q4[s:e, :, 3].unbind(0)
            DA, F_, A_ = d_gates[s:e].unbind(0), f[s:e].unbind(0), A[: e - s].unbind(0)
            lo = max(s - 1, 0)
            DH, DC, GO = d_h[lo:e].unbind(0), d_c[lo:e].unbind(0), g_out[lo:e].unbind(0)
            for t in range(e - 1, s - 1, -1):
                j, k = t - s, t - lo
                dh_t, dc_t = DH[k], DC[k]
                if mask is None:
                    v, dc_in = dh_t, dc_t
                else:
                    v = torch.mul(dh_t, maskf[t], out=dv)
                    dc_in = torch.mul(dc_t, maskf[t], out=dcm)
                dm = torch.mm(v, w_hr, out=dmb) if proj else v
                torch.addcmul(dc_in, dm, A_[j], out=dct2)
                Q3[j].mul_(dct)
                Qo[j].mul_(dm)
                if t > 0:
                    dh_prev = torch.addmm(GO[k - 1], DA[j], w_hh_s, out=DH[k - 1])
                    dc_prev = torch.mul(dct2, F_[j], out=DC[k - 1])
                else:
                    dh_prev = dh0 = DA[0].matmul(w_hh_s)
                    dc_prev = dc0 = dct2 * F_[0]
                if notm is not None:
                    dh_prev.addcmul_(notm[t], dh_t)
                    dc_prev.addcmul_(notm[t], dc_t)
        del A
        if sink is not None:
            sink.backward("h", d_h)
            sink.backward("c", d_c)
        g_whh = _gate_scale_(K.recurrent_grad(d_gates, out, h0))
        g_whr = None
        if proj:
            d_ht = d_h if mask is None else d_h * maskf  # dL/dh_t through this step's own output
            g_whr = d_ht.view(T * B, -1).t().matmul(ms.view(T * B, H))
        dx, dw_ih, db = K.input_grads(ctx, d_gates, x, _gate_scaled(w_ih) if ctx.needs_input_grad[0] else w_ih,
                                      ctx.has_b)
        for g in (dw_ih, db):
            if g is not None:
                _gate_scale_(g)
        return dx, dw_ih, db, dh0, dc0, g_whh, g_whr, None, None, None


class LSTMKind(GatedKind):
    fused, cell = nn.LSTM, nn.LSTMCell
    gate_blocks = 4
    householder_from = 64  # 1 thread, B=16: S=64 2.3x, S=128 1.45x faster

    def state_sizes(self, hidden, proj=0):
        return {"h": proj or hidden, "c": hidden}

    def record(self, x, params, s0, mask, sink):
        w_ih, w_hh = params["weight_ih"], params["weight_hh"]
        empty = w_hh.new_empty(0)
        b = params["bias_ih"] + params["bias_hh"] if "bias_ih" in params else empty
        w_hr = params.get("weight_hr", empty)
        fused = (K.flat_weights(params, ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")),
                 "bias_ih" in params)
        out, h, c = LSTMRecurrence.apply(x, w_ih, b, s0[0], s0[1], w_hh, w_hr, mask, sink, fused)
        return out, (h, c)

    # ------------------------------------------------------------------ linearization
    def forward(self, cell, params, x, prev, dtype=None):
        """Gate activations and Jacobian coefficients of every step (dict of [T, B, ·] tensors).
        Computed in place where possible: every fresh multi-MB buffer costs page faults."""
        dtype = promoted(x, params, prev, dtype)
        H = cell.hidden_size
        gi, gh = preactivations(params, x, prev[0], dtype)
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
        return {"i": i, "f": f, "g": g, "o": o, "c": c, "k4": k4, "k_c": k_c}

    def linearize(self, cell, params, x, prev, dtype):
        out = self.forward(cell, params, x, prev, dtype)
        return {"k4": out["k4"], "k_c": out["k_c"], "f": out["f"]}, self.weights(cell, params, out["f"].dtype)

    def gates(self, cell, params, x, prev, dtype):
        out = self.forward(cell, params, x, prev, dtype)
        return {g: out[g] for g in ("i", "f", "g", "o")}

    def apply(self, lin, R, transpose, coef=None, unsqueeze=True):
        coef = lin.coef if coef is None else coef
        c = {n: v.unsqueeze(-2) for n, v in coef.items()} if unsqueeze else coef
        W, Wr = lin.weights["weight_hh"], lin.weights.get("weight_hr")
        H = lin.cell.hidden_size
        lead = R.shape[:-1]
        P = R.shape[-1] - H
        k4 = c["k4"].unflatten(-1, (4, H))
        if transpose:
            um = rows_matmul(R[..., :P], Wr) if Wr is not None else R[..., :P]
            uc = torch.addcmul(R[..., P:], c["k_c"], um)
            ga = torch.empty(*lead, 4, H, dtype=R.dtype, device=R.device)
            torch.mul(k4[..., :3, :], uc.unsqueeze(-2), out=ga[..., :3, :])
            torch.mul(k4[..., 3, :], um, out=ga[..., 3, :])
            out = torch.empty(*lead, R.shape[-1], dtype=R.dtype, device=R.device)
            torch.matmul(ga.flatten(-2), hh_right(lin), out=out[..., :P])
            torch.mul(c["f"], uc, out=out[..., P:])
            return out
        A = rows_matmul(R[..., :P], W.T).unflatten(-1, (4, H)).mul_(k4)
        out = torch.empty(*lead, R.shape[-1], dtype=R.dtype, device=R.device)
        dc = torch.sum(A[..., :3, :], -2, out=out[..., P:]).addcmul_(c["f"], R[..., P:])
        dm = torch.addcmul(A[..., 3, :], c["k_c"], dc)
        if Wr is not None:
            out[..., :P] = rows_matmul(dm, Wr.T)
        else:
            out[..., :P] = dm
        return out

    def dense(self, lin, out):
        W, Wr = lin.weights["weight_hh"], lin.weights.get("weight_hr")
        H = lin.cell.hidden_size
        P = out.shape[-1] - H
        k = lin.coef["k4"].unsqueeze(-1)
        C = k[..., :H, :] * W[:H]  # ∂c/∂h_prev [.., H, P]
        C.addcmul_(k[..., H:2 * H, :], W[H:2 * H]).addcmul_(k[..., 2 * H:3 * H, :], W[2 * H:3 * H])
        out[..., P:, :P] = C
        M = C.mul_(lin.coef["k_c"].unsqueeze(-1)).addcmul_(k[..., 3 * H:, :], W[3 * H:])  # ∂m/∂h_prev
        kcf = lin.coef["k_c"] * lin.coef["f"]  # ∂m/∂c_prev = diag(k_c f)
        out[..., P:, P:].zero_()
        out[..., P:, P:].diagonal(dim1=-2, dim2=-1).copy_(lin.coef["f"])
        if Wr is None:
            out[..., :P, :P] = M
            out[..., :P, P:].zero_()
            out[..., :P, P:].diagonal(dim1=-2, dim2=-1).copy_(kcf)
        else:
            out[..., :P, :P] = Wr @ M
            out[..., :P, P:] = Wr * kcf.unsqueeze(-2)

    # ------------------------------------------------------------------ the model zoo
    def check_options(self, options):
        fb = options.get("forget_bias")
        if fb is not None and (isinstance(fb, bool) or not isinstance(fb, (int, float))):
            raise TaskError(f"model {self.kind.name!r}: forget_bias must be a number, got {fb!r}")

    def apply_options(self, module, options):
        """``forget_bias`` sets b_f = b_ih_f + b_hh_f (Gers et al. 2000, Jozefowicz et al. 2015)."""
        fb = options.get("forget_bias")
        if fb is None:
            return
        H = module.hidden_size
        with torch.no_grad():
            for layer in range(module.num_layers):
                getattr(module, f"bias_ih_l{layer}")[H:2 * H] = float(fb)
                getattr(module, f"bias_hh_l{layer}")[H:2 * H] = 0.0


LSTM = LSTMKind()
