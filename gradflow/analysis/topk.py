"""Top-k singular values of products of Jacobians over distance, matrix-free, in the log domain.

Step order (see :mod:`gradflow.analysis._util`): ``P_d = J[start+d-1] ⋯ J[start]``. Only products of
k-column (k+p with oversampling p) frames with J and Jᵀ are formed — J V / Jᵀ U from a
:class:`~gradflow.analysis.Linearization`'s closed form, batched over the batch items — never an S×S
matrix. For each requested distance d:

1. **Frames carried with QR.** A product applied to an orthonormal frame, ``P_d V``, is propagated
   step by step with a QR factorisation at every step, ``J Q_{j-1} = Q_j R_j``, and the triangle
   ``R_d ⋯ R_1`` kept with a per-row log scale (as the dense route of
   :func:`~gradflow.analysis.product_singular_values`), so ln σ(P_d V) is exact to float64 relative
   accuracy at every rank however far the spectrum spreads (e^±1000 included). σ_i(P_d V) ≤ σ_i(P_d),
   with equality when V spans the top right singular subspace of P_d.
2. **Subspace iteration.** One forward sweep from a random frame, shared by all distances, gives at
   each d a frame U_d whose range approximates P_d's top left singular subspace (the range converges,
   the singular values of P_d Q_0 never do: they keep the overlap with the random start). From U_d,
   alternating passes ``Pᵀ U -> V``, ``P V -> U`` (each an exact QR-carried pass) are orthogonal
   iteration on PᵀP: every half-pass shrinks the error by σ_{m+1}/σ_k, which at long distances is
   e^{-(λ_k - λ_{m+1}) d} — one or two passes. Converged when two successive estimates agree to
   ``tol`` (in ln σ).
3. **Block Krylov on the chain** at short distances, where σ_{m+1}/σ_k is close to 1 (a single
   Jacobian's top singular values are dense) and subspace iteration would crawl: block Lanczos on
   P_dᵀ P_d with Rayleigh–Ritz by the singular values of P_d Q (see :mod:`gradflow.analysis.spectra`),
   the chain applied step by step with a fixed per-step scale (so nothing overflows). Its absolute
   error ≈ eps·d·σ_1(P_d) is small enough only while the top k spread by less than e^18 (a relative
   error ≲ 1e-8·d at σ_k): beyond that spread the gaps are large and step 2 goes on instead.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from . import _util
from .spectra import block_krylov

_KRYLOV_SPREAD = 18.0  # ln(σ_1/σ_k) + ln d below which the chain Krylov route is accurate (see the docstring)
_MAX_HALF = 40
_BATCHED_ROUNDS = 1  # rounds of subspace iteration run for all distances together before each goes on alone  # half-passes of subspace iteration at most (noise-level ranks of a singular product never settle)


def oversampled(k: int, S: int) -> int:
    """Columns of the frames carried for the top k: k + max(4, k/2), at most S."""
    return min(S, k + max(4, k // 2))


def apply_rows(op, R, j: int, transpose: bool, valid):
    """Rows R [n, B, S] -> rows of J_j v (Jᵀ_j u); identity where ``valid`` [B] is False (None: all valid)."""
    if hasattr(op, "apply_rows"):
        out = op.apply_rows(R, j, transpose)
    else:
        fn = op.rmatvec if transpose else op.matvec
        out = fn(R.permute(1, 2, 0), j).permute(2, 0, 1)
    return out if valid is None else torch.where(valid[:, None], out, R)


def qr_pass(op, Q, order, transpose: bool, valid_of):
    """The product of the steps ``order`` (J_j, or J_jᵀ when ``transpose``; first step first) applied to
    the orthonormal frame Q [B, S, m], carried with one QR per step. Returns (Q_end [B, S, m], ln σ of
    the product restricted to Q [B, m] descending)."""
    from .products import _log_svd, _scaled_product

    B, _, m = Q.shape
    ell = torch.zeros(B, m, dtype=Q.dtype, device=Q.device)
    N = torch.eye(m, dtype=Q.dtype, device=Q.device).expand(B, m, m).clone()
    for j in order:
        Z = apply_rows(op, Q.permute(2, 0, 1).contiguous(), j, transpose, valid_of(j))
        Q, R = torch.linalg.qr(Z.permute(1, 2, 0))
        ell, N = _scaled_product(R, ell, N)
    return Q, _log_svd(ell, N)


class _Chain:
    """P = J[steps[-1]] ⋯ J[steps[0]] as an operator on [B, S, b] blocks, scaled by e^{-log_scale} [B]
    with per-step factors fixed by the first ``matvec`` (so that it stays one linear map)."""

    def __init__(self, op, steps, valid_of):
        self.op, self.steps, self.valid_of = op, list(steps), valid_of
        self.logc = None

    @property
    def log_scale(self):
        return self.logc.sum(0)

    def matvec(self, V):
        R = V.permute(2, 0, 1).contiguous()
        logs = []
        for i, j in enumerate(self.steps):
            R = apply_rows(self.op, R, j, False, self.valid_of(j))
            if self.logc is None:
                c = R.abs().amax(dim=(0, 2)).clamp_min(torch.finfo(R.dtype).tiny)
                logs.append(torch.log(c))
                R = R / c[None, :, None]
            else:
                R = R * torch.exp(-self.logc[i])[None, :, None]
        if self.logc is None:
            self.logc = torch.stack(logs)
        return R.permute(1, 2, 0)

    def rmatvec(self, U):
        R = U.permute(2, 0, 1).contiguous()
        for i in range(len(self.steps) - 1, -1, -1):
            R = apply_rows(self.op, R, self.steps[i], True, self.valid_of(self.steps[i])) * torch.exp(-self.logc[i])[
                None, :, None]
        return R.permute(1, 2, 0)


def _agree(a, b, tol: float) -> bool:
    """Two ln σ estimates [B, k] agree: equal where either is -inf, within ``tol`` elsewhere."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not bool((fa == fb).all()):
        return False
    both = fa & fb
    return not bool(both.any()) or float((a - b)[both].abs().max()) <= tol


