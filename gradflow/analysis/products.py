"""Products of Jacobians over distance and the Lyapunov spectrum, in float64 and the log domain.

Step order (see :mod:`gradflow.analysis._util`): ``J[k] = ∂s_k/∂s_{k-1}``. The product over distance
d starting at step ``start`` is ``P_d = J[start+d-1] ⋯ J[start] = ∂s_{start+d-1}/∂s_{start-1}``.

QR propagation (Benettin): ``J[k] Q_{k-1} = Q_k R_k`` with Q_0 = I, so that
``P_d = Q_d (R_d ⋯ R_1)``. The triangular factor is stored with a per-row log scale,
``R_d ⋯ R_1 = diag(e^ℓ) N`` (rows of N have unit max-norm), updated as a log-sum-exp product so that
nothing overflows or underflows however long the distance. Singular values of P_d are those of
that triangle: an SVD of ``diag(e^{ℓ-max ℓ}) N`` when they all lie within 1e-7 of σ_1, else a graded
refinement (unshifted QR iteration on the scaled triangle, then per-block SVDs at each decoupled block's
own scale; see ``_log_svd``) that keeps every rank to float64 relative accuracy.

Lyapunov exponents λ_i = lim (1/n) Σ_k ln|(R_k)_ii| (natural log per step), sorted descending. Several
steps are multiplied before each re-orthonormalisation while the accumulated spread of the
spectrum stays below e^18 (about 1e8, so the smallest diagonal keeps ≥ 8 digits) and nothing
exceeds e^±300 — exact in exact arithmetic since the diagonal of a product of triangles is the
product of the diagonals.

Diagonal Jacobians (a Linearization whose kind declares the structure ``diagonal`` or
``complex_diagonal``) need no QR: a product of diagonal maps scales each unit by the product of its
factors, so ln σ(P_d) are the per-unit sums Σ_k ln|d_k| (ln|λ_k| twice for a complex unit), sorted,
and the Lyapunov exponents are the per-unit time averages of ln|d_k|: exact, at the cost of a cumsum.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .. import kinds
from ..errors import GradflowError
from . import _util
from ..trace import Trace
from .jacobian import linearize_trace
from .linear import linearize
from .topk import oversampled, product_topk
from .spectra import DenseOperator, _as_operator, _reference_tensor, on_device, resolve_device

__all__ = ["product_singular_values", "product_spectrum", "lyapunov_exponents", "lyapunov_spectrum", "LyapunovResult"]

_SPREAD = 18.0  # ln of the largest condition number allowed inside one block product
_RANGE = 300.0  # ln of the largest magnitude allowed inside one block product
_DENSE_ELEMS = 1 << 21  # entries of dense Jacobians formed at once by the Lyapunov sweep
# The batch is split into parallel groups only while each group's step still costs about this many
# flops (a step of the whole batch costs ~B·k·S²): below it, per-op Python time holding the GIL
# outweighs the parallel arithmetic (measured: a tanh RNN with S=32, B=16 ran no faster on 2
# threads; an LSTM with S=64 ran 1.8x faster).
_THREAD_FLOPS = 1 << 21
# Full frames of at least this many columns are kept in Householder form between blocks (geqrf, then
# the next block's first product J_t Q by ormqr: no orgqr). Below it the gain is small, and the plain
# route's arithmetic is kept: it is bit-for-bit that of qr(J_t @ Q) on explicit Jacobians, which
# matters where rounding alone decides an exponent (a singular product's noise-level R_ii ≈ e^-36).
_IMPLICIT_MIN_S = 64


def _logabs(x):
    return torch.log(x.abs())


def _qr(Z):
    """Householder QR; diag(R) >= 0 is not needed (only |R_ii| is used)."""
    return torch.linalg.qr(Z)


def _structured(op) -> bool:
    return getattr(op, "structure", "dense") != "dense"


def _log_moduli(op, mask) -> torch.Tensor:
    """[T, B, S] ln of the per-unit factors of a diagonal-structured op (0 at steps masked out)."""
    lm = torch.log(op.moduli().to(torch.float64))
    return lm if mask is None else torch.where(mask[..., None], lm, torch.zeros((), dtype=lm.dtype))


def _rows(op, R, k, valid):
    """Rows R [m, B, S] -> rows of J_k v for every row; identity where ``valid`` [B] is False."""
    out = op.apply_rows(R, k, False) if hasattr(op, "apply_rows") else op.matvec(R.permute(1, 2, 0), k).permute(2, 0, 1)
    return out if valid is None else torch.where(valid[:, None], out, R)


def _scaled_product(R, ell, N):
    """(R diag(e^ℓ) N) as (ℓ', N') with rows of N' of unit max-norm. R [B, S, S] upper triangular."""
    logR = _logabs(R)  # -inf where R_ij = 0
    a = logR + ell[..., None, :]
    m = a.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    scaled = torch.where(torch.isfinite(a), R.sign() * torch.exp(a - m), torch.zeros_like(R))
    rows = scaled @ N
    r = rows.abs().amax(-1, keepdim=True)
    ok = r > 0
    N2 = torch.where(ok, rows / torch.where(ok, r, torch.ones_like(r)), torch.zeros_like(rows))
    ell2 = torch.where(ok, m + torch.log(torch.where(ok, r, torch.ones_like(r))), torch.full_like(r, -math.inf))
    return ell2[..., 0], N2


