"""Per-step linearizations of a recurrent unit: J_t = ∂s_t/∂s_prev(t) for every step, kept factored.

A :class:`Linearization` holds, for built-in cells, the per-step coefficient vectors of
:mod:`gradflow.analysis.cells` and the fixed recurrent weights, so that products J_t V and J_tᵀ U
cost a GEMM with W_hh and never form an S×S matrix; :meth:`Linearization.dense` forms all J_t at
once (no loop over time). For custom cells it holds the step function ``f(x_t [B, F], states) ->
states`` and evaluates products with ``torch.func.jvp``/``vjp`` and dense Jacobians with ``jacrev``.

Shapes: T steps (position order, as the inputs given), B batch, S joint state size. Vectors are
columns: ``V`` is ``[T, B, S, m]`` (all steps) or ``[B, S, m]`` (one step ``k``). Steps where
``mask`` is False are the identity map (the state is carried unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, Mapping

import torch

from ..errors import GradflowError
from ..trace import CellInfo
from . import _util, cells

__all__ = ["Linearization", "linearize"]


@dataclass(frozen=True, eq=False)
class Linearization:
    """J_t of every step of one unit, factored (see the module docstring); build with
    :func:`linearize` or :func:`~gradflow.analysis.linearize_trace`. ``matvec``/``rmatvec`` give
    J V / Jᵀ U for all steps or one step, ``dense`` all J_t, ``select``/``flip`` re-index the steps."""

    cell: CellInfo
    coef: Mapping[str, torch.Tensor]  # per-step vectors [T, B, H]
    weights: Mapping[str, torch.Tensor]  # fixed: weight_hh [G*H, P], weight_hr [P, H]
    mask: torch.Tensor | None = None  # [T, B] bool
    step: Callable | None = None  # custom cells
    x: torch.Tensor | None = None  # custom cells: [T, B, F]
    prev: tuple = ()  # custom cells: states fed into each step
    out_dtype: torch.dtype | None = None  # custom cells: dtype results are cast to
    sizes: tuple = field(default=())  # (name, start, stop) of each state in the joint vector

    # ------------------------------------------------------------------ shape and selection
    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, B, S)."""
        ref = self.x if self.step is not None else next(iter(self.coef.values()))
        return int(ref.shape[0]), int(ref.shape[1]), self.sizes[-1][2]

    @property
    def dtype(self) -> torch.dtype:
        if self.step is not None:
            return self.out_dtype or self.x.dtype
        return next(iter(self.coef.values())).dtype

    def select(self, index) -> "Linearization":
        """The linearization restricted to steps ``index`` (int, slice or index tensor along T)."""
        keep_dim = (lambda a: a[index]) if not isinstance(index, int) else (lambda a: a[index:index + 1])
        return replace(
            self,
            coef={k: keep_dim(v) for k, v in self.coef.items()},
            mask=None if self.mask is None else keep_dim(self.mask),
            x=None if self.x is None else keep_dim(self.x),
            prev=tuple(keep_dim(p) for p in self.prev),
        )

    def select_batch(self, idx) -> "Linearization":
        """The same steps for batch items ``idx`` (index tensor or slice along B) only."""
        return replace(
            self,
            coef={k: v[:, idx] for k, v in self.coef.items()},
            mask=None if self.mask is None else self.mask[:, idx],
            x=None if self.x is None else self.x[:, idx],
            prev=tuple(p[:, idx] for p in self.prev),
        )

    def flip(self) -> "Linearization":
        """Reverse the order of steps (position order <-> step order for direction 1)."""
        idx = torch.arange(self.shape[0] - 1, -1, -1)
        return self.select(idx)

    def to(self, dtype: torch.dtype) -> "Linearization":
        """Same maps, evaluated in ``dtype`` (custom cells: evaluated in their own dtype, cast after)."""
        if self.step is not None:
            return replace(self, out_dtype=dtype)
        return replace(self, coef={k: v.to(dtype) for k, v in self.coef.items()},
                       weights={k: v.to(dtype) for k, v in self.weights.items()})

    # ------------------------------------------------------------------ products
    def _at(self, k):
        if k is None:
            return self
        return replace(self, coef={n: v[k] for n, v in self.coef.items()},
                       mask=None if self.mask is None else self.mask[k],
                       x=None if self.x is None else self.x[k], prev=tuple(p[k] for p in self.prev))

    def matvec(self, V: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """J V: V [T, B, S, m] (k None) or [B, S, m] (one step k) -> same shape."""
        return self._apply(V, k, transpose=False)

    def rmatvec(self, U: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Jᵀ U: U [T, B, S, m] (k None) or [B, S, m] (one step k) -> same shape."""
        return self._apply(U, k, transpose=True)

    def _apply(self, V, k, transpose):
        S = self.shape[2]
        want = self.shape[:2] if k is None else self.shape[1:2]
        if V.ndim != len(want) + 2 or tuple(V.shape[:-2]) != tuple(want) or V.shape[-2] != S:
            raise GradflowError(f"Linearization.{'rmatvec' if transpose else 'matvec'}: expected vectors "
                                f"[{', '.join(map(str, want))}, {S}, m], got shape {tuple(V.shape)}")
        lin = self._at(k)
        rows = V.mT.to(self.dtype)  # [..., m, S]
        if lin.step is not None:
            out = _custom_apply(lin, rows, transpose)
        else:
            out = _builtin_apply(lin, rows, transpose)
        if lin.mask is not None:
            out = torch.where(lin.mask[..., None, None], out, rows)
        return out.mT

    @cached_property
    def _full_steps(self) -> list:
        """Per step: True when no batch item is masked (the identity branch can be skipped)."""
        T = self.shape[0]
        return [True] * T if self.mask is None else self.mask.all(1).tolist()

    def apply_rows(self, R: torch.Tensor, k: int, transpose: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        """Fast path for sweeps: rows R [n, B, S] (n vectors per batch item, contiguous) -> rows of
        (J_k v)ᵀ or (J_kᵀ u)ᵀ for every row, same shape; no shape checks. ``out`` (may be R itself)
        receives the result."""
        full = self._full_steps[k]
        if self.step is None and full and out is not None and self.cell.kind in ("rnn_tanh", "rnn_relu"):
            d = self.coef["d"][k]  # one scaling and one GEMM, written in place
            W = self.weights["weight_hh"]
            tmp = d * R if transpose else R.reshape(-1, R.shape[-1]).matmul(W.T).view(R.shape)
            if transpose:
                torch.mm(tmp.view(-1, R.shape[-1]), W, out=out.view(-1, R.shape[-1]))
            else:
                torch.mul(d, tmp, out=out)
            return out
        if self.step is not None:
            res = _custom_apply(self._at(k), R.transpose(0, 1), transpose).transpose(0, 1)
        else:
            coef = {n: v[k] for n, v in self.coef.items()}
            res = _builtin_apply(self, R, transpose, unsqueeze=False, coef=coef)
        if not full:
            res = torch.where(self.mask[k][:, None], res, R)
        if out is None:
            return res
        out.copy_(res)
        return out

    # ------------------------------------------------------------------ dense
    def dense(self, chunk: int | None = None) -> torch.Tensor:
        """All J_t as one tensor [T, B, S, S]; built in chunks of ``chunk`` steps (memory bound
        ≈ chunk·B·S² temporaries). Masked steps are the identity."""
        T, B, S = self.shape
        out = torch.empty(T, B, S, S, dtype=self.dtype)
        chunk = chunk or max(1, (1 << 22) // max(1, B * S * S))
        for a in range(0, T, chunk):
            part = self.select(slice(a, a + chunk))
            if part.step is not None:
                _custom_dense(part, out[a:a + chunk])
            else:
                _builtin_dense(part, out[a:a + chunk])
        if self.mask is not None and not bool(self.mask.all()):
            out[~self.mask] = torch.eye(S, dtype=self.dtype)
        return out


def linearize(cell: CellInfo, params: Mapping[str, torch.Tensor] | None, x: torch.Tensor, prev: tuple, *,
              mask: torch.Tensor | None = None, step: Callable | None = None, dtype=None) -> Linearization:
    """Linearize every step of one unit at once.

    cell: its :class:`CellInfo`; params: weights named as in CellInfo (unused for custom cells);
    x [T, B, F] the inputs; prev: tuple (states order) of [T, B, S_i], the state fed into each step;
    mask [T, B] (False = identity step); step: ``f(x_t, states) -> states`` for ``kind='custom'``;
    dtype: evaluate in this dtype (default: the inputs' promoted dtype)."""
    layout = tuple(_util.state_layout(cell))
    if mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
        raise GradflowError(f"linearize: mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])}")
    if cell.kind == "custom" or cell.kind not in cells.GATES:
        if step is None:
            raise GradflowError(f"cell kind {cell.kind!r} ({cell.cell_class or 'custom'}) has no closed form and no "
                                "step function; record it in this process with a registered custom cell")
        prev = tuple(prev)
        for (name, a, b), p in zip(layout, prev):
            if tuple(p.shape) != (x.shape[0], x.shape[1], b - a):
                raise GradflowError(f"custom cell: previous state {name!r} has shape {tuple(p.shape)}, "
                                    f"expected {(x.shape[0], x.shape[1], b - a)}")
        return Linearization(cell, {}, {}, mask, step, x, prev, dtype, layout)
    out = cells.forward(cell, params, x, tuple(prev), dtype)
    # gate coefficients stacked in W_hh's gate order, so one product scales every gate block at once
    if cell.kind == "lstm":
        coef = {"k4": out["k4"], "k_c": out["k_c"], "f": out["f"]}
    elif cell.kind == "gru":
        coef = {"z": out["z"], "c3": out["c3"]}
    else:
        coef = {"d": out["d"]}
    dt = next(iter(coef.values())).dtype
    weights = {"weight_hh": params["weight_hh"].to(dt)}
    if cell.kind == "lstm" and cell.proj_size:
        weights["weight_hr"] = params["weight_hr"].to(dt)
    return Linearization(cell, coef, weights, mask, sizes=layout)


# ---------------------------------------------------------------------- built-in cells
def _builtin_apply(lin: Linearization, R: torch.Tensor, transpose: bool, unsqueeze: bool = True,
                   coef=None) -> torch.Tensor:
    """Rows R [..., m, S] -> rows of (J v) or (Jᵀ u); coefficient vectors (``coef``, default lin's)
    broadcast over m (or, with unsqueeze=False, over the leading dims of R [..., B, S]). The gate
    blocks are handled together: one GEMM with W_hh, one product with the stacked coefficients."""
    coef = lin.coef if coef is None else coef
    c = {n: v.unsqueeze(-2) for n, v in coef.items()} if unsqueeze else coef
    W = lin.weights["weight_hh"]
    kind, H = lin.cell.kind, lin.cell.hidden_size
    lead = R.shape[:-1]
    if kind in ("rnn_tanh", "rnn_relu"):
        return (c["d"] * R) @ W if transpose else c["d"] * (R @ W.T)
    if kind == "gru":
        c3 = c["c3"].unflatten(-1, (3, H))
        if transpose:  # Jᵀu = z u + [c_r u, c_z u, c_n u] W
            X = (c3 * R.unsqueeze(-2)).flatten(-2)
            return (X @ W).addcmul_(c["z"], R)
        A = (R @ W.T).unflatten(-1, (3, H)).mul_(c3)  # J v = z v + Σ_gates c_gate (W_gate v)
        return A.sum(-2).addcmul_(c["z"], R)
    P = R.shape[-1] - H
    Wr = lin.weights.get("weight_hr")
    k4 = c["k4"].unflatten(-1, (4, H))
    if transpose:
        um = R[..., :P] @ Wr if Wr is not None else R[..., :P]
        uc = torch.addcmul(R[..., P:], c["k_c"], um)
        ga = torch.empty(*lead, 4, H, dtype=R.dtype)
        torch.mul(k4[..., :3, :], uc.unsqueeze(-2), out=ga[..., :3, :])
        torch.mul(k4[..., 3, :], um, out=ga[..., 3, :])
        out = torch.empty(*lead, R.shape[-1], dtype=R.dtype)
        torch.matmul(ga.flatten(-2), W, out=out[..., :P])
        torch.mul(c["f"], uc, out=out[..., P:])
        return out
    A = (R[..., :P] @ W.T).unflatten(-1, (4, H)).mul_(k4)
    out = torch.empty(*lead, R.shape[-1], dtype=R.dtype)
    dc = torch.sum(A[..., :3, :], -2, out=out[..., P:]).addcmul_(c["f"], R[..., P:])
    dm = torch.addcmul(A[..., 3, :], c["k_c"], dc)
    if Wr is not None:
        torch.matmul(dm, Wr.T, out=out[..., :P])
    else:
        out[..., :P] = dm
    return out


def _builtin_dense(lin: Linearization, out: torch.Tensor) -> None:
    """Write J of every step of ``lin`` into out [t, B, S, S]."""
    W = lin.weights["weight_hh"]
    kind, H = lin.cell.kind, lin.cell.hidden_size
    if kind in ("rnn_tanh", "rnn_relu"):
        torch.mul(lin.coef["d"].unsqueeze(-1), W, out=out)
        return
    if kind == "gru":
        c = lin.coef["c3"].unsqueeze(-1)  # column scalings [.., 3H, 1]
        torch.mul(c[..., :H, :], W[:H], out=out)
        out.addcmul_(c[..., H:2 * H, :], W[H:2 * H]).addcmul_(c[..., 2 * H:, :], W[2 * H:])
        out.diagonal(dim1=-2, dim2=-1).add_(lin.coef["z"])
        return
    P = out.shape[-1] - H
    Wr = lin.weights.get("weight_hr")
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


# ---------------------------------------------------------------------- custom cells
def _flat(lin: Linearization):
    """x [N, F] and the joint-state function of the N = (leading dims) flattened rows."""
    lead = lin.x.shape[:-1]
    x = lin.x.reshape(-1, lin.x.shape[-1])
    prev = torch.cat([p.reshape(x.shape[0], -1) for p in lin.prev], -1)
    bounds = [b - a for _, a, b in lin.sizes]

    def f(s):
        new = lin.step(x, tuple(s.split(bounds, -1)))
        if not isinstance(new, (tuple, list)):
            new = (new,)
        return torch.cat([n.reshape(s.shape[0], -1) for n in new], -1)

    return lead, prev, f


def _custom_apply(lin: Linearization, R: torch.Tensor, transpose: bool) -> torch.Tensor:
    lead, prev, f = _flat(lin)
    m = R.shape[-2]
    Rn = R.reshape(-1, m, R.shape[-1]).transpose(0, 1).to(prev.dtype)  # [m, N, S]
    try:
        if transpose:
            _, pull = torch.func.vjp(f, prev)
            out = torch.func.vmap(lambda u: pull(u)[0])(Rn)
        else:
            out = torch.func.vmap(lambda v: torch.func.jvp(f, (prev,), (v,))[1])(Rn)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise GradflowError(f"custom cell {lin.cell.cell_class or ''}: torch.func could not differentiate its step "
                            f"function ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return out.transpose(0, 1).reshape(*lead, m, -1).to(lin.dtype)


def _custom_dense(lin: Linearization, out: torch.Tensor) -> None:
    """Batch items are independent, so the Jacobian of Σ_n f(s)_n w.r.t. s [N, S] holds every
    per-item J_n: jacrev returns [S_out, N, S_in]."""
    lead, prev, f = _flat(lin)
    try:
        jac = torch.func.jacrev(lambda s: f(s).sum(0))(prev)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise GradflowError(f"custom cell {lin.cell.cell_class or ''}: torch.func.jacrev failed on its step "
                            f"function ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    out.copy_(jac.permute(1, 0, 2).reshape(out.shape))