_ERR = 1e-9  # bound on the error (in ln σ) of an estimate declared settled by _settled


def _settled(ef, eb, k: int, tol: float) -> bool:
    """Two successive subspace-iteration estimates ef, eb [B, m] (descending) have settled: the top k
    agree to ``tol``, and the error they imply stays below _ERR. Each pass shrinks the error by
    ρ² = (σ_m/σ_k)² (the frame's own ratio, an upper bound on σ_{m+1}/σ_k), so estimates that moved
    by Δ are about Δ/(1 − ρ²) from their limit: on a flat spectrum (ρ ≈ 1) they move by less than
    ``tol`` per pass while still as far from σ as the spread of the spectrum."""
    if not _agree(ef[:, :k], eb[:, :k], tol):
        return False
    both = torch.isfinite(ef[:, :k]) & torch.isfinite(eb[:, :k])
    diff = torch.where(both, (ef[:, :k] - eb[:, :k]).abs(), torch.zeros_like(ef[:, :k])).amax(-1)
    gap = ef[:, k - 1] - ef[:, -1]
    rate = torch.where(torch.isfinite(gap), -torch.expm1(-2.0 * gap), torch.ones_like(gap))
    return bool((diff <= _ERR * rate).all())


def _batched_pass(op, frames, lengths, start: int, transpose: bool, valid_of):
    """:func:`qr_pass` of every distance at once: frames [A, B, S, m], frame i carried through steps
    start..start+lengths[i]-1 (``transpose``: Jᵀ from the last of them down). ``lengths`` increase, so
    the frames active at a step are a suffix of them, and one ``apply_rows`` per step serves them all
    (the weights are read once per step, not once per distance). Returns (frames, ln σ [A, B, m])."""
    from .products import _log_svd, _scaled_product

    A, B, S, m = frames.shape
    frames = frames.clone()
    ell = torch.zeros(A, B, m, dtype=frames.dtype, device=frames.device)
    N = torch.eye(m, dtype=frames.dtype, device=frames.device).expand(A, B, m, m).clone()
    D = lengths[-1]
    order = range(start + D - 1, start - 1, -1) if transpose else range(start, start + D)
    for j in order:
        a0 = next(i for i, d in enumerate(lengths) if j < start + d)
        n = A - a0
        rows = frames[a0:].permute(0, 3, 1, 2).reshape(n * m, B, S)
        Z = apply_rows(op, rows, j, transpose, valid_of(j)).reshape(n, m, B, S).permute(0, 2, 3, 1)
        Q, R = torch.linalg.qr(Z)
        frames[a0:] = Q
        ell[a0:], N[a0:] = _scaled_product(R, ell[a0:], N[a0:])
    return frames, _log_svd(ell, N)


