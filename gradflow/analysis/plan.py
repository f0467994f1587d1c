"""The analysis plan of one unit: which route each Jacobian-based quantity takes, before any work.

From the joint state size S, the number of steps T, the sequences analysed B (``batch_limit`` of the
trace's batch), the Jacobian structure of the unit's kind (:mod:`gradflow.kinds`) and the memory
budget of an :class:`~gradflow.analysis.AnalysisConfig`, :func:`plan_unit` chooses

* **spectra**: ``exact`` for a diagonal structure (the per-unit factors are the singular values),
  ``dense`` (every singular value, LAPACK) when S ≤ ``dense_max``, else ``top-k``: the k largest,
  matrix-free (block Krylov on JᵀJ from J v / Jᵀ u products, never an S×S matrix);
* the **timesteps** whose full distribution is drawn: all of them when that is cheap (diagonal
  structure, or T·B factorisations under ~10 Gflop), else evenly spaced ones: as many as cost about
  64 sweeps of S vectors through all steps (≈ 6.4·T/S), at least 4 and at most ``spectra_steps``.
  σ_max is computed at every step whatever the route: dense and exact routes factor every step
  (σ_max, σ_min, fraction of σ > 1; ρ at the distribution steps); the top-k route runs
  Golub–Kahan–Lanczos (at most :data:`LANCZOS_ITERATIONS` J v / Jᵀ u pairs per step: a lower bound,
  exact once the iterations reach S) at every step, and factors J densely at the distribution steps
  only (all S singular values there, so σ_min and the fraction of σ > 1 are exact there); ρ is not
  computed on the top-k route;
* **products** over distance and the **Lyapunov** spectrum: all S directions when S ≤ ``dense_max``
  or the structure is diagonal, else the top k (k-column QR frames, matrix-free);
* the **sequences** each quantity runs over, out of the B analysed: the first b, with b the largest
  that keeps the quantity's estimated work within T·:data:`WORK_FLOPS` (at least one sequence; the
  top-k products and Lyapunov spectra lower k, and Lanczos its iterations, when even one sequence
  would not fit). Small units run every quantity over all B. Per-step statistics are means over the
  sequences analysed, and Lyapunov exponents are time averages along each sequence, so a few long
  sequences estimate them soundly; the plan says how many were used;
* the **chunk**: timesteps whose Jacobian work is held in memory at once, the largest that keeps the
  estimated peak within the budget. When not even one step fits, :func:`plan_unit` raises a one-line
  GradflowError naming the unit, S, T, B, the budget and the option that changes it.

The estimates count float64 working arrays (the trace itself is not counted: it is already loaded),
scaled by :data:`_CALIBRATION`, the measured ratio of the real peak to that count.
This module imports no torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import GradflowError
from .config import AnalysisConfig, _fmt_bytes

__all__ = ["Plan", "plan_unit", "distribution_steps", "log_distances"]

_CHEAP_FLOPS = 1e10  # all T·B factorisations drawn when they cost less than this
# Otherwise the distributions together may cost about this many sweeps of S vectors through every step
# (≈ a Lyapunov spectrum of this many directions), and at least _MIN_STEPS steps are drawn.
_SWEEPS = 64
_MIN_STEPS = 4
_F64 = 8
# Measured peak growth of the resident set over the modelled working set below (2 CPU cores, B=16,
# T=2000, H=256: LSTM 1.11x, GRU 1.17x; the model leaves out allocator caching and short-lived
# temporaries): every estimate is scaled by this, so that the chunk keeps the real peak in budget.
_CALIBRATION = 1.2
# Work allowed to each Jacobian-based quantity of one unit (per-step spectra, distributions, products,
# Lyapunov) per timestep, in flops of the estimates below (T=500: ~2-3 s of closed-form products on 2
# CPU cores). Per timestep, so that time grows linearly in T and what is computed does not depend on T.
WORK_FLOPS = 1.2e8
# Golub–Kahan–Lanczos iterations for σ_max at every step on the top-k route (fewer when even one
# sequence would exceed WORK_FLOPS, never under _MIN_ITERATIONS)
LANCZOS_ITERATIONS = 12
_MIN_ITERATIONS = 4


def log_distances(T: int, n: int = 12) -> tuple[int, ...]:
    """About ``n`` log-spaced distances in 1..T (always including 1 and T)."""
    if T < 1:
        return ()
    import numpy as np

    ds = np.unique(np.round(np.geomspace(1, T, num=max(1, min(n, T)))).astype(int))
    return tuple(int(d) for d in ds)


def distribution_steps(T: int, n: int) -> tuple[int, ...]:
    """``n`` evenly spaced positions in 0..T-1 (first and last included); all of them when n ≥ T."""
    if n >= T:
        return tuple(range(T))
    if n == 1:
        return (T - 1,)
    return tuple(sorted({round(i * (T - 1) / (n - 1)) for i in range(n)}))


@dataclass(frozen=True)
class Plan:
    """What the analysis of one unit computes and how (see the module docstring).

    unit: the unit's primary key; S, T, B: joint state size, steps, sequences analysed; structure:
    the Jacobian structure; spectra: ``exact`` | ``dense`` | ``top-k``; k: singular values per
    distribution step (S unless top-k); steps: positions with a full distribution; products /
    lyapunov: directions computed (0 = not computed); distances: product distances; chunk: steps
    processed at once; radius: whether ρ is computed at the distribution steps; memory: the budget;
    peak: the estimated peak of the working set (bytes); b_spectra, b_dist, b_products, b_lyapunov:
    the sequences (the first b of the B) of the per-step spectra, the distributions, the products and
    the Lyapunov spectrum; iterations: Lanczos iterations of σ_max on the top-k route (0 otherwise)."""

    unit: str
    S: int
    T: int
    B: int
    structure: str
    spectra: str
    k: int
    steps: tuple[int, ...]
    products: int
    lyapunov: int
    distances: tuple[int, ...]
    chunk: int
    radius: bool
    memory: int
    peak: int
    b_spectra: int = 0
    b_dist: int = 0
    b_products: int = 0
    b_lyapunov: int = 0
    iterations: int = 0

    def __post_init__(self):
        for f in ("b_spectra", "b_dist", "b_products", "b_lyapunov"):
            if not getattr(self, f):
                object.__setattr__(self, f, self.B)

    @property
    def matrix_free(self) -> bool:
        return self.spectra == "top-k"

    def describe(self) -> str:
        """One line, e.g. ``"<root>/l0/d0/h: σ_max at all 500 steps of 2 of 16 sequences (Lanczos, ≤ 12
        iterations, a lower bound); all 1024 singular values at 5 of 500 steps of 1 of 16 sequences,
        dense; ρ not computed; products top 8 of 1024 over 1 of 16 sequences; ..."``."""
        n, T, B = len(self.steps), self.T, self.B

        def of(b, word=" of"):  # "" when every sequence is used
            return f"{word} {b} of {B} sequences" if b < B else ""

        at = f"at all {T} steps" if n == T else f"at {n} of {T} steps"
        if self.spectra == "top-k":
            sv = (f"σ_max at all {T} steps{of(self.b_spectra)} (Lanczos, ≤ {self.iterations} iterations, a lower "
                  f"bound); all {self.S} singular values {at}{of(self.b_dist)} (dense), the top {self.k} stored; "
                  f"ρ not computed")
        elif self.spectra == "exact":
            sv = f"all {self.S} singular values {at}{of(self.b_spectra)}, exact (diagonal Jacobian)"
        else:
            sv = f"all {self.S} singular values {at}{of(self.b_spectra)}, dense" + (
                "" if n == T else f"; σ_max, σ_min at every step, ρ at the {n}")

        def part(name, m, b):
            if not m:
                return f"{name} not computed"
            what = f"{name} all {self.S}" if m >= self.S else f"{name} top {m} of {self.S}"
            return what + of(b, " over")

        return (f"{self.unit}: {sv}; {part('products', self.products, self.b_products)}; "
                f"{part('Lyapunov', self.lyapunov, self.b_lyapunov)}; chunks of {self.chunk} step(s), est. peak "
                f"{_fmt_bytes(self.peak)} of {_fmt_bytes(self.memory)}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        d["distances"] = list(self.distances)
        d["text"] = self.describe()
        return d


def _fit(cost: float, B: int, budget: float) -> int:
    """Sequences (1..B) whose work of ``cost`` flops each fits ``budget``."""
    return max(1, min(B, int(budget // max(cost, 1.0))))


def plan_unit(unit: str, *, S: int, T: int, B: int, structure: str, config: AnalysisConfig,
              products: bool | None = None, lyapunov: bool | None = None,
              matvec_flops: float | None = None) -> Plan:
    """The :class:`Plan` of one unit (see the module docstring); ``products`` / ``lyapunov``
    override ``config`` (e.g. a run too short for Lyapunov exponents); ``matvec_flops``: the cost of
    one closed-form J v of the unit's kind (default 2·S², a dense product's)."""
    from .topk import oversampled

    if S < 1 or T < 1 or B < 1:
        raise GradflowError(f"{unit}: cannot plan an analysis of S={S}, T={T}, B={B}")
    cfg = config
    want_p = cfg.products if products is None else products
    want_l = cfg.lyapunov if lyapunov is None else lyapunov
    if structure != "dense":
        route, k = "exact", S
    elif S <= cfg.dense_max or cfg.k >= S:
        route, k = "dense", S
    else:
        route, k = "top-k", cfg.k
    svd = 10.0 * S ** 3  # one dense factorisation
    mv = 2.0 * S * S if matvec_flops is None else float(matvec_flops)  # one J v (closed form)
    if route == "exact":
        steps = tuple(range(T))
    elif T * B * svd <= _CHEAP_FLOPS:
        steps = tuple(range(T))
    else:
        n = int(_SWEEPS * T * S * S // svd)
        steps = distribution_steps(T, max(min(_MIN_STEPS, cfg.spectra_steps), min(n, cfg.spectra_steps)))
    full = route != "top-k"
    n_prod = (S if full else min(cfg.k, S)) if want_p else 0
    n_lyap = (S if full else min(cfg.k, S)) if want_l else 0
    distances = log_distances(T, cfg.distances) if n_prod else ()
    iterations = 0
    work = WORK_FLOPS * T
    if route == "exact":
        b_s = b_d = b_p = b_l = B
    else:
        if route == "dense":
            b_s = b_d = _fit(T * svd, B, work)
        else:
            iterations = min(S, LANCZOS_ITERATIONS)
            while iterations > _MIN_ITERATIONS and T * (2 * iterations * mv + 4 * S * iterations ** 2) > work:
                iterations -= 1
            b_s = _fit(T * (2 * iterations * mv + 4 * S * iterations ** 2), B, work)
            n_min = min(_MIN_STEPS, cfg.spectra_steps, T)
            if len(steps) * svd > work and len(steps) > n_min:
                steps = distribution_steps(T, max(n_min, int(work // svd)))
            b_d = min(b_s, _fit(len(steps) * svd, B, work))

        def prod_cost(m):
            if full:
                return T * (m * mv + 6.0 * S ** 3)
            mm = oversampled(m, S)
            return (T + 2 * sum(distances)) * (mm * mv + 4.0 * S * mm * mm)

        def lyap_cost(m):
            return T * (m * mv + 4.0 * S * m * m)

        if not full:  # lower k until one sequence fits (at least 4 directions, or k when smaller)
            floor_k = min(4, cfg.k)
            while n_prod > floor_k and prod_cost(n_prod) > work:
                n_prod = max(floor_k, n_prod // 2)
            while n_lyap > floor_k and lyap_cost(n_lyap) > work:
                n_lyap = max(floor_k, n_lyap // 2)
        b_p = _fit(prod_cost(n_prod), B, work) if n_prod else B
        b_l = _fit(lyap_cost(n_lyap), B, work) if n_lyap else B
    # T-independent state of the sweeps: QR frames (products also keep their triangle, lyapunov its R),
    # and the distribution steps' dense Jacobians
    fixed = 0
    if route != "exact":
        fixed = max(b_p * S * n_prod * _F64 * 5 + (b_p * n_prod * n_prod * _F64 * 3 if n_prod else 0),
                    b_l * S * n_lyap * _F64 * 4)
        if route == "top-k":
            fixed += b_d * S * S * _F64 * 3
    fixed += T * B * _F64 * 16  # per-step summaries and distance profiles
    if cfg.per_step_loss:
        fixed += T * T * B * _F64  # G[s, t] of a per-step loss
    fixed *= _CALIBRATION
    per_step = _per_step_bytes(S, max(b_s, b_p, b_l), b_s, route, iterations) * _CALIBRATION
    room = cfg.memory - fixed
    if room < per_step:
        need = fixed + per_step
        raise GradflowError(
            f"{unit}: the analysis needs about {_fmt_bytes(need)} even one timestep at a time (S={S}, T={T}, "
            f"B={B}), over the memory budget of {_fmt_bytes(cfg.memory)}; raise it (--memory / memory= / "
            f"[analysis] memory) or lower batch_limit or k")
    chunk = min(T, int(room // per_step)) if cfg.chunk is None else min(T, cfg.chunk)
    peak = fixed + chunk * per_step
    if peak > cfg.memory:
        raise GradflowError(
            f"{unit}: chunk={cfg.chunk} needs about {_fmt_bytes(peak)} (S={S}, T={T}, B={B}), over the memory "
            f"budget of {_fmt_bytes(cfg.memory)}; lower chunk or raise memory (--memory / memory= / "
            f"[analysis] memory)")
    return Plan(unit=unit, S=S, T=T, B=B, structure=structure, spectra=route, k=k, steps=steps,
                products=n_prod, lyapunov=n_lyap, distances=distances,
                chunk=max(1, chunk), radius=route != "top-k", memory=cfg.memory, peak=int(peak),
                b_spectra=b_s, b_dist=b_d, b_products=b_p, b_lyapunov=b_l, iterations=iterations)


def _per_step_bytes(S: int, B: int, b_s: int, route: str, iterations: int) -> int:
    """Estimated bytes held per timestep of a chunk: the linearisation coefficients of B sequences
    (float32 and float64) and the per-step spectra's working set over b_s sequences."""
    if route == "exact":
        return B * S * _F64 * 4
    coef = B * S * _F64 * 6
    if route == "dense":
        return coef + b_s * S * S * _F64 * 3  # J, its float64 copy, LAPACK workspace
    return coef + b_s * S * _F64 * (2 * iterations + 6)  # Lanczos vectors