_RELIABLE = 1e-7  # a float64 SVD gives σ_i to ~eps·σ_1/σ_i relative: trusted down to this ratio
# Two groups of ranks are decoupled when every entry of N coupling them is at most this: then
# diag(e^ℓ) N = blockdiag(blocks) (I + E) with ‖E‖ of that order, so each σ_i is that of its block
# to a relative 1 ± ‖E‖ (multiplicative perturbation), and each block is resolved at its own scale.
_DECOUPLED = 1e-15
_NARROW = math.log(1.0 / _RELIABLE) - 2.0  # ln-spread of a block one SVD resolves with margin


def _graded_step(ell, N):
    """One exact step: sort rows by ℓ; Nᵀ = QR; continue with R diag(e^ℓ) in row-scaled form."""
    order = ell.argsort(-1, descending=True)
    ell = ell.gather(-1, order)
    N = N.gather(-2, order[..., None].expand_as(N))
    R = torch.linalg.qr(N.mT, mode="r").R
    return _scale_columns(R, ell)


def _scale_columns(R, ell):
    """R diag(e^ℓ) as (ℓ', N') with rows of N' of unit max-norm, for R [.., m, m] upper triangular and
    ℓ descending (the state of :func:`_graded_step`): row i of R diag(e^{ℓ-ℓ_i}) has the factors
    e^{ℓ_j-ℓ_i} ≤ 1 at j ≥ i, so it is formed directly, without logarithms of R. (A factor below
    e^-745 flushes to 0: an entry that small against its row's own scale.) -inf in ℓ: a dead row."""
    d = ell[..., None, :] - ell[..., :, None]
    d = torch.nan_to_num(d, nan=-math.inf).clamp_(max=0.0)  # j < i (R_ij = 0); -inf - -inf: a dead row
    W = d.exp_().mul_(R)
    r = W.abs().amax(-1)
    ok = r > 0
    N2 = W.div_(torch.where(ok, r, torch.ones_like(r))[..., None])
    ell2 = torch.where(ok, ell + torch.log(torch.where(ok, r, torch.ones_like(r))), torch.full_like(r, -math.inf))
    return ell2, N2


def _coupling(N):
    """[.., m] the largest |N_ij| with i < p ≤ j, for every split p (0 at p = 0): how strongly the rows
    above a split reach the columns from it on, for N upper triangular."""
    A = N.abs()
    suffix = A.flip(-1).cummax(-1).values.flip(-1)  # [.., i, p] = max_{j ≥ p} |N_ij|
    return suffix.triu(1).amax(-2)  # rows i < p only


def _blocks(coupling, diag):
    """(starts [.., m] bool: a block begins at p; narrow [..] bool: every block's finite diagonal
    spreads less than _NARROW, so one SVD per block resolves all its ranks)."""
    starts = coupling <= _DECOUPLED
    starts[..., 0] = True
    bid = starts.cumsum(-1) - 1  # block index of each rank
    fin = torch.isfinite(diag)
    hi = torch.full_like(diag, -math.inf).scatter_reduce(-1, bid, torch.where(fin, diag, -math.inf), "amax")
    lo = torch.full_like(diag, math.inf).scatter_reduce(-1, bid, torch.where(fin, diag, math.inf), "amin")
    spread = torch.where(hi >= lo, hi - lo, torch.zeros_like(hi))
    return starts, (spread < _NARROW).all(-1)