def _finish(op, steps, valid_of, U, V, ef, eb, k: int, tol: float, generator):
    """ln σ_1..k of P = J[steps[-1]] ⋯ J[steps[0]] [B, k] after a first round of subspace iteration gave
    V (start frame), U (end frame) and the estimates eb, ef (see the module docstring)."""
    if _settled(ef, eb, k, tol):
        return ef[:, :k]
    rev = steps[::-1]
    spread = float((ef[:, 0] - ef[:, k - 1]).max()) + math.log(len(steps))
    if math.isfinite(spread) and spread <= _KRYLOV_SPREAD:
        chain = _Chain(op, steps, valid_of)
        ritz = block_krylov(chain.matvec, chain.rmatvec, V, k, cap=V.shape[1], tol=tol, generator=generator)
        return torch.log(ritz) + chain.log_scale[:, None]
    last = ef
    for _ in range(_MAX_HALF // 2):
        V, eb = qr_pass(op, U, rev, True, valid_of)
        if _agree(eb[:, :k], last[:, :k], tol):
            return eb[:, :k]
        U, ef = qr_pass(op, V, steps, False, valid_of)
        if _agree(ef[:, :k], eb[:, :k], tol):
            return ef[:, :k]
        last = ef
    return last[:, :k]


def product_topk(op, ds: list[int], start: int, k: int, mask, dev, *, tol: float = 1e-11,
                 seed: int = 0, threads: int = 1) -> torch.Tensor:
    """ln σ_1..k(P_d) for each distance of ``ds`` (increasing) -> [len(ds), B, k] float64 on ``dev``.

    op: float64 operator (step order) computing on ``dev``; mask [T, B] bool or None (False: identity step).
    threads: the distances left unsettled by the shared rounds are finished on this many threads
    (each distance's work is independent, with its own generator: the result does not depend on
    the number of threads)."""
    T, B, S = op.shape
    m = _util.positive_int(oversampled(k, S), "k", "product_singular_values")
    full = None if mask is None else mask.all(1).tolist()
    mask = None if mask is None else mask.to(dev)

    def valid_of(j):
        return None if mask is None or full[j] else mask[j]

    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(S, m, generator=g, dtype=torch.float64)).Q.to(dev).expand(B, S, m).clone()
    want, ends = set(ds), []
    for d in range(1, ds[-1] + 1):
        j = start + d - 1
        Z = apply_rows(op, Q.permute(2, 0, 1).contiguous(), j, False, valid_of(j))
        Q = torch.linalg.qr(Z.permute(1, 2, 0)).Q
        if d in want:
            ends.append(Q)
    # rounds of subspace iteration for every unconverged distance at once (one weight read per step
    # for all of them), then each remaining distance on its own (block Krylov at short distances)
    U = torch.stack(ends)
    V = torch.empty_like(U)
    ef = eb = None
    done = [False] * len(ds)
    for _ in range(_BATCHED_ROUNDS):
        act = [i for i in range(len(ds)) if not done[i]]
        if not act:
            break
        lens = [ds[i] for i in act]
        Va, eba = _batched_pass(op, U[act], lens, start, True, valid_of)
        Ua, efa = _batched_pass(op, Va, lens, start, False, valid_of)
        if ef is None:
            ef, eb = efa.clone(), eba.clone()
        V[act], U[act], ef[act], eb[act] = Va, Ua, efa, eba
        for n, i in enumerate(act):
            done[i] = _settled(efa[n], eba[n], k, tol)
    out = [ef[i, :, :k] if done[i] else None for i in range(len(ds))]
    todo = [i for i in range(len(ds)) if not done[i]]
    gens = {i: torch.Generator().manual_seed(seed + 1 + i) for i in todo}  # per distance: any order, any thread

    def finish(i, op=op):
        return _finish(op, list(range(start, start + ds[i])), valid_of, U[i], V[i], ef[i], eb[i], k, tol, gens[i])

    if threads > 1 and len(todo) > 1:
        fresh = getattr(op, "fresh", None)  # an operator that caches chunks: one cache per distance
        task = finish if fresh is None else (lambda i: finish(i, fresh()))
        order = sorted(todo, key=lambda i: -ds[i])  # longest first, so that the threads finish together
        with ThreadPoolExecutor(min(threads, len(todo))) as ex:
            for i, r in zip(order, ex.map(task, order)):
                out[i] = r
    else:
        for i in todo:
            out[i] = finish(i)
    return torch.stack(out)
