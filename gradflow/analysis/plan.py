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
  (σ_max, σ_min, fraction of σ > 1; ρ at the distribution steps), the top-k route uses a Krylov lower
  bound from a basis of ≤ 32 vectors between distribution steps, σ_min (matrix-free) at the
  distribution steps, and does not compute ρ;
* **products** over distance and the **Lyapunov** spectrum: all S directions when S ≤ ``dense_max``
  or the structure is diagonal, else the top k (k-column QR frames, matrix-free);
* the **chunk**: timesteps whose Jacobian work is held in memory at once, the largest that keeps the
  estimated peak within the budget. When not even one step fits, :func:`plan_unit` raises a one-line
  GradflowError naming the unit, S, T, B, the budget and the option that changes it.

The estimates count float64 working arrays (the trace itself is not counted: it is already loaded).
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
    peak: the estimated peak of the working set (bytes)."""

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

    @property
    def matrix_free(self) -> bool:
        return self.spectra == "top-k"

    def describe(self) -> str:
        """One line, e.g. ``"<root>/l0/d0/h: top 32 of 1024 singular values at 64 of 500 steps,
        matrix-free; σ_max at every step; products top 32; Lyapunov top 32; chunks of 40 steps"``."""
        n, T = len(self.steps), self.T
        at = f"at all {T} steps" if n == T else f"at {n} of {T} steps"
        if self.spectra == "top-k":
            sv = (f"top {self.k} of {self.S} singular values {at}, matrix-free; σ_max at every step"
                  f"{'' if n == T else ' (a Krylov lower bound between them)'}, σ_min at the {n}, ρ not computed")
        elif self.spectra == "exact":
            sv = f"all {self.S} singular values {at}, exact (diagonal Jacobian)"
        else:
            sv = f"all {self.S} singular values {at}, dense" + (
                "" if n == T else f"; σ_max, σ_min at every step, ρ at the {n}")

        def part(name, m):
            if not m:
                return f"{name} not computed"
            return f"{name} all {self.S}" if m >= self.S else f"{name} top {m} of {self.S}"

        return (f"{self.unit}: {sv}; {part('products', self.products)}; {part('Lyapunov', self.lyapunov)}; "
                f"B={self.B}, chunks of {self.chunk} step(s), est. peak {_fmt_bytes(self.peak)} of "
                f"{_fmt_bytes(self.memory)}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        d["distances"] = list(self.distances)
        d["text"] = self.describe()
        return d


def _per_step_bytes(S: int, B: int, route: str, k: int) -> int:
    """Estimated bytes held per timestep of a chunk."""
    if route == "exact":
        return B * S * _F64 * 4
    coef = B * S * _F64 * 6  # the chunk's linearisation coefficients, float32 and float64
    if route == "dense":
        return coef + B * S * S * _F64 * 3  # J, its float64 copy, LAPACK workspace
    return coef + B * S * S * _F64 * 3  # Krylov basis Q and J Q, up to S columns for a flat spectrum


def plan_unit(unit: str, *, S: int, T: int, B: int, structure: str, config: AnalysisConfig,
              products: bool | None = None, lyapunov: bool | None = None) -> Plan:
    """The :class:`Plan` of one unit (see the module docstring); ``products`` / ``lyapunov``
    override ``config`` (e.g. a run too short for Lyapunov exponents)."""
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
    if route == "exact":
        steps = tuple(range(T))
    else:
        per = 10.0 * S ** 3  # one factorisation (the Krylov basis of a flat spectrum grows to S as well)
        if T * B * per <= _CHEAP_FLOPS:
            steps = tuple(range(T))
        else:
            n = int(_SWEEPS * T * B * S * S // (B * per))
            steps = distribution_steps(T, max(min(_MIN_STEPS, cfg.spectra_steps), min(n, cfg.spectra_steps)))
    full = route != "top-k"
    n_prod = (S if full else min(cfg.k, S)) if want_p else 0
    n_lyap = (S if full else min(cfg.k, S)) if want_l else 0
    # T-independent state of the sweeps: QR frames (products also keep their triangle, lyapunov its R)
    fixed = 0
    if route != "exact":
        fixed = max(B * S * n_prod * _F64 * 5 + (B * n_prod * n_prod * _F64 * 3 if n_prod else 0),
                    B * S * n_lyap * _F64 * 4)
    fixed += T * B * _F64 * 16  # per-step summaries and distance profiles
    if cfg.per_step_loss:
        fixed += T * T * B * _F64  # G[s, t] of a per-step loss
    per_step = _per_step_bytes(S, B, route, k)
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
                products=n_prod, lyapunov=n_lyap, distances=log_distances(T, cfg.distances) if n_prod else (),
                chunk=max(1, chunk), radius=route != "top-k", memory=cfg.memory, peak=int(peak))
