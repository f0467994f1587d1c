"""Kinds whose recurrence acts unit by unit: a diagonal (or complex-diagonal) Jacobian.

A kind of this family states its math once, as four functions of its parameters ``p`` (a dict):

* ``project(p, x)`` -> P: every input-dependent term of all steps at once (x [T, B, F], or any
  leading dims), one GEMM;
* ``recur(q, P_t, s)`` -> s_t: one step, elementwise in the state, broadcasting over leading dims,
  with q = ``prepare(p)`` (the parameters plus whatever a step derives from them alone, computed
  once per sequence; default: p itself);
* ``readout(p, S, x)`` -> the layer's output from the state sequence (default: the state itself);
* ``diag(p, P, prev)`` -> the Jacobian coefficients of every step: ``{"d": [T, B, S]}`` for
  J_t = diag(d_t) (structure ``diagonal``), or ``{"re", "im": [T, B, N]}`` for multiplication by the
  complex λ_t = re + i·im on the state [Re h; Im h] of size S = 2N (``complex_diagonal``).

From these, :class:`ElementwiseKind` derives the plain forward (``scan``), the recording kernel
(:class:`ElementwiseRecurrence`), the linearization (J v, Jᵀ u, dense J) and the moduli that make
products and Lyapunov exponents exact without QR. The kernel's backward runs the adjoint recursion
δ_{t-1} = g_{t-1} + J_tᵀ δ_t with the closed-form J_tᵀ (g: the readout's gradient on the states),
hands δ to the sink, and gets the parameter and input gradients from *one* vector-Jacobian product
of the step applied to all steps at once (the states fed into each step being known constants):
dL/dθ = Σ_t (∂s_t/∂θ)ᵀ δ_t, masked steps contributing nothing.
"""

from __future__ import annotations

import torch
from ._once import once_differentiable

from . import _kernel as K
from ._base import KindImpl