def _log_svd(ell, N, max_iter: int = 60, tol: float = 1e-13):
    """ln σ of diag(e^ℓ) N (N [B, S, S], finite rows of unit max-norm), descending [B, S].

    Fast path: one SVD of diag(e^{ℓ-max ℓ}) N when every σ_i ≥ 1e-7·σ_1. Otherwise, graded
    refinement: repeated exact steps (sort rows by ℓ, Nᵀ = QR, continue with R diag(e^ℓ) — same
    singular values, since column scaling commutes with QR) are unshifted QR iteration, which
    shrinks the coupling of ranks i < j by e^{-(ln σ_i - ln σ_j)} per step. The ranks fall into
    blocks whose mutual coupling in N is at most 1e-15 (each σ_i is then its block's to that
    relative accuracy); each item stops as soon as every block is narrow enough (ln-spread below
    ln 1e7 − 2) for one SVD at the block's own scale, or its diagonal has converged, or after
    ``max_iter`` steps. Each block is then resolved by an SVD at its own scale (ranks it cannot
    resolve keep the converged diagonal)."""
    out = _log_svd_rows(ell, N, max_iter, tol)
    # r rows of exactly zero scale (an exactly singular step) leave rank ≤ m − r: those σ are exactly 0,
    # not the rounding noise an SVD of the remaining rows would give them
    dead = torch.isneginf(ell).sum(-1, keepdim=True)
    rank = torch.arange(ell.shape[-1], device=ell.device)
    return torch.where(rank >= ell.shape[-1] - dead, torch.full((), -math.inf, dtype=out.dtype, device=out.device), out)


def _diagonal(ell, N):
    return ell + _logabs(N.diagonal(dim1=-2, dim2=-1))


def _log_svd_rows(ell, N, max_iter, tol):
    top = ell.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    sv = torch.linalg.svdvals(torch.exp(ell - top)[..., None] * N)
    out = torch.log(sv) + top
    need = (sv < _RELIABLE * sv[..., :1]).any(-1)
    if not bool(need.any()):
        return out
    ell, N = ell[need], N[need]
    n = ell.shape[0]
    diag = torch.full_like(ell, math.nan)
    starts = torch.ones_like(ell, dtype=torch.bool)
    active = torch.arange(n, device=ell.device)  # items still iterating
    a_ell, a_N, a_diag = ell, N, None
    for _ in range(max_iter):
        a_ell, a_N = _graded_step(a_ell, a_N)
        new = _diagonal(a_ell, a_N)
        a_starts, narrow = _blocks(_coupling(a_N), new)
        done = narrow
        if a_diag is not None:
            both = torch.isfinite(new) & torch.isfinite(a_diag)
            change = torch.where(both, (new - a_diag).abs(), torch.zeros_like(new)).amax(-1)
            done = done | ((change <= tol) & (torch.isfinite(new) == torch.isfinite(a_diag)).all(-1))
        ell[active], N[active], diag[active], starts[active] = a_ell, a_N, new, a_starts
        keep = ~done
        if not bool(keep.any()):
            break
        active, a_ell, a_N, a_diag = active[keep], a_ell[keep], a_N[keep], new[keep]
    res = diag.clone()
    for i in range(n):
        cut = torch.nonzero(starts[i]).flatten().tolist() + [diag.shape[-1]]
        for a, b in zip(cut[:-1], cut[1:]):
            if b - a < 2:
                continue
            m = ell[i, a:b].amax()
            if not bool(torch.isfinite(m)):
                continue
            csv = torch.linalg.svdvals(torch.exp(ell[i, a:b] - m)[:, None] * N[i, a:b, a:b])
            ok = csv >= _RELIABLE * csv[0]
            block = diag[i, a:b].sort(descending=True).values
            res[i, a:b] = torch.where(ok, torch.log(csv) + m, block)
    out[need] = res.sort(-1, descending=True).values
    return out


def _on(op, device, fn):
    """(float64 operator on the resolved device, device)."""
    op = _as_operator(op)
    dev = resolve_device(device, _reference_tensor(op), fn)
    return on_device(op.to(torch.float64), dev), dev


