"""A unit's per-step linearization built one chunk of time at a time (bounded memory for any T).

:class:`ChunkedLinearization` offers the operator interface the sweeps of
:mod:`gradflow.analysis.products` use (``shape``, ``dtype``, ``to``, ``structure``, ``moduli``,
``dense_sweep``, ``select``, ``select_batch``, ``apply_rows``, ``matvec``/``rmatvec``) over the steps of
one unit, in **step order** (``flip=True`` for direction 1, see :mod:`gradflow.analysis._util`). It
holds the trace's inputs and states (no copy) and linearizes only the chunk of ``chunk`` positions
that the sweep is in, keeping one chunk at a time: the coefficients of a whole sequence
([T, B, ·] float64) are never held at once. The maps are those of
:func:`~gradflow.analysis.linearize_trace` exactly (same kind code, same masks).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .. import kinds
from ..trace import Trace
from . import _util
from .linear import Linearization, linearize

__all__ = ["ChunkedLinearization", "chunked_linearization"]


@dataclass(eq=False)
class ChunkedLinearization:
    """See the module docstring. ``x`` [T, B, F], ``prev`` tuple of [T, B, S_i], ``mask`` [T, B] in
    position order; steps are addressed in step order (reversed positions when ``flipped``)."""

    cell: object
    params: dict
    x: torch.Tensor
    prev: tuple
    mask: torch.Tensor | None
    step: object
    chunk: int
    out_dtype: torch.dtype | None = None
    flipped: bool = False
    device: torch.device | str | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        T, B = self.x.shape[:2]
        return int(T), int(B), _util.joint_size(self.cell)

    @property
    def dtype(self):
        return self.out_dtype or self.x.dtype

    @property
    def structure(self) -> str:
        return kinds.get(self.cell.kind).structure

    @property
    def step_mask(self) -> torch.Tensor | None:
        """[T, B] the mask in step order."""
        if self.mask is None:
            return None
        return self.mask.flip(0) if self.flipped else self.mask

    def to(self, dtype) -> "ChunkedLinearization":
        return replace(self, out_dtype=dtype, _cache={})

    def fresh(self) -> "ChunkedLinearization":
        """The same operator with a cache of its own: one for each thread that sweeps it at once
        (the chunk cache is per operator, and a sweep of another thread would evict its chunk)."""
        return replace(self, _cache={})

    def select_batch(self, idx) -> "ChunkedLinearization":
        return replace(self, x=self.x[:, idx], prev=tuple(p[:, idx] for p in self.prev),
                       mask=None if self.mask is None else self.mask[:, idx], _cache={})

    def dense_sweep(self, k: int) -> bool:
        return kinds.get(self.cell.kind).impl.dense_sweep(k, self.shape[2])

    # ------------------------------------------------------------------ building chunks
    def positions(self, a: int, b: int) -> Linearization:
        """The exact Linearization of positions a..b-1 (position order)."""
        lin = linearize(self.cell, self.params, self.x[a:b], tuple(p[a:b] for p in self.prev),
                        mask=None if self.mask is None else self.mask[a:b], step=self.step, dtype=self.out_dtype)
        if self.device is not None and lin.step is None:
            dev = self.device
            lin = replace(lin, coef={k: v.to(dev) for k, v in lin.coef.items()},
                          weights={k: v.to(dev) for k, v in lin.weights.items()},
                          mask=None if lin.mask is None else lin.mask.to(dev))
        return lin

    def _locate(self, k: int):
        """(Linearization of the chunk holding step k, in step order; k's index inside it)."""
        T = self.shape[0]
        p = T - 1 - k if self.flipped else k
        c = p // self.chunk
        if c not in self._cache:
            self._cache.clear()  # one chunk at a time
            a, b = c * self.chunk, min(T, (c + 1) * self.chunk)
            lin = self.positions(a, b)
            self._cache[c] = (lin.flip() if self.flipped else lin, a, b)
        lin, a, b = self._cache[c]
        return lin, ((b - 1 - p) if self.flipped else (p - a))

    def select(self, index) -> Linearization:
        """The steps ``index`` (a slice in step order) as one Linearization."""
        T = self.shape[0]
        a, b, _ = index.indices(T)
        if not self.flipped:
            return self.positions(a, b)
        return self.positions(T - b, T - a).flip()

    # ------------------------------------------------------------------ products
    def apply_rows(self, R, k: int, transpose: bool, out=None):
        lin, j = self._locate(k)
        return lin.apply_rows(R, j, transpose, out)

    def matvec(self, V, k=None):
        return self._apply(V, k, False)

    def rmatvec(self, U, k=None):
        return self._apply(U, k, True)

    def _apply(self, V, k, transpose):
        if k is not None:
            lin, j = self._locate(int(k))
            return lin.rmatvec(V, j) if transpose else lin.matvec(V, j)
        T = self.shape[0]
        parts = []
        for a in range(0, T, self.chunk):
            lin = self.select(slice(a, min(T, a + self.chunk)))
            Vc = V[a:a + self.chunk]
            parts.append(lin.rmatvec(Vc) if transpose else lin.matvec(Vc))
        return torch.cat(parts)

    def moduli(self) -> torch.Tensor:
        """[T, B, S] per-unit factors (diagonal structures), step order."""
        T = self.shape[0]
        parts = [self.positions(a, min(T, a + self.chunk)).moduli() for a in range(0, T, self.chunk)]
        m = torch.cat(parts)
        return m.flip(0) if self.flipped else m


def chunked_linearization(trace: Trace, key, *, chunk: int, dtype=None, step_order: bool = True,
                          device=None) -> ChunkedLinearization:
    """The :class:`ChunkedLinearization` of ``key``'s unit (step order unless ``step_order=False``)."""
    k = _util.resolve(trace, key)
    cell, params, x, prev, mask = _util.unit_data(trace, k)
    return ChunkedLinearization(cell, params, x, prev, mask, trace.step_function(k), max(1, int(chunk)), dtype,
                                flipped=step_order and k.direction == 1, device=device)
