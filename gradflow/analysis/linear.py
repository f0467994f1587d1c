"""Per-step linearizations of a recurrent unit: J_t = ∂s_t/∂s_prev(t) for every step, kept factored.

A :class:`Linearization` holds the per-step coefficients and fixed weights that the unit's cell
kind (:mod:`gradflow.kinds`) computes, so that products J_t V and J_tᵀ U cost a GEMM with W_hh (or,
for diagonal kinds, an elementwise product) and never form an S×S matrix; :meth:`Linearization.dense`
forms all J_t at once (no loop over time). All the per-kind math lives in the kind's module; this
class only indexes steps and batch items, checks shapes and treats masked steps. For user cells
(kind ``custom``) it holds the step function ``f(x_t [B, F], states) -> states`` instead, and the
kind evaluates products with ``torch.func.jvp``/``vjp`` and dense Jacobians with ``jacrev``.

``structure`` is the Jacobian structure the kind declares (``dense``, ``diagonal``,
``complex_diagonal``); for the diagonal ones :meth:`Linearization.moduli` gives every J_t's
singular values unit by unit, which products, Lyapunov exponents and spectra use instead of QR/SVD.

Shapes: T steps (position order, as the inputs given), B batch, S joint state size. Vectors are
columns: ``V`` is ``[T, B, S, m]`` (all steps) or ``[B, S, m]`` (one step ``k``). Steps where
``mask`` is False are the identity map (the state is carried unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Callable, Mapping

import torch

from .. import kinds as _kinds
from ..errors import GradflowError
from ..trace import CellInfo
from . import _util

__all__ = ["Linearization", "linearize"]

_TRANSPOSED_MIN_BYTES = 16 << 20  # W_hh from this size: Jᵀ u reads a row-major copy of W_hhᵀ (weight_hh_t)


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
    def kind(self) -> "_kinds.CellKind":
        """The registered :class:`~gradflow.kinds.CellKind` of the unit."""
        return _kinds.get(self.cell.kind)

    @property
    def impl(self):
        return self.kind.impl

    @property
    def structure(self) -> str:
        """The Jacobian structure: ``dense``, ``diagonal`` or ``complex_diagonal`` (see gradflow.kinds)."""
        return self.kind.structure

    def moduli(self) -> torch.Tensor:
        """[T, B, S] the singular values of every J_t, unsorted (1 at masked steps), for a ``diagonal``
        or ``complex_diagonal`` structure: |d_t| per unit, or |λ_t| for both coordinates of a unit."""
        if self.structure == "dense":
            raise GradflowError(f"Linearization.moduli: a {self.cell.kind} unit has a dense Jacobian")
        m = self.impl.moduli(self.coef)
        if self.mask is not None:
            m = torch.where(self.mask[..., None], m, torch.ones((), dtype=m.dtype))
        return m

    def dense_sweep(self, k: int) -> bool:
        """Whether a Lyapunov sweep of k directions should form each J_t (the kind's choice)."""
        return self.impl.dense_sweep(k, self.shape[2])

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
        return self._same_weights(
            coef={k: keep_dim(v) for k, v in self.coef.items()},
            mask=None if self.mask is None else keep_dim(self.mask),
            x=None if self.x is None else keep_dim(self.x),
            prev=tuple(keep_dim(p) for p in self.prev),
        )

    def select_batch(self, idx) -> "Linearization":
        """The same steps for batch items ``idx`` (index tensor or slice along B) only."""
        return self._same_weights(
            coef={k: v[:, idx] for k, v in self.coef.items()},
            mask=None if self.mask is None else self.mask[:, idx],
            x=None if self.x is None else self.x[:, idx],
            prev=tuple(p[:, idx] for p in self.prev),
        )

    def _same_weights(self, **changes) -> "Linearization":
        """``replace(self, **changes)`` for changes that keep the weights (other steps or batch items):
        the result shares the cached copy of W_hhᵀ (:attr:`weight_hh_t`) instead of making its own."""
        out = replace(self, **changes)
        if "weight_hh_t" in self.__dict__:
            out.__dict__["weight_hh_t"] = self.__dict__["weight_hh_t"]
        return out

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
        return self._same_weights(coef={n: v[k] for n, v in self.coef.items()},
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
        out = self.impl.apply(lin, rows, transpose)
        if lin.mask is not None:
            out = torch.where(lin.mask[..., None, None], out, rows)
        return out.mT

    @cached_property
    def weight_hh_t(self) -> torch.Tensor | None:
        """A contiguous copy of W_hhᵀ when W_hh is large (at least 16 MiB), else None, made once per
        Linearization. Jᵀ u of a few rows is a GEMM bound by reading W_hh from memory, and MKL's
        skinny product runs faster on Wᵀ stored row-major (R @ (Wᵀ)ᵀ) than on W itself: float64
        [4096, 1024], 8 rows, one thread: 7.1 against 11.6 ms; no gain at [2048, 512] (8 MiB, cache
        resident: 1.17 against 1.00 ms)."""
        W = self.weights.get("weight_hh")
        if W is None or W.numel() * W.element_size() < _TRANSPOSED_MIN_BYTES:
            return None
        return W.T.contiguous()

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
        fast = self.impl.apply_rows(self, R, k, transpose, full, out)
        if fast is not None:
            return fast
        res = self.impl.rows(self, R, k, transpose)
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
        ref = self.x if self.step is not None else next(iter(self.coef.values()))
        out = torch.empty(T, B, S, S, dtype=self.dtype, device=ref.device)
        chunk = chunk or max(1, (1 << 22) // max(1, B * S * S))
        for a in range(0, T, chunk):
            self.impl.dense(self.select(slice(a, a + chunk)), out[a:a + chunk])
        if self.mask is not None and not bool(self.mask.all()):
            out[~self.mask] = torch.eye(S, dtype=self.dtype, device=out.device)
        return out


def linearize(cell: CellInfo, params: Mapping[str, torch.Tensor] | None, x: torch.Tensor, prev: tuple, *,
              mask: torch.Tensor | None = None, step: Callable | None = None, dtype=None) -> Linearization:
    """Linearize every step of one unit at once.

    cell: its :class:`CellInfo`; params: weights named as in CellInfo (unused for custom cells);
    x [T, B, F] the inputs; prev: tuple (states order) of [T, B, S_i], the state fed into each step;
    mask [T, B] (False = identity step); step: ``f(x_t, states) -> states`` for ``kind='custom'``;
    dtype: evaluate in this dtype (default: the inputs' promoted dtype)."""
    if not isinstance(cell, CellInfo):
        raise GradflowError(f"linearize: expected a CellInfo, got {type(cell).__name__}")
    impl = _kinds.get(cell.kind).impl
    layout = tuple(_util.state_layout(cell))
    if isinstance(x, torch.Tensor) and mask is not None and tuple(mask.shape) != tuple(x.shape[:2]):
        raise GradflowError(f"linearize: mask has shape {tuple(mask.shape)}, expected {tuple(x.shape[:2])}")
    if impl.needs_step:
        if step is None:
            raise GradflowError(f"cell kind {cell.kind!r} ({cell.cell_class or 'a user cell'}) has no closed form and "
                                "no step function; record it in this process with a registered custom cell")
        prev = tuple(prev)
        for (name, a, b), p in zip(layout, prev):
            if tuple(p.shape) != (x.shape[0], x.shape[1], b - a):
                raise GradflowError(f"custom cell: previous state {name!r} has shape {tuple(p.shape)}, "
                                    f"expected {(x.shape[0], x.shape[1], b - a)}")
        return Linearization(cell, {}, {}, mask, step, x, prev, dtype, layout)
    impl.check(cell, params, x, tuple(prev))
    coef, weights = impl.linearize(cell, params, x, tuple(prev), dtype)
    return Linearization(cell, coef, weights, mask, sizes=layout)