def product_singular_values(J, *, distances=None, start: int = 0, mask=None, k: int | None = None,
                            device=None, tol: float = 1e-11, threads: int | None = None) -> torch.Tensor:
    """ln σ_i(P_d) for each requested distance -> [len(distances), B, S] (or [.., k]) float64 (CPU), descending.

    J: explicit Jacobians [T, B, S, S] or a Linearization, in step order; distances: increasing ints
    in 1..T-start (default all); start: first step of the products; mask [T, B] (False = identity
    step, e.g. ``trace.mask`` flipped for direction 1). -inf marks an exactly singular product.
    k: only the k largest, matrix-free (k-column frames carried with QR, subspace iteration and a
    block Krylov at short distances: :mod:`gradflow.analysis.topk`); None: all S (a full frame).
    Diagonal structures are exact per unit either way. device: where to compute (default: the
    operator's device when it is CUDA, else CPU); tol: convergence of the top-k route (ln σ, absolute);
    threads: the full-frame route sweeps the batch items in this many groups in parallel, each with
    one intra-op thread (default as :func:`lyapunov_exponents`: torch's intra-op thread count, at
    most the cores, fewer while a group's step would cost under ~2 Mflop); the top-k route finishes
    the distances its shared rounds leave unsettled on this many threads (default: torch's intra-op
    thread count, at most the cores). Either way the result is the same, to rounding. Every
    thread runs one intra-op thread."""
    outer = torch.get_num_threads()
    with _util.intra_op_threads(1):
        return _product_singular_values(J, distances, start, mask, k, device, tol, threads, outer)


