"""The tidy tables that flow from training and analysis into reports.

A run directory holds these as CSV files (one per table, same name); report figures are pure
functions of them. Each table is long format. Columns below are required; extra columns are allowed.
Logs are base 10 unless a column says ``ln``. ``run`` is the run's label (e.g. ``"lstm"``,
``"rnn_tanh+clip"``); ``key`` is ``str(StateKey)``, e.g. ``"rnn/l0/d0/h"``.

Distance conventions: for a unit processed in direction 0 with a loss at the last step, the
temporal distance of position t is ``T-1-t``; for direction 1 it is ``t`` (the reverse direction
processes position 0 last).
"""

from __future__ import annotations

from typing import Iterable

from .errors import GradflowError

__all__ = ["TABLES", "check_columns"]

TABLES: dict[str, tuple[str, ...]] = {
    # one row per training step (written by the training loop as it goes)
    "metrics": (
        "run", "step", "loss", "metric", "grad_norm_before", "grad_norm_after", "clipped", "cosine",
    ),
    # per recorded training step x key x t: quantiles over the batch of log10 ||dL/ds_t||
    "gradnorms": (
        "run", "step", "key", "module", "layer", "direction", "state", "t", "distance",
        "n", "q05", "q25", "q50", "q75", "q95", "mean_log10", "frac_zero", "frac_nonfinite",
    ),
    # gradient norm against temporal distance (analysis.distance_profile), quantiles over batch
    # (and over recorded steps if pooled); frac_zero = fraction exactly 0 (float underflow)
    "distance": ("run", "key", "distance", "n", "q05", "q25", "q50", "q75", "q95", "frac_zero"),
    # one row per run x key: fitted decay and horizon. decay_rate is d log10||δ|| / d distance
    # (negative = vanishing); ci_low/ci_high its 95% interval; horizon in steps (NaN if never
    # reached within the sequence, see horizon_censored); underflow: float32 underflow observed
    "decay": (
        "run", "key", "decay_rate", "ci_low", "ci_high", "horizon", "horizon_censored", "fraction",
        "underflow",
    ),
    # singular values of per-step Jacobians, one row per run x key x t x b x rank
    "spectra": ("run", "key", "t", "b", "rank", "sigma"),
    # per-step summaries over the batch (means): sigma_max, sigma_min, frac_gt1, spectral radius
    "spectra_summary": ("run", "key", "t", "sigma_max", "sigma_min", "frac_gt1", "spectral_radius"),
    # singular values of products d s_{t0+k} / d s_{t0} against k: mean over b of log10 sigma_rank
    "products": ("run", "key", "distance", "rank", "log10_sigma"),
    # Lyapunov spectrum (ln per step), mean over batch items with a standard error
    "lyapunov": ("run", "key", "rank", "exponent", "stderr"),
    # gate activation statistics per timestep (and token class where the task has classes; "all"
    # otherwise)
    "gates": ("run", "key", "gate", "t", "token_class", "mean", "q25", "q50", "q75"),
    # per-timestep gradient norms before/after clipping at one training step (norm of the
    # per-timestep gradient, scaled by the clip factor for "after")
    "clip_timesteps": ("run", "step", "key", "t", "when", "log10_norm"),
    # one row per run x key: plain-language verdict
    "summary": ("run", "key", "verdict", "detail"),
}


def check_columns(name: str, columns: Iterable[str]) -> None:
    """Raise GradflowError naming the table and the missing columns."""
    if name not in TABLES:
        raise GradflowError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
    missing = [c for c in TABLES[name] if c not in set(columns)]
    if missing:
        raise GradflowError(f"table {name!r} lacks column(s) {', '.join(missing)}")
