"""Recurrences with a hand-written backward that yields δ_t explicitly.

Each ``*Recurrence`` is a ``torch.autograd.Function`` over one layer-direction in processing order
(time-major; the reverse direction is run on time-flipped tensors). Forward computes the input
projection W_ih x + b for all steps with one GEMM, straight into the buffer the steps then update
in place, and runs the steps without building an autograd graph per op. Backward runs the adjoint
recursion

    δ_t = ∂L/∂out_t + J_{t+1}ᵀ δ_{t+1}      (δ_{T-1} also gets ∂L/∂h_n, ∂L/∂c_n)

step by step, hands every δ_t (h, and c for LSTM) to ``sink.backward(state, tensor [T, B, S])``,
and forms the weight and input gradients with one GEMM each over all steps (as the fused kernels
do), not one per step.

``mask`` [T, B] bool (or None): where False the step does not exist for that sequence and the
state is carried unchanged (PackedSequence semantics).

Shapes: x [T, B, F]; w_ih [G·H, F]; h0 [B, P]; c0 [B, H]; w_hh [G·H, P]; w_hr [P, H] (proj) or empty.
An absent bias is passed as an empty tensor.

Large buffers come from the sink's :class:`Workspace` when there is one, so that a training loop
recorded step after step does not pay for fresh pages every step.
"""

from __future__ import annotations

import math
import threading

import torch
from torch.autograd.function import once_differentiable

_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _use_count(t: torch.Tensor) -> int:
    return _storage_use_count(t.untyped_storage()._cdata)


class Workspace:
    """Large CPU buffers reused across the training steps of one open recorder.

    A fresh multi-MB tensor costs a page fault per 4 KiB page on first touch; at T=256, B=32,
    H=256 those faults were a third of the recording overhead. A block is handed out again only
    when nothing but the pool refers to its storage (no backward still to run has it saved, no
    caller, trace or view holds it), so reuse never aliases live data. Blocks are raw bytes, so a
    forward's gate buffer can serve the next backward's gradient buffers of another shape: the pool
    holds about the most bytes live at once, not the sum over shapes. Handed-out tensors share the
    storage without being autograd views, so callers may modify outputs in place as usual.
    """

    MIN_BYTES = 1 << 20
    MAX_BLOCKS = 32

    def __init__(self):
        self._blocks: list[tuple[torch.Tensor, int]] = []  # (uint8 block, its idle use count), by size
        self._lock = threading.Lock()

    def empty(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        shape = tuple(shape)
        nbytes = math.prod(shape) * like.element_size()
        if _storage_use_count is None or like.device.type != "cpu" or nbytes < self.MIN_BYTES:
            return like.new_empty(shape)
        with self._lock:
            for block, idle in self._blocks:  # smallest free block that fits, within 2x
                size = block.numel()
                if nbytes <= size <= 2 * nbytes and _use_count(block) == idle:
                    return _typed(block, shape, like.dtype)
            block = torch.empty(nbytes, dtype=torch.uint8)
            if len(self._blocks) >= self.MAX_BLOCKS:  # forget blocks held elsewhere (e.g. by kept traces)
                self._blocks = [(b, idle) for b, idle in self._blocks if _use_count(b) == idle]
            if len(self._blocks) < self.MAX_BLOCKS:
                self._blocks.append((block, _use_count(block)))
                self._blocks.sort(key=lambda e: e[0].numel())
            return _typed(block, shape, like.dtype)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b, _ in self._blocks)