def _product_singular_values(J, distances, start, mask, k, device, tol, threads, outer) -> torch.Tensor:
    op, dev = _on(J, device, "product_singular_values")
    T, B, S = op.shape
    mask = _util.check_mask(mask, T, B, "product_singular_values")
    start = _util.positive_int(start, "start", "product_singular_values", allow_zero=True)
    if start >= T:
        raise GradflowError(f"product_singular_values: start={start} must be < T={T}")
    if k is not None:
        k = _util.positive_int(k, "k", "product_singular_values")
        if k > S:
            raise GradflowError(f"product_singular_values: k={k} exceeds the state size S={S}")
    ds = list(range(1, T - start + 1)) if distances is None else [int(d) for d in distances]
    if not ds or ds != sorted(set(ds)) or ds[0] < 1 or ds[-1] > T - start:
        raise GradflowError(f"product_singular_values: distances must be increasing ints in 1..{T - start}, got {ds[:6]}")
    if threads is not None:
        threads = _util.positive_int(threads, "threads", "product_singular_values")
    if _structured(op):  # per-unit products: exact, no QR
        cs = _log_moduli(op, None if mask is None else mask.to(dev))[start:start + ds[-1]].cumsum(0)
        out = cs[[d - 1 for d in ds]].sort(-1, descending=True).values
        return (out if k is None else out[..., :k]).cpu()
    serial = getattr(op, "step", None) is not None or dev.type != "cpu"
    # torch.func's forward-AD levels are per process, not per thread; one stream on a GPU
    if k is not None and oversampled(k, S) < S:
        n = 1 if serial else (min(outer, os.cpu_count() or 1) if threads is None else threads)
        return product_topk(op, ds, start, k, mask, dev, tol=tol, threads=n).cpu()
    mask = None if mask is None else mask.to(dev)
    if threads is None:
        threads = min(outer, os.cpu_count() or 1, max(1, B * S ** 3 // _THREAD_FLOPS))
    threads = max(1, min(threads, B))
    if serial:
        threads = 1
    want = set(ds)

    def chain(idx):
        sub = op if idx is None else op.select_batch(idx.to(dev))
        m = None if mask is None else (mask if idx is None else mask[:, idx.to(dev)])
        b = B if idx is None else idx.numel()
        Q = torch.eye(S, dtype=torch.float64, device=dev).expand(b, S, S).clone()
        ell = torch.zeros(b, S, dtype=torch.float64, device=dev)
        N = Q.clone()
        out = []
        for d in range(1, ds[-1] + 1):
            j = start + d - 1
            Zr = _rows(sub, Q.permute(2, 0, 1).contiguous(), j, None if m is None else m[j])
            Q, R = _qr(Zr.permute(1, 2, 0))
            ell, N = _scaled_product(R, ell, N)
            if d in want:
                out.append(_log_svd(ell, N))
        return torch.stack(out)

    if threads == 1:
        out = chain(None)
    else:
        groups = [idx for idx in torch.arange(B).tensor_split(threads) if idx.numel()]
        with ThreadPoolExecutor(len(groups)) as ex:
            out = torch.cat(list(ex.map(chain, groups)), dim=1)
    return (out if k is None else out[..., :k]).cpu()


@dataclass(frozen=True, eq=False)
class LyapunovResult:
    """Lyapunov exponents (natural log per step) of each batch item.

    exponents [B, k] descending; stderr [B, k] batch-means standard error (8 blocks of the steps
    after warm-up); drift [B] max_i |λ_i(second half) − λ_i(first half)|, a convergence check;
    running [nblk, B, k] the running estimate at the end of each of those blocks; steps [B] the
    number of (valid) steps averaged; warmup: steps discarded."""

    exponents: torch.Tensor
    stderr: torch.Tensor
    drift: torch.Tensor
    running: torch.Tensor
    steps: torch.Tensor
    warmup: int


def lyapunov_exponents(J, *, warmup: int = 0, k: int | None = None, mask=None, blocks: int = 8,
                       seed: int = 0, threads: int | None = None, device=None, chunk: int | None = None,
                       frame: str = "identity") -> LyapunovResult:
    """Lyapunov spectrum of the step-ordered Jacobians J (explicit [T, B, S, S] or a Linearization).

    warmup: steps run (to align Q with the dominant directions) but not averaged; k: number of
    exponents (default S; with k < S, Q_0 = qr(G[:, :k]).Q with G [S, S] standard normal from ``seed`` — the
    leading k columns of the S-column frame of ``frame='random'``, so the top-k run follows the
    leading columns of that full run exactly; ``frame='identity'``, the default, starts a full run
    from I, exact at once for constant diagonal maps); mask [T, B]: steps
    that are False are identity maps and not counted. Batch items are independent: they are swept
    in ``threads`` groups in parallel, each with one intra-op thread (default: torch's intra-op
    thread count, at most the cores, and fewer while a group's step would cost under ~2 Mflop).
    device: where to compute (default: the operator's device when it is CUDA, else CPU); chunk:
    steps handed to the sweep at once (the sweep itself only ever holds O(B·S·k)). Results on the CPU."""
    op, dev = _on(J, device, "lyapunov_exponents")
    T = op.shape[0]
    # a ChunkedLinearization is swept one of its own chunks at a time (its coefficients for all T are never held)
    chunk = (getattr(op, "chunk", None) or T) if chunk is None else _util.positive_int(chunk, "chunk", "lyapunov_exponents")
    return _lyapunov(lambda a, b: op.select(slice(a, b)), op, T, mask, warmup, k, blocks, seed, threads, dev, chunk,
                     frame)


def _lyapunov(get, probe, T, mask, warmup, k, blocks, seed, threads, dev, chunk, frame) -> LyapunovResult:
    """The Lyapunov sweep over the steps of ``get(a, b)`` (the float64 operator of steps a..b-1 on
    ``dev``), ``chunk`` steps at a time; ``probe``: an operator with the shape and kind of all steps."""
    _, B, S = probe.shape
    fn = "lyapunov_exponents"
    mask = _util.check_mask(mask, T, B, fn)
    warmup = _util.positive_int(warmup, "warmup", fn, allow_zero=True)
    if warmup >= T:
        raise GradflowError(f"lyapunov_exponents: warmup={warmup} leaves no steps of T={T}")
    k = S if k is None else _util.positive_int(k, "k", fn)
    if k > S:
        raise GradflowError(f"lyapunov_exponents: k={k} exceeds the state size S={S}")
    if threads is None:
        threads = min(torch.get_num_threads(), os.cpu_count() or 1, max(1, B * k * S * S // _THREAD_FLOPS))
    threads = max(1, min(int(threads), B))
    if getattr(probe, "step", None) is not None or dev.type != "cpu":
        threads = 1  # torch.func's forward-AD levels are per process, not per thread; one stream on a GPU

    if frame not in ("identity", "random"):
        raise GradflowError(f"lyapunov_exponents: frame={frame!r} must be 'identity' or 'random'")
    if k == S and frame == "identity":
        Q = torch.eye(S, dtype=torch.float64).expand(B, S, S).clone()
    else:  # Q_0 = qr(G[:, :k]), G [S, S] ~ N(0, 1) from ``seed`` (always S×S: torch draws another stream
        g = torch.Generator().manual_seed(seed)  # for another size): a k < S frame is the leading k
        G = torch.randn(S, S, generator=g, dtype=torch.float64)  # columns of the frame='random' full one
        Q = torch.linalg.qr(G[:, :k]).Q.expand(B, S, k).clone()
    Q = Q.to(dev)
    valid = torch.ones(T, B, dtype=torch.bool) if mask is None else mask.cpu()
    counted = valid.clone()
    counted[:warmup] = False
    nblk = max(1, min(blocks, T - warmup))
    edges = [warmup + round(i * (T - warmup) / nblk) for i in range(nblk + 1)]
    groups = [idx for idx in torch.arange(B).tensor_split(threads) if idx.numel()]
    blk_sum = torch.zeros(nblk, B, k, dtype=torch.float64)
    blk_n = torch.zeros(nblk, B, dtype=torch.float64)
    if _structured(probe):
        lm_sum = torch.zeros(nblk, B, S, dtype=torch.float64)
        for a in range(0, T, chunk):
            b = min(T, a + chunk)
            lm = _log_moduli(get(a, b), counted[a:b].to(dev)).cpu()
            for i in range(nblk):
                lo, hi = max(a, edges[i]), min(b, edges[i + 1])
                if lo < hi:
                    lm_sum[i] += lm[lo - a:hi - a].sum(0)
        for i in range(nblk):
            blk_n[i] = counted[edges[i]:edges[i + 1]].sum(0).to(torch.float64)
        blk_sum = _top_units(lm_sum, blk_n, k)
    else:
        state = {int(idx[0]): (Q[idx.to(dev)], 1) for idx in groups}
        with _util.intra_op_threads(1):
            for a in range(0, T, chunk):
                b = min(T, a + chunk)
                op = get(a, b)

                def sweep(idx, op=op, a=a):
                    sub = op if len(groups) == 1 else op.select_batch(idx.to(dev))
                    Qg, span = state[int(idx[0])]
                    bs, bn, Qg, span = _lyapunov_sweep(sub, Qg, valid[:, idx], counted[:, idx], warmup, edges, a, span)
                    state[int(idx[0])] = (Qg, span)
                    return idx, bs, bn

                if len(groups) == 1:
                    parts = [sweep(groups[0])]
                else:
                    with ThreadPoolExecutor(len(groups)) as ex:
                        parts = list(ex.map(sweep, groups))
                for idx, bs, bn in parts:
                    blk_sum[:, idx] += bs
                    blk_n[:, idx] += bn
    total, n_tot = blk_sum.sum(0), blk_n.sum(0)
    ex = total / n_tot.clamp_min(1)[:, None]
    order = ex.argsort(-1, descending=True)
    bm = blk_sum / blk_n.clamp_min(1)[..., None]
    bm = bm.gather(-1, order.expand(nblk, B, k))
    stderr = bm.std(0, unbiased=True) / math.sqrt(nblk) if nblk > 1 else torch.full((B, k), math.nan)
    running = (blk_sum.cumsum(0) / blk_n.cumsum(0).clamp_min(1)[..., None]).sort(-1, descending=True).values
    half = nblk // 2
    if half >= 1:
        first = blk_sum[:half].sum(0) / blk_n[:half].sum(0).clamp_min(1)[:, None]
        second = blk_sum[half:].sum(0) / blk_n[half:].sum(0).clamp_min(1)[:, None]
        drift = (first.sort(-1).values - second.sort(-1).values).abs().amax(-1)
    else:
        drift = torch.full((B,), math.nan)
    return LyapunovResult(ex.gather(-1, order), stderr, drift, running, n_tot, warmup)


def _top_units(lm_sum, blk_n, k: int):
    """Per-block sums of ln|d_k| [nblk, B, S] of a diagonal-structured op -> those of the k units with the
    largest averages (the exponents a k-column QR frame converges to)."""
    if k < lm_sum.shape[-1]:
        top = (lm_sum.sum(0) / blk_n.sum(0).clamp_min(1)[:, None]).argsort(-1, descending=True)[:, :k]
        lm_sum = lm_sum.gather(-1, top.expand(len(lm_sum), *top.shape))
    return lm_sum


def _dense_steps_cheap(op, S: int) -> bool:
    """Whether a full frame of S columns is swept in Householder form: J_t of ``op`` can be formed at the
    cost of a few passes over S×S (explicit Jacobians, or a closed-form dense kind; not a custom cell's
    autograd Jacobian) and S is large enough to gain: from the kind's ``householder_from`` (measured,
    1 thread, B=16: tanh RNN S=128 1.3x, GRU S=128 1.14x, LSTM S=64 2.3x and S=128 1.45x faster; tanh
    RNN S=64 1.25x slower, GRU S=64 even, S=32 no gain — their blocks span several steps, so one
    orgqr per block matters less)."""
    if S < _IMPLICIT_MIN_S:
        return False
    if isinstance(op, DenseOperator):
        return S >= 2 * _IMPLICIT_MIN_S
    cell = getattr(op, "cell", None)
    if cell is None or getattr(op, "step", None) is not None or _structured(op):
        return False
    start = kinds.get(cell.kind).impl.householder_from
    return start is not None and S >= start


def _dense_steps(op, a: int, b: int, valid):
    """J_t [b-a, B, S, S] of the op's steps a..b-1; the identity where ``valid`` [b-a, B] is False."""
    sub = op.select(slice(a, b))
    J = sub.J if isinstance(sub, DenseOperator) else sub.dense()
    if valid is not None:
        J = torch.where(valid[..., None, None], J, torch.eye(J.shape[-1], dtype=J.dtype, device=J.device))
    return J


def _lyapunov_sweep(op, Q, valid, counted, warmup: int, edges: list[int], t0: int = 0, span: int = 1):
    """QR propagation of the frames Q [B, S, k] through the steps t0 .. t0+n-1 held by ``op`` (n steps);
    valid/counted [T, B] of all steps. Returns the per-block sums of ln|R_ii| [nblk, B, k] and
    valid-step counts [nblk, B] of the statistics blocks ``edges`` (CPU), the frames and the span."""
    n, B, _ = op.shape
    T = t0 + n
    k = Q.shape[-1]
    nblk = len(edges) - 1
    dev = Q.device
    full = valid.all(1).tolist()
    valid_d = valid.to(dev)
    blk_sum = torch.zeros(nblk, B, k, dtype=torch.float64)
    blk_n = torch.zeros(nblk, B, dtype=torch.float64)
    # The kind decides when forming each J_t (vectorised over steps) and one batched J Q is cheaper
    # than products J v (a GRU's J v costs a GEMM with all three gate blocks of W_hh).
    S = op.shape[2]
    # A full frame (k = S) of a kind with cheap dense J_t is kept in Householder form between blocks:
    # the block's first product is J_t Q = ormqr(J_t) (LAPACK applies the reflectors; no orgqr forms Q,
    # which cost as much as the QR itself for S ≤ 256) and the factorisation is geqrf alone.
    implicit = k == S and dev.type == "cpu" and _dense_steps_cheap(op, S)
    dense = implicit or bool(getattr(op, "dense_sweep", lambda k: False)(k))
    chunk = max(1, _DENSE_ELEMS // max(1, B * S * S))  # steps of dense Jacobians held at once
    house = None  # (reflectors, tau) of the frame while it is kept in Householder form
    t = t0
    while t < T:
        # one block: steps t .. e-1, never crossing a warm-up or statistics-block edge (or the chunk's end)
        e = min(T, t + span, min(x for x in edges + [T] if x > t))
        if dense:
            Z = None if house is not None else Q
            for a in range(t, e, chunk):
                b = min(e, a + chunk)
                Jc = _dense_steps(op, a - t0, b - t0, None if all(full[a:b]) else valid_d[a:b])
                for Jj in Jc:
                    Z = torch.bmm(Jj, Z) if Z is not None else torch.ormqr(house[0], house[1], Jj, left=False)
        else:
            Zr = Q.permute(2, 0, 1).contiguous()  # rows [k, B, S]
            for j in range(t, e):
                Zr = _rows(op, Zr, j - t0, None if full[j] else valid_d[j])
            Z = Zr.permute(1, 2, 0)
        if implicit:
            house = torch.geqrf(Z)
            Q = None
            lr = _logabs(house[0].diagonal(dim1=-2, dim2=-1)).cpu()
        else:
            Q, R = _qr(Z)
            lr = _logabs(R.diagonal(dim1=-2, dim2=-1)).cpu()  # [B, k], the sum over the block's steps
        if e > warmup:
            blk = max(i for i in range(nblk) if edges[i] <= t)
            blk_sum[blk] += lr
            blk_n[blk] += counted[t:e].sum(0).to(torch.float64)
        fin = lr[torch.isfinite(lr)]
        per = (fin.abs().amax() if fin.numel() else torch.tensor(0.0)) / (e - t)
        spread = ((lr.amax(-1) - lr.amin(-1)).amax() / (e - t)) if bool(torch.isfinite(lr).all()) else math.inf
        span = max(1, min(64, int(min(_SPREAD / max(float(spread), 1e-12), _RANGE / max(float(per), 1e-12)))))
        t = e
    if house is not None:
        Q = torch.linalg.householder_product(*house)
    return blk_sum, blk_n, Q, span


def _trace_steps(trace: Trace, key, device, fn: str):
    """(get(a, b) -> float64 Linearization of steps a..b-1 in processing order on the device, T, mask in
    step order [T, B], device). Each call linearizes only those steps (a time chunk of the trace)."""
    k = _util.resolve(trace, key)
    cell, params, x, prev, mask = _util.unit_data(trace, k)
    dev = resolve_device(device, x, fn)
    step = trace.step_function(k)
    T = int(x.shape[0])
    flip = k.direction == 1
    params = None if params is None else {n: v.to(dev) for n, v in params.items()}

    def get(a: int, b: int):
        lo, hi = (T - b, T - a) if flip else (a, b)
        op = linearize(cell, params, x[lo:hi].to(dev), tuple(p[lo:hi].to(dev) for p in prev),
                       mask=mask[lo:hi].to(dev), step=step, dtype=torch.float64)
        return op.flip() if flip else op

    return get, T, (mask.flip(0) if flip else mask), dev


def product_spectrum(trace: Trace, key, *, distances=None, start: int = 0, k: int | None = None,
                     device=None, threads: int | None = None) -> torch.Tensor:
    """ln σ_i(∂s_{k+d-1}/∂s_{k-1}) of the joint state of ``key``'s unit, k = ``start`` in processing
    order (step 0 is position 0 for direction 0, position T-1 for direction 1) -> [len(distances), B,
    S] (or the top ``k``, matrix-free) float64, descending. Only the steps the products cover are
    linearized. See :func:`product_singular_values`."""
    get, T, mask, dev = _trace_steps(trace, key, device, "product_spectrum")
    start = _util.positive_int(start, "start", "product_spectrum", allow_zero=True)
    if start >= T:
        raise GradflowError(f"product_spectrum: start={start} must be < T={T}")
    ds = list(range(1, T - start + 1)) if distances is None else [int(d) for d in distances]
    if not ds or ds != sorted(set(ds)) or ds[0] < 1 or ds[-1] > T - start:
        raise GradflowError(f"product_spectrum: distances must be increasing ints in 1..{T - start}, got {ds[:6]}")
    stop = start + ds[-1]
    return product_singular_values(get(start, stop), distances=ds, mask=mask[start:stop], k=k, device=dev,
                                   threads=threads)


def lyapunov_spectrum(trace: Trace, key, *, warmup: int = 0, k: int | None = None, blocks: int = 8,
                      seed: int = 0, threads: int | None = None, device=None,
                      chunk: int | None = None, frame: str = "identity") -> LyapunovResult:
    """Lyapunov exponents (ln per step, descending, per batch item) of the joint state of ``key``'s unit
    along the recorded sequence, from its per-step Jacobians in processing order; masked steps are
    not counted. chunk: steps linearized at once (None: all): the coefficients of only ``chunk``
    steps are held, whatever T. See :func:`lyapunov_exponents`."""
    get, T, mask, dev = _trace_steps(trace, key, device, "lyapunov_spectrum")
    chunk = T if chunk is None else _util.positive_int(chunk, "chunk", "lyapunov_spectrum")
    probe = get(0, 1)
    return _lyapunov(get, probe, T, mask, warmup, k, blocks, seed, threads, dev, min(chunk, T), frame)
