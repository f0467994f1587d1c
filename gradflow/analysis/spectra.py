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
* Matrix-free top-k (:func:`top_singular_values`, and σ_max alone: :func:`largest_singular_value`)
  run Golub–Kahan–Lanczos bidiagonalization with full reorthogonalization, one vector at a time (the
  fewest J v / Jᵀ u products for a given accuracy; a block method needs more for the same basis).
  Bottom-k (:func:`smallest_singular_values`) runs a randomized block Krylov method on JᵀJ with
  Rayleigh–Ritz: only products J V and Jᵀ U (JVP/VJP, or the factored closed form), never an S×S
  matrix. Rayleigh–Ritz takes the singular values of J Q (Q the orthonormal Krylov basis), not the
  eigenvalues of QᵀJᵀJQ: their absolute error is ≈ eps·σ_1 instead of eps·σ_1², so σ_i keeps a
  relative accuracy of eps·σ_1/σ_i (not its square) —
  what makes a small σ_min trustworthy. Both work on time chunks of ``chunk`` steps (working memory
  ≈ chunk·B·S·basis floats, whatever T), at the timesteps ``steps`` only if given, on ``device``
  (default: the operator's device when it is CUDA, else CPU); results come back on the CPU.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import torch

from ..errors import GradflowError
from . import _util

__all__ = ["singular_values", "eigenvalue_moduli", "spectral_radius", "step_summary", "top_singular_values",
           "smallest_singular_values", "largest_singular_value", "DenseOperator"]


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

    def to(self, dtype=None, device=None):
        return DenseOperator(self.J.to(device=device, dtype=dtype))

    def select(self, index):
        """The operator restricted to steps ``index`` (int, slice or index tensor along T)."""
        return DenseOperator(self.J[index:index + 1] if isinstance(index, int) else self.J[index])

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




# ---------------------------------------------------------------------------------------- device
def resolve_device(device=None, like: torch.Tensor | None = None, fn: str = "analysis") -> torch.device:
    """The device an analysis runs on: ``device`` when given ("cpu", "cuda", "cuda:N", "mps"; a one-line
    GradflowError when it is not available here), else ``like``'s device when it is CUDA (and CUDA is
    available), else the CPU."""
    if device is None:
        if like is not None and like.device.type == "cuda" and torch.cuda.is_available():
            return like.device
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise GradflowError(f"{fn}: device={device!r} is not a device ('cpu', 'cuda', 'cuda:N' or 'mps')") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise GradflowError(f"{fn}: device={device!r} but CUDA is not available in this process; pass device='cpu'")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise GradflowError(f"{fn}: device={device!r} but MPS is not available in this process; pass device='cpu'")
    return dev


def _reference_tensor(op):
    if isinstance(op, DenseOperator):
        return op.J
    if getattr(op, "device", None) is not None:  # ChunkedLinearization built onto a device
        return torch.empty(0, device=op.device)
    coef = getattr(op, "coef", None)
    if coef:
        return next(iter(coef.values()))
    return getattr(op, "x", None)


def on_device(op, device: torch.device):
    """``op`` (DenseOperator, Linearization or ChunkedLinearization) with its tensors on ``device``
    (itself when already there). A ChunkedLinearization moves each chunk as it is built."""
    if hasattr(op, "positions"):  # ChunkedLinearization: linearizes chunk by chunk onto its device
        return op if getattr(op, "device", None) == device or device.type == "cpu" and op.device is None \
            else replace(op, device=device, _cache={})
    ref = _reference_tensor(op)
    if ref is None or ref.device == device:
        return op
    if isinstance(op, DenseOperator):
        return DenseOperator(op.J.to(device))
    mv = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return replace(op, coef={n: v.to(device) for n, v in op.coef.items()},
                   weights={n: v.to(device) for n, v in op.weights.items()}, mask=mv(op.mask), x=mv(op.x),
                   prev=tuple(p.to(device) for p in op.prev))


def _prepare(op, fn: str, device, steps):
    """(float64 operator on the device, T, B, S) restricted to ``steps`` (indices along T) if given."""
    op = _as_operator(op)
    T = op.shape[0]
    if steps is not None:
        idx = torch.as_tensor(steps, dtype=torch.long).flatten()
        if idx.numel() == 0 or bool(((idx < 0) | (idx >= T)).any()):
            raise GradflowError(f"{fn}: steps must be indices in 0..{T - 1}, got {idx.tolist()[:6]}")
        op = op.select(idx)
    dev = resolve_device(device, _reference_tensor(op), fn)
    return on_device(op.to(torch.float64), dev), dev


def _orth_against(W, Q):
    """W - Q (Qᵀ W), twice (classical Gram–Schmidt with reorthogonalization)."""
    for _ in range(2):
        W = W - Q @ (Q.mT @ W)
    return W


def _fresh(W, Q, generator):
    return _orth_against(torch.randn(W.shape, generator=generator, dtype=W.dtype).to(W.device), Q)


def _extend(W, Q, generator):
    """An orthonormal block spanning W's directions outside span(Q), orthogonal to Q. Directions W
    lacks (an invariant subspace was found, or W is rank-deficient: Householder QR then completes
    its Q with arbitrary columns, possibly inside span(Q)) are replaced by fresh random ones."""
    scale = W.norm(dim=-2, keepdim=True)
    W = _orth_against(W, Q)
    dead = W.norm(dim=-2, keepdim=True) <= 1e-10 * scale.clamp_min(1e-300)
    if bool(dead.any()):
        W = torch.where(dead, _fresh(W, Q, generator), W)
    for _ in range(3):
        W = _orth_against(torch.linalg.qr(W).Q, Q)
        lost = W.norm(dim=-2, keepdim=True) < 0.5
        if not bool(lost.any()):
            break
        W = torch.where(lost, _fresh(W, Q, generator), W)
    return torch.linalg.qr(W).Q


def block_krylov(matvec, rmatvec, V, k: int, *, cap: int, tol: float, generator, smallest: bool = False,
                 log_scale=None) -> torch.Tensor:
    """Ritz values of a batch of operators J (lead dims L) from the block Krylov space of JᵀJ.

    matvec(V [*L, S, b]) -> J V and rmatvec(U) -> Jᵀ U; V: the orthonormal start block. The space
    span{V, (JᵀJ)V, …} grows one block per iteration; Rayleigh–Ritz uses the singular values of
    J Q. Stops when the k largest (``smallest``: k smallest) Ritz values change by less than ``tol``
    relative (the smallest: relative to max(σ, 1e-14·σ_1), so that exact zeros converge) or the
    basis reaches ``cap`` columns (cap = S: exact). Returns [*L, k] descending; ``log_scale`` [*L]
    (J given scaled by e^-log_scale) -> ln σ instead."""
    b = V.shape[-1]
    Qs, Ys = [V], [matvec(V)]
    prev = None
    while True:
        Q, Y = torch.cat(Qs, -1), torch.cat(Ys, -1)
        if smallest:
            sv = torch.linalg.svdvals(Y)
        else:  # while iterating, the largest Ritz values from the Gram matrix YᵀY (a BLAS-3 product and an
            # m×m eigensolve, 1.6-3.4x cheaper than the SVD of the tall Y; its error, eps·σ_1²/σ_i² relative
            # in σ_i², is far below tol for the top k); the returned values come from one SVD at the end
            sv = torch.linalg.eigvalsh(Y.mT @ Y).clamp_min(0).sqrt().flip(-1)
        ritz = sv[..., -k:] if smallest else sv[..., :k]
        if prev is not None:
            floor = (sv[..., :1] * 1e-14).clamp_min(torch.finfo(sv.dtype).tiny)
            change = ((ritz - prev).abs() / torch.maximum(ritz, floor)).max()
            if float(change) <= tol:
                break
        if Q.shape[-1] >= cap:
            break
        prev = ritz
        nb = min(b, cap - Q.shape[-1])
        W = _extend(rmatvec(Ys[-1][..., :nb]), Q, generator)  # (JᵀJ) q for the newest block
        Qs.append(W)
        Ys.append(matvec(W))
    if not smallest:
        ritz = torch.linalg.svdvals(Y)[..., :k]
    if log_scale is None:
        return ritz
    return torch.log(ritz) + log_scale[..., None]


_CHUNK_BYTES = 1 << 28  # default working memory of one chunk of the Krylov routes


def _per_step(op, k: int, fn: str, smallest: bool, block, tol, max_basis, seed, steps, chunk, device):
    op, dev = _prepare(op, fn, device, steps)
    T, B, S = op.shape
    k = _util.positive_int(k, "k", fn)
    if k > S:
        raise GradflowError(f"{fn}: k={k} exceeds the state size S={S}")
    b = min(S, block or max(k + 4, 2 * k))
    cap = S if smallest else min(S, max_basis or S)
    if chunk is None:
        per = (cap + b) * 3 if smallest else 2 * cap + 4
        chunk = max(1, _CHUNK_BYTES // max(1, B * S * per * 8))
    chunk = _util.positive_int(chunk, "chunk", fn)
    if getattr(op, "structure", "dense") != "dense":  # diagonal kinds: the per-unit moduli, exact
        out = []
        for a in range(0, T, chunk):
            sv = op.select(slice(a, min(T, a + chunk))).moduli().to(torch.float64).sort(-1, descending=True).values
            out.append((sv[..., -k:] if smallest else sv[..., :k]).cpu())
        return torch.cat(out)
    g = torch.Generator().manual_seed(seed)
    out = []
    for a in range(0, T, chunk):
        sub = op.select(slice(a, min(T, a + chunk)))
        n = sub.shape[0]
        if smallest:
            V = torch.linalg.qr(torch.randn(n, B, S, b, generator=g, dtype=torch.float64).to(dev)).Q
            out.append(block_krylov(sub.matvec, sub.rmatvec, V, k, cap=cap, tol=tol, generator=g,
                                    smallest=True).cpu())
            continue
        out.append(_gkl(sub.matvec, sub.rmatvec, _unit_start(n, B, S, g, dev), k, cap, tol, g, min(cap, k + 2),
                        lambda j: max(2, j // 8)).cpu())
    return torch.cat(out)


def top_singular_values(op, k: int, *, block: int | None = None, tol: float = 1e-10, max_basis: int | None = None,
                        seed: int = 0, steps=None, chunk: int | None = None, device=None) -> torch.Tensor:
    """Largest k singular values of every J_t, matrix-free -> [T, B, k] float64 (CPU), descending.

    op: a :class:`~gradflow.analysis.Linearization` (from ``linearize_trace``; products via the factored
    closed form or JVP/VJP for custom cells) or explicit J [T, B, S, S]. Golub–Kahan–Lanczos from a
    random start vector: one J v and one Jᵀ u per iteration, batched over every (t, b) of a chunk,
    stopping when the top k Ritz values moved by less than ``tol`` (relative) since the previous
    check (checks at k+2 iterations, then every max(2, j/8)) or the basis spans the whole space
    (exact). Repeated singular values and null spaces are handled by restarting on breakdown. Cost:
    when the top of the spectrum is flat (an untrained LSTM: σ_1..σ_12 within 15%), σ_8 to 1e-10 takes
    ~75 iterations at S = 256, as much as a dense SVD; the route pays off when S is large against the
    iterations it needs. ``block`` and ``max_basis`` are kept for the bottom-k route (ignored here,
    except that ``max_basis`` caps the iterations). steps: indices along T (only those steps, result
    [len(steps), B, k]); chunk: steps processed at once (default: ~256 MB of Lanczos vectors); device:
    where to compute (default: the operator's device when CUDA, else CPU)."""
    return _per_step(op, k, "top_singular_values", False, block, tol, max_basis, seed, steps, chunk, device)


def smallest_singular_values(op, k: int, *, block: int | None = None, tol: float = 1e-10, seed: int = 0, steps=None,
                             chunk: int | None = None, device=None) -> torch.Tensor:
    """Smallest k singular values σ_{S-k+1} ≥ … ≥ σ_S of every J_t, matrix-free -> [T, B, k] float64 (CPU).

    The same block Krylov space of JᵀJ as :func:`top_singular_values`, read at its lower end. Why this
    and not a shifted or inverse-free variant: Krylov spaces are shift-invariant, so LOBPCG or
    Lanczos on σ²I − JᵀJ span the same space and converge no faster; inverse iteration needs solves
    with J, which no kind provides matrix-free. Accuracy comes from Rayleigh–Ritz on the singular
    values of J Q (absolute error ≈ eps·σ_1, i.e. relative eps·σ_1/σ_min, not its square): converged
    Ritz values are accurate to ~1e-10 relative for σ_1/σ_min up to ~1e5. The lower end converges
    when it is separated relative to σ_1² (dead or saturated units: exact zeros and tiny clusters
    converge in a few blocks); otherwise the basis grows to S, where Rayleigh–Ritz is exact — the
    cost then equals forming J, done ``chunk`` steps at a time. Arguments as for
    :func:`top_singular_values`."""
    return _per_step(op, k, "smallest_singular_values", True, block, tol, None, seed, steps, chunk, device)


def _unit_start(n: int, B: int, S: int, generator, dev) -> torch.Tensor:
    """Random unit start vectors [n, B, S, 1] float64 on ``dev`` (drawn on the CPU: reproducible)."""
    v = torch.randn(n, B, S, 1, generator=generator, dtype=torch.float64).to(dev)
    return v / v.norm(dim=-2, keepdim=True)


def _gkl(matvec, rmatvec, v, k: int, cap: int, tol: float, generator, first: int, every) -> torch.Tensor:
    """Top-k Ritz values [*L, k] of a batch of operators by Golub–Kahan–Lanczos bidiagonalization.

    v [*L, S, 1]: unit start vectors. Each iteration costs one J v and one Jᵀ u over the whole batch,
    reorthogonalized in full against the earlier vectors (classical Gram–Schmidt, a second pass only
    where the first removed most of the vector; the bases are kept as rows so that every projection
    is one batched GEMV). The Ritz values are the singular
    values of the j×j upper bidiagonal (α on the diagonal, β above): each increases to its σ_i(J)
    (interlacing) and all are exact once j reaches S. A breakdown (β or α below 1e-12 of the largest
    α so far: an invariant subspace, as for a masked identity step, an orthogonal J or a rank-deficient
    one) continues from a fresh random vector orthogonal to the basis, with a zero coupling, so that
    repeated singular values are found as often as they occur. Convergence is checked at j = ``first``
    and then every ``every(j)`` iterations (on the eigenvalues of BᵀB, values only): it stops when no
    top-k value moved by more than ``tol`` relative since the last check, or j reaches ``cap``. The
    values returned come from one SVD of the final bidiagonal."""
    lead, S = v.shape[:-2], v.shape[-2]
    dt, dev = v.dtype, v.device
    tiny = torch.finfo(dt).tiny
    Vb = torch.empty(*lead, cap + 1, S, dtype=dt, device=dev)
    Ub = torch.empty(*lead, cap, S, dtype=dt, device=dev)
    alphas = torch.zeros(*lead, cap, dtype=dt, device=dev)
    betas = torch.zeros(*lead, cap, dtype=dt, device=dev)
    Vb[..., 0, :] = v[..., 0]
    scale = torch.zeros(*lead, 1, 1, dtype=dt, device=dev)

    def orth(w, basis):  # w [*L, S, 1] minus its components along basis rows [*L, j, S]; a second
        # pass only where the first removed most of w ("twice is enough", Kahan–Parlett: the recurrence
        # leaves Lanczos vectors nearly orthogonal already, so one pass usually suffices)
        before = w.norm(dim=-2, keepdim=True)
        w = w - basis.mT @ (basis @ w)
        if bool((w.norm(dim=-2, keepdim=True) < 0.7 * before).any()):
            w = w - basis.mT @ (basis @ w)
        return w

    def renew(w, basis, norm):  # breakdowns -> fresh unit vectors orthogonal to the basis
        dead = norm <= 1e-12 * scale
        if not bool(dead.any()):
            return w / norm.clamp_min(tiny), norm
        fresh = orth(torch.randn(w.shape, generator=generator, dtype=dt).to(dev), basis)
        fresh = orth(fresh / fresh.norm(dim=-2, keepdim=True).clamp_min(tiny), basis)
        fresh = fresh / fresh.norm(dim=-2, keepdim=True).clamp_min(tiny)
        return torch.where(dead, fresh, w / norm.clamp_min(tiny)), torch.where(dead, torch.zeros_like(norm), norm)

    u = matvec(v)
    prev, j, check = None, 0, first
    while True:
        if j:
            u = orth(u, Ub[..., :j, :])
        a = u.norm(dim=-2, keepdim=True)
        scale = torch.maximum(scale, a)
        u, a = renew(u, Ub[..., :j, :], a)
        Ub[..., j, :] = u[..., 0]
        alphas[..., j] = a[..., 0, 0]
        j += 1
        if j >= check or j >= cap:
            n = j
            Bm = torch.diag_embed(alphas[..., :n]) + torch.diag_embed(betas[..., :n - 1], offset=1)
            if j >= cap:
                break
            ritz = torch.linalg.eigvalsh(Bm.mT @ Bm).clamp_min(0).sqrt().flip(-1)[..., :k]
            if prev is not None and ritz.shape == prev.shape:
                floor = (ritz[..., :1] * 1e-14).clamp_min(tiny)
                if float(((ritz - prev).abs() / torch.maximum(ritz, floor)).max()) <= tol:
                    break
            prev = ritz
            check = j + every(j)
        w = orth(rmatvec(u) - v * a, Vb[..., :j, :])
        b = w.norm(dim=-2, keepdim=True)
        v, b = renew(w, Vb[..., :j, :], b)
        Vb[..., j, :] = v[..., 0]
        betas[..., j - 1] = b[..., 0, 0]
        u = matvec(v) - u * b
    sv = torch.linalg.svdvals(Bm)
    if sv.shape[-1] < k:
        sv = torch.cat([sv, sv.new_zeros(*lead, k - sv.shape[-1])], -1)
    return sv[..., :k]


def largest_singular_value(op, *, iterations: int = 12, tol: float = 1e-6, seed: int = 0, steps=None,
                           chunk: int | None = None, device=None) -> torch.Tensor:
    """σ_max of every J_t, matrix-free, by Golub–Kahan–Lanczos -> [T, B] float64 (CPU).

    A lower bound that converges from below (fast where σ_1 is separated, slowly on a flat top
    spectrum) and is exact once ``iterations`` reaches the rank of J_t (at most S). Costs
    ``iterations`` J v and Jᵀ u products per step, each batched over a whole chunk of steps: the
    cheap per-step σ_max of the analysis' matrix-free route, where :func:`top_singular_values` with
    its block basis would cost many times more. Arguments as for :func:`top_singular_values`;
    ``chunk`` defaults to ~256 MB of Lanczos vectors."""
    op, dev = _prepare(op, "largest_singular_value", device, steps)
    T, B, S = op.shape
    iterations = min(S, _util.positive_int(iterations, "iterations", "largest_singular_value"))
    if chunk is None:
        chunk = max(1, _CHUNK_BYTES // max(1, B * S * (2 * iterations + 4) * 8))
    chunk = _util.positive_int(chunk, "chunk", "largest_singular_value")
    if getattr(op, "structure", "dense") != "dense":
        return torch.cat([op.select(slice(a, min(T, a + chunk))).moduli().to(torch.float64).amax(-1).cpu()
                          for a in range(0, T, chunk)])
    g = torch.Generator().manual_seed(seed)
    out = []
    for a in range(0, T, chunk):
        sub = op.select(slice(a, min(T, a + chunk)))
        out.append(_gkl(sub.matvec, sub.rmatvec, _unit_start(sub.shape[0], B, S, g, dev), 1, iterations, tol, g, 1, lambda j: 1)[..., 0].cpu())
    return torch.cat(out)
