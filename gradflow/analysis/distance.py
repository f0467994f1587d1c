"""Gradient norm against temporal distance: quantile profile, decay rate with a 95% CI, memory horizon.

Everything is in log10 space. Distance (see ``gradflow.tables``): for a loss on the last step, the
distance of position t is ``last(b) − t`` for direction 0 (``T−1−t`` when no step is masked) and
``t − first(b)`` (= t) for direction 1; for a gradient matrix G[s, t] it is the processing-order
distance between source s and position t.

* ``frac_zero``: the fraction of gradients that are exactly 0, reported, never a zero gradient in
  the analysis. Two causes are told apart per sequence. *Underflow*: exactly 0 at a distance beyond
  one where the sequence's gradient was nonzero; the decay row says ``underflow=True`` and the
  first such distance; recompute with ``source='jacobians'`` to get those values in log space.
  *No gradient at all*: a sequence that is exactly 0 at every distance (a saturated loss, a masked
  target) carries no evidence about decay; it is counted in ``n_silent`` and left out of the
  quantiles, the fit and the horizon. A zero only before the first nonzero value (an LSTM's c at
  distance 0 when the loss reads h alone) is neither.
* NaN/±Inf gradients are counted (``frac_nonfinite``) and listed in ``Profile.nonfinite`` with
  their position; they are left out of quantiles and fits, never silently.
* decay_rate: mean over sequences of the per-sequence least-squares slope of log10||δ|| against
  distance (within ``fit_range``); CI: mean ± t₀.₉₇₅·sd/√n over those n sequences (n ≥ 3), else the
  pooled OLS slope and its standard error.
* horizon: the first distance d > r at which the median over sequences of log10||δ_d|| − log10||δ_r||
  (each sequence against its own value at the reference distance r, ``reference``, default 1) is
  ≤ log10(fraction). Not reached within the data: NaN with ``horizon_censored=True``, and
  ``horizon_extrapolated = r + log10(fraction)/decay_rate`` when the rate's 95% CI lies below 0 and
  the fit puts the threshold beyond the data (NaN otherwise: a rate that may be 0 predicts nothing,
  and a fit that predicts the threshold inside the data, where the median did not reach it, is not
  a straight line to extrapolate).
* Why r = 1 and a fit from distance 1: distance 0 holds the loss's direct gradient, which enters
  the state through the readout, not through the recurrence. For gated cells it is a transient
  (an LSTM's h-part falls 2–3 decades in its first steps while the c-part carries the gradient
  nearly flat), and measured from it "falls 1000× within 36 steps" would describe the readout,
  not the memory. ``reference=0, fit_range=(0, None)`` gives the distance-0 convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from ..errors import GradflowError
from ..trace import Trace
from . import _util
from .adjoint import GradientMatrix, total_log10_norms

__all__ = ["DistanceProfile", "Profile", "distance_profile"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DISTANCE_COLUMNS = ["key", "distance", "n", "q05", "q25", "q50", "q75", "q95", "frac_zero", "frac_nonfinite"]
DECAY_COLUMNS = ["key", "decay_rate", "ci_low", "ci_high", "horizon", "horizon_censored", "fraction", "underflow",
                 "horizon_extrapolated", "underflow_distance", "n_sequences", "n_silent", "reference", "source"]


@dataclass(frozen=True, eq=False)
class Profile:
    """``table`` (the ``distance`` table, without ``run``), ``decay`` (one row of the ``decay`` table),
    ``nonfinite`` (t, b, distance, value of every NaN/Inf gradient) and ``samples`` [D, n] float64
    log10 norms per distance (NaN padding)."""

    table: pd.DataFrame
    decay: pd.DataFrame
    nonfinite: pd.DataFrame
    samples: np.ndarray


def _quantiles(rows: np.ndarray) -> np.ndarray:
    """Linear quantiles of each row of ``rows`` [D, n] ignoring NaN; -inf (a zero gradient) sorts
    first and a quantile touching it is -inf. -> [D, 5] (NaN for an empty row)."""
    return _util.row_quantiles(rows, QUANTILES)


@dataclass(frozen=True)
class DistanceProfile:
    """Configuration of :func:`distance_profile`.

    fraction: horizon threshold relative to the gradient at distance ``reference`` (default 1, the
    first step through the recurrence; see the module docstring); fit_range: (min, max) distances
    used for the decay fit (max None = all); source: 'trace' (recorded norms) or 'jacobians'
    (recomputed in float64 log space from a keep='states' trace, finite where float32 underflowed);
    direct: for
    source='jacobians', 'last' (loss on the last step) or 'derived'."""

    fraction: float = 1e-3
    reference: int = 1
    fit_range: tuple = (1, None)
    source: str = "trace"
    direct: str = "last"

    def __post_init__(self):
        _util.fraction_in_01(self.fraction, "fraction", "distance_profile")
        _util.positive_int(self.reference, "reference", "distance_profile", allow_zero=True)
        if self.source not in ("trace", "jacobians"):
            raise GradflowError(f"distance_profile: source={self.source!r} must be 'trace' or 'jacobians'")
        if self.direct not in ("last", "derived"):
            raise GradflowError(f"distance_profile: direct={self.direct!r} must be 'last' or 'derived'")
        lo, hi = self.fit_range
        if lo < 0 or (hi is not None and hi <= lo):
            raise GradflowError(f"distance_profile: fit_range={self.fit_range!r} must be (min >= 0, max > min or None)")

    # -------------------------------------------------------------- inputs -> sequences [n_seq, D]
    def sequences(self, data, key=None, *, direction: int = 0, mask=None):
        """(key label, L [n_seq, D] log10 norm by distance, present [n_seq, D] (an existing step; L may
        still be NaN there), zero [n_seq, D] (recorded gradient exactly 0), loc [n_seq, D, 2] (t, b))."""
        if isinstance(data, Trace):
            k = _util.resolve(data, key)
            recorded = data.log10_norm(k)
            lg = recorded if self.source == "trace" else total_log10_norms(data, k, direct=self.direct)
            zero = torch.isneginf(recorded) & data.mask(k)
            return (str(k), *_by_distance(lg, zero, data.mask(k), k.direction))
        if isinstance(data, GradientMatrix):
            return (data.key, *_matrix_by_distance(data))
        if isinstance(data, (torch.Tensor, np.ndarray)):
            lg = torch.as_tensor(np.asarray(data), dtype=torch.float64)
            if lg.ndim != 2:
                raise GradflowError(f"distance_profile: log10 norms must be [T, B], got shape {tuple(lg.shape)}")
            m = torch.ones(lg.shape, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool)
            return (str(key or ""), *_by_distance(lg, torch.isneginf(lg) & m, m, direction))
        raise GradflowError(f"distance_profile: expected a Trace, a GradientMatrix or log10 norms [T, B], "
                            f"got {type(data).__name__}")

    def __call__(self, data, key=None, *, direction: int = 0, mask=None) -> Profile:
        label, L, present, zero, loc = self.sequences(data, key, direction=direction, mask=mask)
        D = L.shape[1]
        raw = L
        bad = present & (np.isnan(L) | np.isposinf(L))  # NaN/Inf gradient at an existing step
        L = np.where(present & ~bad, L, np.nan)
        # a sequence exactly 0 wherever it exists received no gradient at all: no evidence about decay
        silent = present.any(1) & (zero | ~present).all(1)
        L = np.where(silent[:, None], np.nan, L)
        samples = L.T  # [D, n_seq]
        nonfin = bad.T
        n = present.sum(0)
        q = _quantiles(samples)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac_zero = np.where(n > 0, (zero & present).sum(0) / np.maximum(n, 1), np.nan)
            frac_nf = np.where(n > 0, nonfin.sum(1) / np.maximum(n, 1), np.nan)
        table = pd.DataFrame({"key": label, "distance": np.arange(D), "n": n, **{
            f"q{int(round(p * 100)):02d}": q[:, j] for j, p in enumerate(QUANTILES)},
            "frac_zero": frac_zero, "frac_nonfinite": frac_nf})[DISTANCE_COLUMNS]
        ij = np.argwhere(bad)
        nonfinite = pd.DataFrame({"key": label, "t": loc[ij[:, 0], ij[:, 1], 0], "b": loc[ij[:, 0], ij[:, 1], 1],
                                  "distance": ij[:, 1], "log10_norm": raw[ij[:, 0], ij[:, 1]]},
                                 columns=["key", "t", "b", "distance", "log10_norm"])
        decay = self._decay(label, L, zero & ~silent[:, None], int(silent.sum()))
        return Profile(table, decay, nonfinite, samples)

    # -------------------------------------------------------------- fit and horizon
    def _decay(self, label, L, zero, n_silent: int) -> pd.DataFrame:
        n_seq, D = L.shape
        d = np.arange(D, dtype=float)
        lo, hi = self.fit_range
        in_fit = (d >= lo) & (d <= (D - 1 if hi is None else hi))
        ok = np.isfinite(L) & in_fit[None, :]
        slopes = []
        for i in range(n_seq):
            x, y = d[ok[i]], L[i, ok[i]]
            if x.size >= 2 and np.ptp(x) > 0:
                slopes.append(np.polyfit(x, y, 1)[0])
        slopes = np.asarray(slopes)
        if slopes.size >= 3:
            rate = float(slopes.mean())
            half = float(stats.t.ppf(0.975, slopes.size - 1) * slopes.std(ddof=1) / math.sqrt(slopes.size))
        else:
            rate, half = _pooled_fit(L, ok, d)
        thr, r = math.log10(self.fraction), self.reference
        below = np.zeros(0, dtype=int)
        if D > r + 1:
            with np.errstate(invalid="ignore"):  # -inf - -inf (a zero reference) is masked just below
                rel = L[:, r + 1:] - L[:, r:r + 1]
                rel = np.where(np.isnan(L[:, r + 1:]) | ~np.isfinite(L[:, r:r + 1]) | np.isposinf(L[:, r + 1:]),
                               np.nan, rel)
            below = np.nonzero(_quantiles(rel.T)[:, 2] <= thr)[0]
        horizon = float(below[0] + r + 1) if below.size else math.nan
        falling = np.isfinite(rate) and rate < 0 and (not np.isfinite(half) or rate + half < 0)
        extrap = r + thr / rate if (not below.size and falling) else math.nan
        if not extrap > D - 1:  # only a prediction beyond the data is an extrapolation
            extrap = math.nan
        # underflow: exactly 0 beyond a distance where the same sequence was nonzero
        nonzero = np.isfinite(L)
        after = np.cumsum(nonzero, axis=1) > 0
        zd = np.nonzero((zero & np.concatenate([np.zeros((n_seq, 1), bool), after[:, :-1]], 1)).any(0))[0]
        return pd.DataFrame([{
            "key": label, "decay_rate": rate, "ci_low": rate - half, "ci_high": rate + half, "horizon": horizon,
            "horizon_censored": not below.size, "fraction": self.fraction, "underflow": bool(zd.size),
            "horizon_extrapolated": extrap, "underflow_distance": float(zd[0]) if zd.size else math.nan,
            "n_sequences": int(slopes.size), "n_silent": n_silent, "reference": r, "source": self.source,
        }])[DECAY_COLUMNS]


def _pooled_fit(L, ok, d):
    """OLS slope of log10 norm on distance with a per-sequence intercept; (slope, 95% half-width)."""
    xs, ys = [], []
    for i in range(L.shape[0]):
        x, y = d[ok[i]], L[i, ok[i]]
        if x.size:
            xs.append(x - x.mean())
            ys.append(y - y.mean())
    if not xs:
        return math.nan, math.nan
    x, y = np.concatenate(xs), np.concatenate(ys)
    sxx = float((x * x).sum())
    if sxx == 0:
        return math.nan, math.nan
    slope = float((x * y).sum() / sxx)
    dof = x.size - 1 - len(xs)
    if dof < 1:
        return slope, math.nan
    resid = y - slope * x
    se = math.sqrt(float((resid ** 2).sum()) / dof / sxx)
    return slope, float(stats.t.ppf(0.975, dof) * se)


def _by_distance(lg: torch.Tensor, zero: torch.Tensor, mask: torch.Tensor, direction: int):
    """[T, B] position-order values -> per-sequence rows indexed by distance from the last processed
    valid step: (L [B, T], present [B, T], zero [B, T], loc [B, T, 2])."""
    T, B = lg.shape
    pos = torch.arange(T)[:, None].expand(T, B)
    if direction == 0:
        ref = torch.where(mask, pos, -1).amax(0)
        dist = ref[None, :] - pos
    else:
        ref = torch.where(mask, pos, T).amin(0)
        dist = pos - ref[None, :]
    L = np.full((B, T), np.nan)
    Z = np.zeros((B, T), dtype=bool)
    loc = np.zeros((B, T, 2), dtype=np.int64)
    ok = (mask & (dist >= 0)).numpy()
    t_i, b_i = np.nonzero(ok)
    dd = dist.numpy()[t_i, b_i]
    P = np.zeros((B, T), dtype=bool)
    L[b_i, dd] = lg.to(torch.float64).numpy()[t_i, b_i]
    Z[b_i, dd] = zero.numpy()[t_i, b_i]
    P[b_i, dd] = True
    loc[b_i, dd, 0], loc[b_i, dd, 1] = t_i, b_i
    return L, P, Z, loc


def _matrix_by_distance(G: GradientMatrix):
    """Each (source s, batch b) is a sequence: row[d] = log10 G[s, t(s, d), b]."""
    lg = G.log10  # [T(s), T(t), B]
    T, _, B = lg.shape
    m = G.mask.numpy()
    L = np.full((T, B, T), np.nan)
    P = np.zeros((T, B, T), dtype=bool)
    loc = np.zeros((T, B, T, 2), dtype=np.int64)
    s = np.arange(T)
    for d in range(T):
        t = s - d if G.direction == 0 else s + d
        okk = (t >= 0) & (t < T)
        L[s[okk], :, d] = lg.numpy()[s[okk], t[okk], :]
        P[s[okk], :, d] = m[s[okk], :] & m[t[okk], :]
        loc[s[okk], :, d, 0] = t[okk][:, None]
        loc[s[okk], :, d, 1] = np.arange(B)[None, :]
    L, P = L.reshape(T * B, T), P.reshape(T * B, T)
    return L, P, np.isneginf(L) & P, loc.reshape(T * B, T, 2)


def distance_profile(data, key=None, *, direction: int = 0, mask=None, **config) -> Profile:
    """Gradient norm against distance for a Trace + key (loss on the last step), a
    :class:`GradientMatrix` (per-step losses), or log10 norms [T, B] (position order, with
    ``direction`` and optional ``mask``). ``config``: fields of :class:`DistanceProfile`."""
    return DistanceProfile(**config)(data, key, direction=direction, mask=mask)
