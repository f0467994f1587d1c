"""Tidy DataFrames in the schemas of :mod:`gradflow.tables` (without ``run``, which the caller adds),
and plain-language verdicts (the ``summary`` table).

Ranks are 1-based (rank 1 = largest). Means over the batch skip masked steps and non-finite values.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch

from ..errors import GradflowError
from ..tables import TABLES
from ..trace import Trace
from . import _util
from .jacobian import linearize_trace
from .products import LyapunovResult
from .spectra import singular_values, step_summary

__all__ = ["spectra_tables", "spectra_table", "spectra_summary_table", "products_table", "lyapunov_table",
           "verdicts"]

LOG10E = 1 / math.log(10.0)


def _cols(name):
    return [c for c in TABLES[name] if c != "run"]


def spectra_table(sigma: torch.Tensor, key, *, max_rank: int | None = None, mask=None) -> pd.DataFrame:
    """``spectra`` rows (key, t, b, rank, sigma) from singular values [T, B, S]; ranks 1..max_rank;
    masked (t, b) are left out."""
    if sigma.ndim != 3:
        raise GradflowError(f"spectra_table: expected singular values [T, B, S], got shape {tuple(sigma.shape)}")
    T, B, S = sigma.shape
    r = S if max_rank is None else min(S, _util.positive_int(max_rank, "max_rank", "spectra_table"))
    t, b, rank = np.meshgrid(np.arange(T), np.arange(B), np.arange(1, r + 1), indexing="ij")
    keep = np.ones((T, B, r), bool) if mask is None else np.broadcast_to(np.asarray(mask)[..., None], (T, B, r))
    df = pd.DataFrame({"key": str(key), "t": t[keep], "b": b[keep], "rank": rank[keep],
                       "sigma": sigma[..., :r].to(torch.float64).numpy()[keep]})
    return df[_cols("spectra")]


def _masked_mean(v: torch.Tensor, mask) -> np.ndarray:
    v = v.to(torch.float64)
    ok = torch.isfinite(v) if mask is None else torch.isfinite(v) & mask
    s = torch.where(ok, v, torch.zeros_like(v)).sum(1)
    n = ok.sum(1)
    return torch.where(n > 0, s / n.clamp_min(1), torch.full_like(s, math.nan)).numpy()


def spectra_summary_table(summary: dict, key, *, mask=None) -> pd.DataFrame:
    """``spectra_summary`` rows (key, t, sigma_max, sigma_min, frac_gt1, spectral_radius): means over
    the batch of :func:`step_summary` output ([T, B] each; spectral_radius NaN if not computed)."""
    T = summary["sigma_max"].shape[0]
    df = pd.DataFrame({"key": str(key), "t": np.arange(T)})
    for c in ("sigma_max", "sigma_min", "frac_gt1", "spectral_radius"):
        df[c] = _masked_mean(summary[c], mask) if c in summary else np.nan
    return df[_cols("spectra_summary")]


def spectra_tables(trace: Trace, key, *, radius: bool = True, max_rank: int | None = None):
    """(spectra, spectra_summary) DataFrames of the per-step joint Jacobians of ``key``'s unit. A kind
    with a diagonal Jacobian structure gives its singular values (and eigenvalue moduli) unit by unit,
    without forming J_t."""
    k = _util.resolve(trace, key)
    mask = trace.mask(k)
    lin = linearize_trace(trace, k)
    if lin.structure != "dense":
        sv = lin.moduli().sort(-1, descending=True).values
        sv[torch.isnan(sv).any(-1)] = float("nan")  # a non-finite Jacobian: located, as on the dense route
        summ = {"sigma_max": sv[..., 0], "sigma_min": sv[..., -1], "frac_gt1": (sv > 1).to(sv.dtype).mean(-1)}
        summ["frac_gt1"][torch.isnan(sv[..., 0])] = float("nan")
        if radius:
            summ["spectral_radius"] = sv[..., 0]  # the eigenvalues of diag(d) are d; of a λ-block λ, λ̄
    else:
        J = lin.dense()
        sv = singular_values(J, on_nonfinite="nan")
        summ = step_summary(J, radius=radius, sigma=sv, on_nonfinite="nan")
    return spectra_table(sv, k, max_rank=max_rank, mask=mask), spectra_summary_table(summ, k, mask=mask)


def products_table(log_sigma: torch.Tensor, key, distances=None) -> pd.DataFrame:
    """``products`` rows (key, distance, rank, log10_sigma) from ln σ [D, B, S] (product_spectrum):
    mean over b of log10 σ_rank at each distance (finite values; -inf if all are exactly 0)."""
    D, B, S = log_sigma.shape
    ds = np.arange(1, D + 1) if distances is None else np.asarray(list(distances))
    l10 = log_sigma.to(torch.float64) * LOG10E
    fin = torch.isfinite(l10)
    mean = torch.where(fin, l10, torch.zeros_like(l10)).sum(1) / fin.sum(1).clamp_min(1)
    mean = torch.where(fin.any(1), mean, l10.amin(1))
    d, r = np.meshgrid(ds, np.arange(1, S + 1), indexing="ij")
    return pd.DataFrame({"key": str(key), "distance": d.ravel(), "rank": r.ravel(),
                         "log10_sigma": mean.numpy().ravel()})[_cols("products")]


def lyapunov_table(result: LyapunovResult, key) -> pd.DataFrame:
    """``lyapunov`` rows (key, rank, exponent, stderr): mean over batch items of the exponents (ln per
    step) and its standard error across items (the batch-means error when there is one item)."""
    ex = result.exponents.to(torch.float64)
    B, k = ex.shape
    mean = ex.mean(0)
    se = ex.std(0, unbiased=True) / math.sqrt(B) if B > 1 else result.stderr[0]
    return pd.DataFrame({"key": str(key), "rank": np.arange(1, k + 1), "exponent": mean.numpy(),
                         "stderr": se.numpy()})[_cols("lyapunov")]


def _fmt_factor(f: float) -> str:
    return f"{f:.0f}" if f < 1e6 else f"{f:.0e}"


def verdicts(decay: pd.DataFrame | None = None, spectra_summary: pd.DataFrame | None = None,
             lyapunov: pd.DataFrame | None = None, nonfinite: pd.DataFrame | None = None,
             distance: pd.DataFrame | None = None) -> pd.DataFrame:
    """``summary`` rows (key, verdict, detail), one per key found in any input table.

    Order of evidence: NaN/Inf gradients ("non-finite"); the decay fit and horizon ("vanishing:
    gradient falls 1000× by distance 15" — from its value at the decay row's reference distance,
    named in ``detail`` —, "exploding: gradient grows 1e+06× over 50 steps",
    "stable: …"); without a decay row, the per-step spectra and the Lyapunov spectrum ("exploding:
    σ_max up to 1.8", "vanishing: every step contracts, σ_max ≤ 0.93"). ``detail`` lists the numbers."""
    tables = [t for t in (decay, spectra_summary, lyapunov, nonfinite, distance) if t is not None]
    keys = list(dict.fromkeys(k for t in tables for k in t["key"].astype(str)))
    rows = []
    for key in keys:
        sel = lambda t: None if t is None else t[t["key"].astype(str) == key]  # noqa: E731
        dec, ss, ly, nf, dist = sel(decay), sel(spectra_summary), sel(lyapunov), sel(nonfinite), sel(distance)
        detail, verdict, ref_note = [], None, None
        if ss is not None and len(ss):
            smax = float(np.nanmax(ss["sigma_max"])) if ss["sigma_max"].notna().any() else math.nan
            detail.append(f"σ_max per step up to {smax:.3g} (mean {np.nanmean(ss['sigma_max']):.3g}), "
                          f"mean fraction of σ>1 {np.nanmean(ss['frac_gt1']):.2f}")
        if ly is not None and len(ly):
            top = float(ly.sort_values("rank")["exponent"].iloc[0])
            detail.append(f"top Lyapunov exponent {top:+.3g}/step" if not math.isnan(top)
                          else "no Lyapunov exponent (non-finite states or Jacobians)")
        if dec is not None and len(dec):
            r = dec.iloc[0]
            if math.isfinite(r.decay_rate):
                detail.append(f"decay rate {r.decay_rate:+.3g} log10/step (95% CI {r.ci_low:+.3g} to {r.ci_high:+.3g})")
            else:
                detail.append("no finite gradient to fit a decay rate")
            f = _fmt_factor(1 / float(r.fraction))
            span = int(dist["distance"].max()) if dist is not None and len(dist) else None
            grows_decade = span is None or r.decay_rate * span >= 1  # at least 10× over the sequence
            if r.decay_rate > 0 and not r.ci_low <= 0 and grows_decade:  # CI above 0 (or unknown)
                over = f" over {span} steps" if span else ""
                grow = 10 ** (r.decay_rate * span) if span else math.nan
                verdict = (f"exploding: gradient grows {_fmt_factor(grow)}×{over}" if span and math.isfinite(grow)
                           else f"exploding: gradient grows {10 ** r.decay_rate:.3g}× per step")
            elif np.isfinite(r.horizon):
                verdict = f"vanishing: gradient falls {f}× by distance {int(r.horizon)}"
            elif r.underflow:
                verdict = f"vanishing: gradient underflows float32 to 0 from distance {int(r.underflow_distance)}"
            elif math.isfinite(r.get("horizon_extrapolated", math.nan)):
                verdict = (f"stable within the sequence: gradient falls less than {f}×"
                           f"{f' over {span} steps' if span else ''} (a {f}× fall extrapolated at distance "
                           f"≈{r.horizon_extrapolated:.0f})")
            else:
                verdict = f"stable: gradient does not fall {f}×{f' over {span} steps' if span else ''}"
            ref = r.get("reference", math.nan)  # runs written before the column measured from distance 0
            ref_note = f"horizon measured from the gradient at distance {int(ref) if math.isfinite(ref) else 0}"
            if r.underflow:
                detail.append(f"float32 underflow (exact zeros) from distance {int(r.underflow_distance)}; "
                              "log-space values come from source='jacobians'")
            silent = r.get("n_silent", 0)
            if silent and math.isfinite(silent):
                detail.append(f"{int(silent)} sequence(s) received no gradient at all (exactly 0 at every "
                              "distance) and are left out")
        if verdict is None and ss is not None and len(ss):
            smax = float(np.nanmax(ss["sigma_max"]))
            lam = float(ly.sort_values("rank")["exponent"].iloc[0]) if ly is not None and len(ly) else math.nan
            if smax < 1:
                verdict = f"vanishing: every step contracts, σ_max ≤ {smax:.3g}"
            elif lam > 0 or (not math.isfinite(lam) and smax > 1):
                verdict = f"exploding: σ_max up to {smax:.3g}"
            else:
                verdict = f"vanishing: products contract at {lam:+.3g}/step although σ_max reaches {smax:.3g}"
        if verdict is None and ly is not None and len(ly):
            lam = float(ly.sort_values("rank")["exponent"].iloc[0])
            if not math.isnan(lam):
                verdict = (f"exploding: top Lyapunov exponent {lam:+.3g}/step" if lam > 0
                           else f"vanishing: top Lyapunov exponent {lam:+.3g}/step")
        if nf is not None and len(nf):
            first = nf.iloc[0]
            where = ", ".join(f"{c}={first[c]}" for c in ("t", "b", "step") if c in nf.columns)
            verdict = f"non-finite: {len(nf)} NaN/Inf gradient(s), first at {where}"
        if ref_note and verdict and verdict.startswith(("vanishing: gradient falls", "stable")):
            detail.append(ref_note)
        rows.append({"key": key, "verdict": verdict or "no evidence", "detail": "; ".join(detail)})
    return pd.DataFrame(rows, columns=_cols("summary"))