# ---------------------------------------------------------------------- structured Jacobians
def structured_apply(structure: str, coef, R: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Rows R [..., S] -> rows of J v (or Jᵀ u); ``coef`` broadcasts against R without its last dim."""
    if structure == "diagonal":
        return coef["d"] * R
    a, b = coef["re"], coef["im"]
    N = a.shape[-1]
    r, i = R[..., :N], R[..., N:]
    if transpose:  # [[a, -b], [b, a]]ᵀ = [[a, b], [-b, a]]
        return torch.cat([a * r + b * i, a * i - b * r], -1)
    return torch.cat([a * r - b * i, b * r + a * i], -1)


def structured_dense(structure: str, coef, out: torch.Tensor) -> None:
    """Write every J_t into out [t, B, S, S]."""
    out.zero_()
    if structure == "diagonal":
        out.diagonal(dim1=-2, dim2=-1).copy_(coef["d"])
        return
    a, b = coef["re"], coef["im"]
    N = a.shape[-1]
    out[..., :N, :N].diagonal(dim1=-2, dim2=-1).copy_(a)
    out[..., N:, N:].diagonal(dim1=-2, dim2=-1).copy_(a)
    out[..., :N, N:].diagonal(dim1=-2, dim2=-1).copy_(-b)
    out[..., N:, :N].diagonal(dim1=-2, dim2=-1).copy_(b)


def structured_moduli(structure: str, coef) -> torch.Tensor:
    """[..., S] the per-coordinate factor by which J_t scales each unit: |d| (diagonal), or |λ| for
    both the Re and the Im coordinate of a unit (each 2×2 block is |λ| times a rotation). These are
    J_t's singular values and eigenvalue moduli (unsorted), and products multiply them unit by unit."""
    if structure == "diagonal":
        return coef["d"].abs()
    m = torch.hypot(coef["re"], coef["im"])
    return torch.cat([m, m], -1)


# ---------------------------------------------------------------------- the recording kernel
class ElementwiseRecurrence(torch.autograd.Function):
    """One layer-direction of an :class:`ElementwiseKind` in processing order (see the module docstring).
    Inputs: impl, parameter names, mask [T, B] or None, sink, x [T, B, F], s0 [B, S], *parameters.

    The projection P = project(p, x) is computed once, in the forward, with its (small) autograd
    graph kept for the backward: the backward then needs no second GEMM over all steps for it."""

    @staticmethod
    def forward(ctx, impl, names, mask, sink, x, s0, *params):
        need = ctx.needs_input_grad
        leaves = [x.detach().requires_grad_(need[4]), *(q.detach().requires_grad_(need[6 + j])
                                                        for j, q in enumerate(params))]
        p = dict(zip(names, params))
        with torch.enable_grad():
            P_graph = impl.project(dict(zip(names, leaves[1:])), leaves[0])
        P, q = P_graph.detach(), impl.prepare(p)
        T = x.shape[0]
        S = K.empty(sink, (T,) + tuple(s0.shape), s0)
        s = s0
        for t in range(T):
            new = impl.recur(q, P[t], s)
            if mask is not None:
                new = torch.where(mask[t].unsqueeze(1), new, s)
            S[t] = new
            s = S[t]
        out = impl.readout(p, S, x)
        ctx.save_for_backward(x, s0, S, *params)
        ctx.impl, ctx.names, ctx.mask, ctx.sink = impl, names, mask, sink
        ctx.graph = (leaves, P_graph)
        if sink is not None:
            sink.forward(h=S)
        return out, S[T - 1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out, g_last):
        x, s0, S, *params = ctx.saved_tensors
        impl, names, mask, sink = ctx.impl, ctx.names, ctx.mask, ctx.sink
        leaves, P_graph = ctx.graph
        del ctx.graph
        T = S.shape[0]
        prev = torch.cat([s0.unsqueeze(0), S[:-1]])
        pl = dict(zip(names, leaves[1:]))
        wanted = [v for v in leaves if v.requires_grad]
        grads: dict[int, torch.Tensor] = {}

        def add(tensors, values):
            for v, g in zip(tensors, values):
                if g is not None:
                    grads[id(v)] = g if id(v) not in grads else grads[id(v)] + g

        if impl.identity_readout:
            g_s = g_out
        else:  # the readout's own gradients, and its direct gradient on every state
            with torch.enable_grad():
                Sd = S.detach().requires_grad_()
                got = torch.autograd.grad(impl.readout(pl, Sd, leaves[0]), [Sd, *wanted], g_out, allow_unused=True)
            g_s = got[0]
            add(wanted, got[1:])
        P = P_graph.detach()
        with torch.enable_grad():  # the step over all steps at once (prev are constants), for one VJP below
            Pd = P.requires_grad_()
            new = impl.recur(impl.prepare(pl), Pd, prev)
        coef = impl.diag(dict(zip(names, params)), P, prev)
        diagonal = impl.kind.structure == "diagonal" and mask is None
        delta = K.empty(sink, S.shape, S)
        torch.add(g_s[T - 1], g_last, out=delta[T - 1])
        for t in range(T - 1, -1, -1):
            if diagonal and t > 0:  # δ_{t-1} = g_{t-1} + d_t ⊙ δ_t, in place
                torch.addcmul(g_s[t - 1], coef["d"][t], delta[t], out=delta[t - 1])
                continue
            back = structured_apply(impl.kind.structure, {n: v[t] for n, v in coef.items()}, delta[t], True)
            if mask is not None:
                back = torch.where(mask[t].unsqueeze(1), back, delta[t])
            if t > 0:
                torch.add(g_s[t - 1], back, out=delta[t - 1])
            else:
                ds0 = back
        if sink is not None:
            sink.backward("h", delta)
        w = delta if mask is None else delta * mask.unsqueeze(-1).to(delta.dtype)
        in_recur = [v for v in leaves[1:] if v.requires_grad]
        g_P, *g_rec = torch.autograd.grad(new, [Pd, *in_recur], w, allow_unused=True)
        add(in_recur, g_rec)
        if wanted:  # through the projection's saved graph
            add(wanted, torch.autograd.grad(P_graph, wanted, g_P, allow_unused=True))
        dx = grads.get(id(leaves[0]))
        ds0 = ds0 if ctx.needs_input_grad[5] else None
        return (None, None, None, None, dx, ds0, *(grads.get(id(v)) for v in leaves[1:]))


# ---------------------------------------------------------------------- the family's implementation
class ElementwiseKind(KindImpl):
    """Base of the unit-wise kinds; a subclass sets ``layer`` (its :class:`RecurrentLayer`) and writes
    ``param_shapes``, ``project``, ``recur``, ``diag``, ``reset`` (and ``readout``, ``gates``)."""

    layer: type = type(None)
    inits = ("default",)
    identity_readout = True

    @property
    def module_types(self):
        return (self.layer,)

    def param_names(self, module):
        info = self.cell_info(module)
        return tuple(self.param_shapes(info, info.input_size))

    def readout(self, p, S, x):
        return S

    def prepare(self, p):
        return p

    def reset(self, module, p) -> None:
        """Initialise one layer-direction's parameters ``p`` of ``module`` in place (under no_grad)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ running
    def scan(self, x, params, s0: tuple, mask):
        """The plain forward with autograd (processing order): (output [T, B, P], (s_T,))."""
        P, q = self.project(params, x), self.prepare(params)
        s, seq = s0[0], []
        for t, Pt in enumerate(P.unbind(0)):  # one backward for all steps (P[t] would add a [T, ...] zero each)
            new = self.recur(q, Pt, s)
            if mask is not None:
                new = torch.where(mask[t].unsqueeze(1), new, s)
            seq.append(new)
            s = new
        return self.readout(params, torch.stack(seq), x), (s,)

    def record(self, x, params, s0, mask, sink):
        names = tuple(params)
        out, last = ElementwiseRecurrence.apply(self, names, mask, sink, x.contiguous(), s0[0],
                                                *(params[n] for n in names))
        return out, (last,)

    # ------------------------------------------------------------------ linearization
    def linearize(self, cell, params, x, prev, dtype):
        if dtype is None:
            dtype = torch.promote_types(x.dtype, prev[0].dtype)
            for v in params.values():
                dtype = torch.promote_types(dtype, v.dtype)
        p = {n: v.to(dtype) for n, v in params.items()}
        x, h = x.to(dtype), prev[0].to(dtype)
        return self.diag(p, self.project(p, x), h), {}

    def apply(self, lin, R, transpose, coef=None, unsqueeze=True):
        coef = lin.coef if coef is None else coef
        c = {n: v.unsqueeze(-2) for n, v in coef.items()} if unsqueeze else coef
        return structured_apply(self.kind.structure, c, R, transpose)

    def dense(self, lin, out):
        structured_dense(self.kind.structure, lin.coef, out)

    def moduli(self, coef) -> torch.Tensor:
        return structured_moduli(self.kind.structure, coef)

    # ------------------------------------------------------------------ the model zoo
    def build(self, input_size, hidden, layers, dropout, options):
        return self.layer(input_size, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0, **options)
