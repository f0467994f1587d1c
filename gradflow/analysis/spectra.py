"""Spectra of Jacobian batches: singular values, eigenvalue moduli, per-step summaries, and a
matrix-free top-k route for large hidden sizes.

All functions take J ``[..., S, S]`` with any leading batch shape (usually ``[T, B]``) and return
values sorted in descending order along the last dimension.

* Full singular spectra use LAPACK's divide-and-conquer SVD without vectors (``gesdd``), batched,
  split over a thread pool when several cores are free. Float32 input is decomposed in float32
  (absolute error ≈ eps32·σ_max), and the matrices whose σ_min/σ_max falls below ``refine`` are
  recomputed in float64 so that small singular values keep their relative accuracy ("float64 only
  where needed"; when most matrices need it, as for saturated LSTM gates, the rest go straight to
  float64). ``refine=0`` keeps plain float32.
* Matrix-free top-k (:func:`top_singular_values`) runs a randomized block Krylov method on JᵀJ
  with Rayleigh–Ritz: only products J V and Jᵀ U (JVP/VJP, or the factored closed form), never
  an S×S matrix.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import GradflowError
from . import _util

__all__ = ["singular_values", "eigenvalue_moduli", "spectral_radius", "step_summary", "top_singular_values",
           "DenseOperator"]


def _finite_or(J: torch.Tensor, fn: str, on_nonfinite: str):
    """(J with non-finite matrices replaced by 0, bad mask [...]) or raise."""
    if on_nonfinite not in ("raise", "nan"):
        raise GradflowError(f"{fn}: on_nonfinite={on_nonfinite!r} must be 'raise' or 'nan'")
    bad = ~torch.isfinite(J).flatten(-2).all(-1)
    if not bool(bad.any()):
        return J, None
    if on_nonfinite == "raise":
        _util.check_finite(J, fn)
    return torch.where(bad[..., None, None], torch.zeros((), dtype=J.dtype), J), bad


def _map_batched(fn, J: torch.Tensor, threads: int | None) -> torch.Tensor:
    """fn over the flattened batch of J [..., S, S], in chunks on a thread pool (torch releases the GIL
    inside LAPACK; each call factors its matrices one after another)."""
    lead = J.shape[:-2]
    flat = J.reshape(-1, *J.shape[-2:])
    n = flat.shape[0]
    if threads is None:
        threads = min(torch.get_num_threads(), os.cpu_count() or 1)
    with _util.intra_op_threads(1):  # one LAPACK call per matrix, parallel over the pool only
        if threads <= 1 or n < 8 * threads or J.shape[-1] < 32:
            chunks = flat.split(64) if n > 64 else [flat]
            return torch.cat([fn(c) for c in chunks]).reshape(*lead, -1)
        chunks = flat.chunk(max(threads * 4, n // 64))
        with ThreadPoolExecutor(threads) as ex:
            parts = list(ex.map(fn, chunks))
    return torch.cat(parts).reshape(*lead, -1)


def _refining_svd(refine: float):
    """Chunk function for float32/16 input: float32 gesdd, then float64 for the matrices with
    σ_min < refine·σ_max. Once more than half of the first ≥ 64 matrices needed it (saturated LSTM
    Jacobians typically all do), later chunks go to float64 directly instead of factoring twice."""
    seen = {"n": 0, "redo": 0}

    def fn(chunk):
        if refine and seen["n"] >= 64 and 2 * seen["redo"] > seen["n"]:
            return torch.linalg.svdvals(chunk.double()).float()
        sv = torch.linalg.svdvals(chunk.float())
        if refine:
            redo = sv[:, -1] < refine * sv[:, 0]
            if bool(redo.any()):
                sv[redo] = torch.linalg.svdvals(chunk[redo].double()).float()
            seen["n"] += chunk.shape[0]
            seen["redo"] += int(redo.sum())
        return sv

    return fn


def singular_values(J: torch.Tensor, *, refine: float = 1e-4, threads: int | None = None,
                    on_nonfinite: str = "raise") -> torch.Tensor:
    """σ_1 ≥ … ≥ σ_S of every matrix of J [..., S, S] -> [..., S] (J's dtype).

    refine: float32/16 input only — matrices with σ_min < refine·σ_max are recomputed in float64 (0
    disables). on_nonfinite: 'raise' (GradflowError locating the first bad matrix) or 'nan' (those
    matrices get NaN singular values: located, not dropped)."""
    _util.check_square(J, "singular_values")
    J, bad = _finite_or(J, "singular_values", on_nonfinite)
    low = J.dtype in (torch.float32, torch.float16, torch.bfloat16)
    sv = _map_batched(_refining_svd(refine) if low else torch.linalg.svdvals, J, threads).to(J.dtype)
    if bad is not None:
        sv[bad] = float("nan")
    return sv


def eigenvalue_moduli(J: torch.Tensor, *, threads: int | None = None, on_nonfinite: str = "raise") -> torch.Tensor:
    """|λ_1| ≥ … ≥ |λ_S| of every matrix of J [..., S, S] -> [..., S] (real, J's real dtype)."""
    _util.check_square(J, "eigenvalue_moduli")
    J, bad = _finite_or(J, "eigenvalue_moduli", on_nonfinite)
    mod = _map_batched(lambda a: torch.linalg.eigvals(a).abs(), J, threads)
    mod = mod.sort(-1, descending=True).values.to(J.real.dtype if J.is_complex() else J.dtype)
    if bad is not None:
        mod[bad] = float("nan")
    return mod


def spectral_radius(J: torch.Tensor, **kw) -> torch.Tensor:
    """max_i |λ_i| of every matrix of J [..., S, S] -> [...]."""
    return eigenvalue_moduli(J, **kw)[..., 0]


def step_summary(J: torch.Tensor, *, radius: bool = True, sigma: torch.Tensor | None = None,
                 on_nonfinite: str = "nan") -> dict[str, torch.Tensor]:
    """Per-matrix summaries of J [..., S, S], each [...]: ``sigma_max``, ``sigma_min``,
    ``frac_gt1`` (fraction of singular values > 1) and, if ``radius``, ``spectral_radius``.
    ``sigma`` may pass precomputed singular values [..., S]. Non-finite matrices give NaN."""
    _util.check_square(J, "step_summary")
    sv = sigma if sigma is not None else singular_values(J, on_nonfinite=on_nonfinite)
    out = {"sigma_max": sv[..., 0], "sigma_min": sv[..., -1], "frac_gt1": (sv > 1).to(sv.dtype).mean(-1)}
    out["frac_gt1"][torch.isnan(sv[..., 0])] = float("nan")
    if radius:
        out["spectral_radius"] = spectral_radius(J, on_nonfinite=on_nonfinite)
    return out


class DenseOperator:
    """Adapter giving explicit Jacobians J [T, B, S, S] the matvec/rmatvec interface of a
    :class:`~gradflow.analysis.Linearization`."""

    def __init__(self, J: torch.Tensor):
        self.J = _util.check_steps(J, "DenseOperator")

    @property
    def shape(self):
        T, B, S, _ = self.J.shape
        return int(T), int(B), int(S)

    @property
    def dtype(self):
        return self.J.dtype

    def to(self, dtype):
        return DenseOperator(self.J.to(dtype))

    def select_batch(self, idx):
        """The same steps for batch items ``idx`` only."""
        return DenseOperator(self.J[:, idx])

    def matvec(self, V, k=None):
        return (self.J if k is None else self.J[k]) @ V.to(self.J.dtype)

    def rmatvec(self, U, k=None):
        return (self.J if k is None else self.J[k]).mT @ U.to(self.J.dtype)

    def apply_rows(self, R, k, transpose, out=None):
        """Rows R [n, B, S] -> rows of J_k v (or J_kᵀ u) for every row (into ``out`` if given)."""
        Jk = self.J[k].to(R.dtype)
        res = torch.einsum("nbs,bst->nbt", R, Jk) if transpose else torch.einsum("nbt,bst->nbs", R, Jk)
        return res if out is None else out.copy_(res)


def _as_operator(op):
    if isinstance(op, torch.Tensor):
        return DenseOperator(op)
    if not all(hasattr(op, a) for a in ("matvec", "rmatvec", "shape")):
        raise GradflowError(f"expected Jacobians [T, B, S, S] or a Linearization, got {type(op).__name__}")
    return op


def _orth_against(W, Q):
    """W - Q (Qᵀ W), twice (classical Gram–Schmidt with reorthogonalization)."""
    for _ in range(2):
        W = W - Q @ (Q.mT @ W)
    return W


def top_singular_values(op, k: int, *, block: int | None = None, tol: float = 1e-9, max_basis: int | None = None,
                        seed: int = 0) -> torch.Tensor:
    """Largest k singular values of every J_t, matrix-free -> [T, B, k] float64, descending.

    op: a :class:`~gradflow.analysis.Linearization` (from ``linearize_trace``; products via the factored
    closed form or JVP/VJP for custom cells) or explicit J [T, B, S, S]. Builds the block Krylov space
    span{V, (JᵀJ)V, (JᵀJ)²V, …} (block size ``block``, default max(k+4, 2k)) one block per iteration,
    with one J·V and one Jᵀ·U per block, and stops when the Ritz values σ_i(J Q) change by less than
    ``tol`` (relative) or the basis spans the whole space."""
    op = _as_operator(op)
    T, B, S = op.shape
    k = _util.positive_int(k, "k", "top_singular_values")
    if k > S:
        raise GradflowError(f"top_singular_values: k={k} exceeds the state size S={S}")
    op = op.to(torch.float64)
    b = min(S, block or max(k + 4, 2 * k))
    cap = min(S, max_basis or S)
    g = torch.Generator().manual_seed(seed)
    V = torch.linalg.qr(torch.randn(T, B, S, b, generator=g, dtype=torch.float64)).Q
    Qs, Ys = [V], [op.matvec(V)]
    prev = None
    while True:
        Q, Y = torch.cat(Qs, -1), torch.cat(Ys, -1)
        ritz = torch.linalg.svdvals(Y)[..., :k]
        if prev is not None:
            change = ((ritz - prev).abs() / ritz.clamp_min(torch.finfo(ritz.dtype).tiny)).max()
            if float(change) <= tol:
                return ritz
        if Q.shape[-1] >= cap:
            return ritz
        prev = ritz
        nb = min(b, cap - Q.shape[-1])
        W = op.rmatvec(Ys[-1][..., :nb])  # (JᵀJ) q for the newest block
        scale = W.norm(dim=-2, keepdim=True)
        W = _orth_against(W, Q)
        dead = W.norm(dim=-2, keepdim=True) <= 1e-10 * scale.clamp_min(1e-300)
        if bool(dead.any()):  # invariant subspace found: continue with fresh random directions
            W = torch.where(dead, _orth_against(torch.randn(W.shape, generator=g, dtype=W.dtype), Q), W)
        W = torch.linalg.qr(_orth_against(W, Q)).Q
        Qs.append(W)
        Ys.append(op.matvec(W))
