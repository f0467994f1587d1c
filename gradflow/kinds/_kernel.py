"""Helpers shared by the recording kernels of the kinds (``*Recurrence`` autograd Functions).

A kernel runs one layer-direction in processing order (time-major; the reverse direction is run
on time-flipped tensors). Forward computes the input projection W_ih x + b for all steps with one
GEMM, straight into the buffer the steps then update in place, and runs the steps without
building an autograd graph per op. Backward runs the adjoint recursion

    δ_t = ∂L/∂out_t + J_{t+1}ᵀ δ_{t+1}      (δ_{T-1} also gets ∂L/∂s_n)

step by step, hands every δ_t to ``sink.backward(state, tensor [T, B, S])``, and forms the weight
and input gradients with one GEMM each over all steps (as the fused kernels do), not one per step.

``mask`` [T, B] bool (or None): where False the step does not exist for that sequence and the
state is carried unchanged (PackedSequence semantics). An absent bias is an empty tensor.

Large buffers come from the sink's workspace (``sink.workspace.empty(shape, like)``) when there is
one, so that a training loop recorded step after step does not pay for fresh pages every step.
"""

from __future__ import annotations

import torch


def empty(sink, shape, like):
    """A new tensor of ``shape`` like ``like``, from the sink's workspace when it has one."""
    ws = getattr(sink, "workspace", None)
    return like.new_empty(shape) if ws is None else ws.empty(shape, like)


def project(x: torch.Tensor, w_ih: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, B, G] <- x W_ihᵀ + b, one GEMM over all steps."""
    T, B, F = x.shape
    x2 = x.reshape(T * B, F)
    o2 = out.view(T * B, -1)
    if b.numel():
        torch.addmm(b, x2, w_ih.t(), out=o2)
    else:
        torch.mm(x2, w_ih.t(), out=o2)


def input_grads(ctx, d_pre: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor, has_b: bool):
    """Gradients of x, W_ih and b from d_pre = dL/d(W_ih x + b) [T, B, G], one GEMM each."""
    T, B, G = d_pre.shape
    d2 = d_pre.view(T * B, G)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = empty(ctx.sink, x.shape, x)
        torch.mm(d2, w_ih, out=dx.view(T * B, -1))
    if ctx.needs_input_grad[1]:
        dw = d2.t().mm(x.reshape(T * B, -1))
    if has_b and ctx.needs_input_grad[2]:
        db = d2.sum(0)
    return dx, dw, db


def recurrent_grad(d_pre: torch.Tensor, out: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """dL/dW for pre-activations W h_{t-1} over all steps: Σ_t d_pre_tᵀ h_{t-1}, as two GEMMs that
    read the h_t in place (no [T, B, P] copy of the shifted states).
    d_pre [T, B, G], out (the h_t) [T, B, P], h0 [B, P] -> [G, P]."""
    T, B, G = d_pre.shape
    g = d_pre[0].t().matmul(h0)
    if T > 1:
        g.addmm_(d_pre[1:].reshape((T - 1) * B, G).t(), out[:-1].reshape((T - 1) * B, -1))
    return g


def prev(s: torch.Tensor, s0: torch.Tensor, a: int, b: int, buf: torch.Tensor) -> torch.Tensor:
    """s_{t-1} for t = a..b-1 into buf[:b-a] (s0 before the first step)."""
    buf = buf[: b - a]
    buf[0] = s0 if a == 0 else s[a - 1]
    if b - a > 1:
        buf[1:] = s[a: b - 1]
    return buf


def dsigmoid_times(a: torch.Tensor, other: torch.Tensor, tmp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = σ'·other from the sigmoid's value a: a(1 − a)·other (out may be other)."""
    torch.mul(a, a, out=tmp)
    torch.sub(a, tmp, out=tmp)
    return torch.mul(tmp, other, out=out)


def dtanh_times(a: torch.Tensor, other: torch.Tensor, tmp: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out = tanh'·other from the tanh's value a: (1 − a²)·other (out may be other)."""
    torch.mul(a, a, out=tmp)
    tmp.neg_().add_(1)
    return torch.mul(tmp, other, out=out)


# Time steps per block when a backward forms its derivative factors: vectorised over a block held
# in small reused buffers, instead of [T, B, H] temporaries whose fresh pages cost more than the
# arithmetic.
BLOCK = 16


def blocks(T: int):
    """(start, end) of the time blocks, last first."""
    n = min(T, BLOCK)
    for e in range(T, 0, -n):
        yield max(0, e - n), e