def _typed(block: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(block.untyped_storage(), 0, shape)


def _empty(sink, shape, like):
    ws = getattr(sink, "workspace", None)
    return like.new_empty(shape) if ws is None else ws.empty(shape, like)


def _project(x: torch.Tensor, w_ih: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, B, G] <- x W_ihᵀ + b, one GEMM over all steps."""
    T, B, F = x.shape
    x2 = x.reshape(T * B, F)
    o2 = out.view(T * B, -1)
    if b.numel():
        torch.addmm(b, x2, w_ih.t(), out=o2)
    else:
        torch.mm(x2, w_ih.t(), out=o2)


def _input_grads(ctx, d_pre: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor, has_b: bool):
    """Gradients of x, W_ih and b from d_pre = dL/d(W_ih x + b) [T, B, G], one GEMM each."""
    T, B, G = d_pre.shape
    d2 = d_pre.view(T * B, G)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = _empty(ctx.sink, x.shape, x)
        torch.mm(d2, w_ih, out=dx.view(T * B, -1))
    if ctx.needs_input_grad[1]:
        dw = d2.t().mm(x.reshape(T * B, -1))
    if has_b and ctx.needs_input_grad[2]:
        db = d2.sum(0)
    return dx, dw, db


def _recurrent_grad(d_pre: torch.Tensor, out: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """dL/dW for pre-activations W h_{t-1} over all steps: Σ_t d_pre_tᵀ h_{t-1}, as two GEMMs that
    read the h_t in place (no [T, B, P] copy of the shifted states).
    d_pre [T, B, G], out (the h_t) [T, B, P], h0 [B, P] -> [G, P]."""
    T, B, G = d_pre.shape
    g = d_pre[0].t().matmul(h0)
    if T > 1:
        g.addmm_(d_pre[1:].reshape((T - 1) * B, G).t(), out[:-1].reshape((T - 1) * B, -1))
    return g


def _prev(s: torch.Tensor, s0: torch.Tensor, a: int, b: int, buf: torch.Tensor) -> torch.Tensor:
    """s_{t-1} for t = a..b-1 into buf[:b-a] (s0 before the first step)."""
    buf = buf[: b - a]
    buf[0] = s0 if a == 0 else s[a - 1]
    if b - a > 1:
        buf[1:] = s[a: b - 1]
    return buf


def _dsigmoid_times(a: torch.Tensor, other: torch.Tensor, tmp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = σ'·other from the sigmoid's value a: a(1 − a)·other (out may be other)."""
    torch.mul(a, a, out=tmp)
    torch.sub(a, tmp, out=tmp)
    return torch.mul(tmp, other, out=out)


def _dtanh_times(a: torch.Tensor, other: torch.Tensor, tmp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = tanh'·other from the tanh's value a: (1 − a²)·other (out may be other)."""
    torch.mul(a, a, out=tmp)
    tmp.neg_().add_(1)
    return torch.mul(tmp, other, out=out)


# Time steps per block when a backward forms its derivative factors: vectorised over a block held
# in small reused buffers, instead of [T, B, H] temporaries whose fresh pages cost more than the
# arithmetic.
_BLOCK = 16


def _blocks(T: int):
    """(start, end) of the time blocks, last first."""
    n = min(T, _BLOCK)
    for e in range(T, 0, -n):
        yield max(0, e - n), e


class LSTMRecurrence(torch.autograd.Function):
    """[i f g o] = W_ih x_t + b + W_hh h_{t-1} (b = b_ih + b_hh); c_t = σ(f)c_{t-1} + σ(i)tanh(g);
    h_t = σ(o)tanh(c_t), then W_hr h_t with proj_size."""

    @staticmethod
    def forward(ctx, x, w_ih, b, h0, c0, w_hh, w_hr, mask, sink):
        x = x.contiguous()
        T, B = x.shape[:2]
        G = w_ih.shape[0]
        H = G // 4
        proj = w_hr.numel() > 0
        P = h0.shape[-1]
        gates = _empty(sink, (T, B, G), x)
        _project(x, w_ih, b, gates)
        out = _empty(sink, (T, B, P), x)
        cs = _empty(sink, (T, B, H), x)  # c_t (after masking): the state
        ms = _empty(sink, (T, B, H), x) if proj else None  # o·tanh(c̃_t) before the projection
        k = x.new_empty(B, H)  # tanh(c̃_t), reused
        ctmp = x.new_empty(B, H) if mask is not None else None
        htmp = x.new_empty(B, P) if mask is not None else None
        w_hh_t = w_hh.t()
        w_hr_t = w_hr.t() if proj else None
        h, c = h0, c0
        for t in range(T):
            a = gates[t].addmm_(h, w_hh_t)
            a[:, : 2 * H].sigmoid_()
            a[:, 2 * H: 3 * H].tanh_()
            a[:, 3 * H:].sigmoid_()
            i, f, g, o = a[:, :H], a[:, H: 2 * H], a[:, 2 * H: 3 * H], a[:, 3 * H:]
            c_new = torch.mul(f, c, out=cs[t] if mask is None else ctmp).addcmul_(i, g)
            torch.tanh(c_new, out=k)
            h_new = out[t] if mask is None else htmp
            if proj:
                torch.mm(torch.mul(o, k, out=ms[t]), w_hr_t, out=h_new)
            else:
                torch.mul(o, k, out=h_new)
            if mask is not None:
                m_t = mask[t].unsqueeze(1)
                torch.where(m_t, htmp, h, out=out[t])
                torch.where(m_t, c_new, c, out=cs[t])
            h, c = out[t], cs[t]
        ctx.save_for_backward(x, w_ih, gates, out, cs, ms if proj else x.new_empty(0), h0, c0, w_hh, w_hr)
        ctx.mask, ctx.sink, ctx.has_b = mask, sink, b.numel() > 0
        if sink is not None:
            sink.forward(c=cs)
        return out, out[T - 1].clone(), cs[T - 1].clone()

    @staticmethod
    def _factors(gates, cs, c0, mask, s, e, Q, A, cp, tmp):
        """Gate-derivative factors of steps s..e-1 into the block buffers: da = Q ⊙ [dc̃, dc̃, dc̃, dm]
        with Q [n, B, 4, H], and dc̃ = dc_in + dm ⊙ A with A = o·(1 − tanh²c̃) [n, B, H]."""
        n = e - s
        H = cs.shape[-1]
        Q, A, tmp = Q[:n], A[:n], tmp[:n]
        a = gates[s:e]
        i, f, g, o = a[..., :H], a[..., H: 2 * H], a[..., 2 * H: 3 * H], a[..., 3 * H:]
        cp = _prev(cs, c0, s, e, cp)  # c_{t-1}
        k = A  # A holds tanh(c̃) until the last product
        if mask is None:
            torch.tanh(cs[s:e], out=k)  # c̃_t = c_t where every step exists
        else:
            torch.mul(f, cp, out=k).addcmul_(i, g).tanh_()
        _dsigmoid_times(i, g, tmp, Q[:, :, 0])
        _dsigmoid_times(f, cp, tmp, Q[:, :, 1])
        _dtanh_times(g, i, tmp, Q[:, :, 2])
        _dsigmoid_times(o, k, tmp, Q[:, :, 3])
        _dtanh_times(k, o, tmp, A)  # last: A held tanh(c̃) = k until here

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hn, g_cn):
        x, w_ih, gates, out, cs, ms, h0, c0, w_hh, w_hr = ctx.saved_tensors
        mask, sink = ctx.mask, ctx.sink
        T, B, G = gates.shape
        H = G // 4
        proj = w_hr.numel() > 0
        d_gates = _empty(sink, gates.shape, gates)
        d_h = _empty(sink, out.shape, out)  # δ^h_t
        d_c = _empty(sink, cs.shape, cs)  # δ^c_t
        d_ht = _empty(sink, out.shape, out) if proj else None
        torch.add(g_out[T - 1], g_hn, out=d_h[T - 1])
        d_c[T - 1] = g_cn
        n = min(T, _BLOCK)
        Q = gates.new_empty(n, B, 4, H)
        A, cp, tmp = (gates.new_empty(n, B, H) for _ in range(3))
        dct = gates.new_empty(B, H)
        f = gates[..., H: 2 * H]
        notm = None if mask is None else (~mask).unsqueeze(-1).to(gates.dtype)
        dh0 = dc0 = None
        for s, e in _blocks(T):
            LSTMRecurrence._factors(gates, cs, c0, mask, s, e, Q, A, cp, tmp)
            for t in range(e - 1, s - 1, -1):
                j = t - s
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
                torch.addcmul(dc_in, dm, A[j], out=dct)
                da4 = d_gates[t].view(B, 4, H)
                torch.mul(Q[j, :, :3], dct.unsqueeze(1), out=da4[:, :3])
                torch.mul(Q[j, :, 3], dm, out=da4[:, 3])
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
        del Q, A, cp, tmp
        if sink is not None:
            sink.backward("h", d_h)
            sink.backward("c", d_c)
        g_whh = _recurrent_grad(d_gates, out, h0)
        g_whr = d_ht.view(T * B, -1).t().matmul(ms.view(T * B, H)) if proj else None
        dx, dw_ih, db = _input_grads(ctx, d_gates, x, w_ih, ctx.has_b)
        return dx, dw_ih, db, dh0, dc0, g_whh, g_whr, None, None


class GRURecurrence(torch.autograd.Function):
    """xw = W_ih x + b_ih; per step gh = W_hh h + b_hh; r, z = σ(xw_rz + gh_rz);
    n = tanh(xw_n + r·gh_n); h' = n + z(h − n)."""

    @staticmethod
    def forward(ctx, x, w_ih, b_ih, h0, w_hh, b_hh, mask, sink):
        x = x.contiguous()
        T, B = x.shape[:2]
        H = w_hh.shape[1]
        rzn = _empty(sink, (T, B, 3 * H), x)  # xw, overwritten step by step with (r, z, n)
        _project(x, w_ih, b_ih, rzn)
        hns = _empty(sink, (T, B, H), x)  # W_hn h + b_hn
        out = _empty(sink, (T, B, H), x)
        gh = x.new_empty(B, 3 * H)
        dh = x.new_empty(B, H)
        w_hh_t = w_hh.t()
        has_b = b_hh.numel() > 0
        h = h0
        for t in range(T):
            if has_b:
                torch.addmm(b_hh, h, w_hh_t, out=gh)
            else:
                torch.mm(h, w_hh_t, out=gh)
            a = rzn[t]
            a[:, : 2 * H].add_(gh[:, : 2 * H]).sigmoid_()
            r, z = a[:, :H], a[:, H: 2 * H]
            hns[t] = gh[:, 2 * H:]
            n = a[:, 2 * H:].addcmul_(r, gh[:, 2 * H:]).tanh_()
            torch.sub(h, n, out=dh)
            torch.addcmul(n, z, dh, out=out[t])
            if mask is not None:
                torch.where(mask[t].unsqueeze(1), out[t], h, out=out[t])
            h = out[t]
        ctx.save_for_backward(x, w_ih, rzn, hns, out, h0, w_hh)
        ctx.mask, ctx.sink, ctx.has_b, ctx.has_b_ih = mask, sink, has_b, b_ih.numel() > 0
        return out, out[T - 1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hn):
        x, w_ih, rzn, hns, out, h0, w_hh = ctx.saved_tensors
        mask, sink = ctx.mask, ctx.sink
        T, B, H = out.shape
        d_x = _empty(sink, (T, B, 3 * H), out)  # dL/d(W_ih x + b_ih)
        d_gh = _empty(sink, (T, B, 3 * H), out)  # dL/d(W_hh h + b_hh)
        d_h = _empty(sink, out.shape, out)
        torch.add(g_out[T - 1], g_hn, out=d_h[T - 1])
        n_ = min(T, _BLOCK)
        Fn, Fz, Fr, hp, tmp = (out.new_empty(n_, B, H) for _ in range(5))
        dv = out.new_empty(B, H) if mask is not None else None
        notm = None if mask is None else (~mask).unsqueeze(-1).to(out.dtype)
        dh0 = None
        for s, e in _blocks(T):
            a = rzn[s:e]
            r, z, n = a[..., :H], a[..., H: 2 * H], a[..., 2 * H:]
            m = e - s
            h_prev = _prev(out, h0, s, e, hp)
            # dan = dv·(1−z)(1−n²); dx_r = dan·r(1−r)·hn; dx_z = dv·z(1−z)(h_prev − n)
            fn, fz, fr, tp = Fn[:m], Fz[:m], Fr[:m], tmp[:m]
            _dtanh_times(n, torch.neg(z, out=fn).add_(1), tp, fn)
            _dsigmoid_times(z, torch.sub(h_prev, n, out=fz), tp, fz)
            _dsigmoid_times(r, hns[s:e], tp, fr)
            for t in range(e - 1, s - 1, -1):
                j = t - s
                dh_t = d_h[t]
                if mask is None:
                    v = dh_t
                else:
                    v = torch.mul(dh_t, mask[t].unsqueeze(1), out=dv)
                dx, dg = d_x[t], d_gh[t]
                dan = torch.mul(v, fn[j], out=dx[:, 2 * H:])
                torch.mul(dan, fr[j], out=dx[:, :H])
                torch.mul(v, fz[j], out=dx[:, H: 2 * H])
                dg[:, : 2 * H] = dx[:, : 2 * H]
                torch.mul(dan, r[j], out=dg[:, 2 * H:])
                if t > 0:
                    dh_prev = torch.addmm(g_out[t - 1], dg, w_hh, out=d_h[t - 1])
                else:
                    dh_prev = dh0 = dg.matmul(w_hh)
                dh_prev.addcmul_(v, z[j])
                if notm is not None:
                    dh_prev.addcmul_(notm[t], dh_t)
        del Fn, Fz, Fr, hp, tmp
        if sink is not None:
            sink.backward("h", d_h)
        g_whh = _recurrent_grad(d_gh, out, h0)
        g_bhh = d_gh.view(T * B, -1).sum(0) if ctx.has_b else None
        dx, dw_ih, db_ih = _input_grads(ctx, d_x, x, w_ih, ctx.has_b_ih)
        return dx, dw_ih, db_ih, dh0, g_whh, g_bhh, None, None


class RNNRecurrence(torch.autograd.Function):
    """h' = act(W_ih x + b + W_hh h) with b = b_ih + b_hh, act = tanh or relu."""

    @staticmethod
    def forward(ctx, x, w_ih, b, h0, w_hh, relu, mask, sink):
        x = x.contiguous()
        T, B = x.shape[:2]
        H = w_hh.shape[0]
        out = _empty(sink, (T, B, H), x)  # the pre-activations, then h_t in place
        _project(x, w_ih, b, out)
        w_hh_t = w_hh.t()
        h = h0
        for t in range(T):
            a = out[t].addmm_(h, w_hh_t)
            if relu:
                a.relu_()
            else:
                a.tanh_()
            if mask is not None:
                torch.where(mask[t].unsqueeze(1), a, h, out=a)
            h = a
        ctx.save_for_backward(x, w_ih, out, h0, w_hh)
        ctx.mask, ctx.sink, ctx.relu, ctx.has_b = mask, sink, relu, b.numel() > 0
        return out, out[T - 1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_hn):
        x, w_ih, out, h0, w_hh = ctx.saved_tensors
        mask, sink = ctx.mask, ctx.sink
        T, B, H = out.shape
        d_pre = _empty(sink, out.shape, out)
        d_h = _empty(sink, out.shape, out)
        torch.add(g_out[T - 1], g_hn, out=d_h[T - 1])
        fa = out.new_empty(min(T, _BLOCK), B, H)  # act'(pre) per block
        notm = None if mask is None else (~mask).unsqueeze(-1).to(out.dtype)
        dh0 = None
        for s, e in _blocks(T):
            f = fa[: e - s]
            if ctx.relu:
                torch.gt(out[s:e], 0, out=f)
            else:
                torch.mul(out[s:e], out[s:e], out=f)
                f.neg_().add_(1)
            if mask is not None:
                f.mul_(mask[s:e].unsqueeze(-1))
            for t in range(e - 1, s - 1, -1):
                dp = torch.mul(d_h[t], f[t - s], out=d_pre[t])
                if t > 0:
                    dh_prev = torch.addmm(g_out[t - 1], dp, w_hh, out=d_h[t - 1])
                else:
                    dh_prev = dh0 = dp.matmul(w_hh)
                if notm is not None:
                    dh_prev.addcmul_(notm[t], d_h[t])
        del fa
        if sink is not None:
            sink.backward("h", d_h)
        g_whh = _recurrent_grad(d_pre, out, h0)
        dx, dw_ih, db = _input_grads(ctx, d_pre, x, w_ih, ctx.has_b)
        return dx, dw_ih, db, dh0, g_whh, None, None, None
