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

# Forces one forward route of the gated kernels ("steps" or "fused"; None: chosen by size). Tests and
# benchmarks set it to run every route.
ROUTE: str | None = None


def flat_weights(params, names) -> list:
    """The weights of one layer-direction in the order ``torch._VF.lstm/gru/rnn_*`` takes them."""
    return [params[n] for n in names if n in params]


def scaled_rows(w: torch.Tensor, a: int, b: int, factor: float) -> torch.Tensor:
    """A copy of ``w`` with rows (entries, for a vector) a..b-1 times ``factor``; ``w`` itself when empty."""
    if not w.numel():
        return w
    out = w.clone()
    out[a:b].mul_(factor)
    return out


def route(kind: str, x: torch.Tensor, mask, w_hh: torch.Tensor, fused) -> str:
    """The forward route of a gated kernel: ``fused`` (PyTorch's fused kernel for the forward, the
    pre-activations recovered by GEMMs over all steps) or ``steps`` (the recurrence step by step).
    The fused route needs every step to exist (no mask). On CPU the steps route is chosen at every
    size: measured on 2 cores (issue 14), recovering the pre-activations costs GEMMs as large as the
    fused forward's own, so the fused route was no faster at H=64 (T=16, 256) and slower from H=256
    on. On CUDA the fused route is chosen: its forward launches one kernel per step instead of
    about eight (not measured: no GPU was available)."""
    if fused is None or mask is not None:
        return "steps"
    if ROUTE is not None:
        return ROUTE
    return "fused" if x.device.type == "cuda" else "steps"


def step_weight(w: torch.Tensor) -> torch.Tensor:
    """Wᵀ for the per-step GEMMs h_{t-1} Wᵀ (w [G, P]): a contiguous copy up to P = 512, the
    transposed view above. Measured on CPU (B = 32, one thread, thread time): the copy's layout is
    faster for small weights (LSTM G=4H: H=64 15.3 vs 17.9 µs, H=256 174 vs 249 µs, H=512 971 vs
    1130 µs; GRU and tanh RNN alike) and slower at H=1024 (LSTM 5.3-6.5 vs 5.0-5.5 ms)."""
    return w.t().contiguous() if w.shape[-1] <= 512 else w.t()


def empty(sink, shape, like):
    """A new tensor of ``shape`` like ``like``, from the sink's workspace when it has one."""
    ws = getattr(sink, "workspace", None)
    return like.new_empty(shape) if ws is None else ws.empty(shape, like)


def project(x: torch.Tensor, w_ih: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    """out [T, B, G] <- x W_ihᵀ + b, one GEMM over all steps, then the bias in place: measured on
    CPU (T·B = 8192, F = 64, G = 256, one thread) addmm with the broadcast bias took 4.7 ms, the
    GEMM and the add 2.9 ms."""
    T, B, F = x.shape
    x2 = x.reshape(T * B, F)
    o2 = out.view(T * B, -1)
    torch.mm(x2, w_ih.t(), out=o2)
    if b.numel():
        o2.add_(b)


def input_grads(ctx, d_pre: torch.Tensor, x: torch.Tensor, w_ih: torch.Tensor, has_b: bool):
    """Gradients of x, W_ih and b from d_pre = dL/d(W_ih x + b) [T, B, G], one GEMM each."""
    T, B, G = d_pre.shape
    d2 = d_pre.view(T * B, G)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = empty(ctx.sink, x.shape, x)
        torch.mm(d2, w_ih, out=dx.view(T * B, -1))
    if ctx.needs_input_grad[1]:
        dw = _wgrad(d2, x.reshape(T * B, -1))
    if has_b and ctx.needs_input_grad[2]:
        db = d2.sum(0)
    return dx, dw, db


def recurrent_grad(d_pre: torch.Tensor, out: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """dL/dW for pre-activations W h_{t-1} over all steps: Σ_t d_pre_tᵀ h_{t-1}, as two GEMMs that
    read the h_t in place (no [T, B, P] copy of the shifted states).
    d_pre [T, B, G], out (the h_t) [T, B, P], h0 [B, P] -> [G, P]."""
    T, B, G = d_pre.shape
    g = h0.t().matmul(d_pre[0])
    if T > 1:
        g.addmm_(out[:-1].reshape((T - 1) * B, -1).t(), d_pre[1:].reshape((T - 1) * B, G))
    return g.t()


def _wgrad(d2: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """d2ᵀ a2 ([N, G], [N, F] -> [G, F]) computed as (a2ᵀ d2)ᵀ, a transposed view: on CPU
    (N = 8192, F = 64, G = 256, one thread) 2.3 ms against 3.0 ms for d2ᵀ a2."""
    return a2.t().mm(d2).t()


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


def blocks(T: int, reverse: bool = True):
    """(start, end) of the time blocks, last first (first first with reverse=False)."""
    n = min(T, BLOCK)
    if not reverse:
        for s in range(0, T, n):
            yield s, min(T, s + n)
        return
    for e in range(T, 0, -n):
        yield max(0, e - n), e

