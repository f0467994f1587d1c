"""Notes printed under a section's explanation: runs a figure does not cover, runs that did not
finish, and what a figure draws in place of values it cannot place (exactly-zero medians, −∞ or NaN
Lyapunov exponents). Plain functions of a :class:`RunSet` or a table; :mod:`.sections` uses them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .fig_heatmap import heatmap_layers
from .fig_jacobians import nonfinite_lyapunov
from .load import RunSet

__all__ = ["coverage_notes", "flag_notes", "flag_text", "zero_median_notes", "lyapunov_notes"]


def _missing_runs(rs: RunSet, name: str) -> list[str]:
    if not rs.has(name):
        return []
    present = set(rs.table(name)["run"])
    return [r.label for r in rs.runs if r.label not in present]


def coverage_notes(rs: RunSet, names) -> list[str]:
    """"Not shown for RUN: no rows in a.csv, b.csv." for each run lacking some of the tables."""
    missing: dict[str, list[str]] = {}
    for n in names:
        for run in _missing_runs(rs, n):
            missing.setdefault(run, []).append(f"{n}.csv")
    return [f"Not shown for {run}: no rows in {', '.join(files)}." for run, files in missing.items()]


def plan_notes(rs: RunSet, names) -> list[str]:
    """"Analysis plan of RUN: <plan text>" for each unit of each run shown in the tables ``names``
    (from run.json), so that a top-k or subsampled spectrum is never read as a full one."""
    shown = set()
    for n in names:
        if rs.has(n):
            shown |= set(rs.table(n)["run"])
    out = []
    for r in rs.runs:
        if r.label in shown:
            out += [f"Analysis plan of {r.label}: {p['text']}." for p in r.plans]
    return out


def flag_notes(rs: RunSet, names) -> list[str]:
    shown = set()
    for n in names:
        if rs.has(n):
            shown |= set(rs.table(n)["run"])
    return [flag_text(r) for r in rs.runs if r.label in shown and r.flagged]


def flag_text(r) -> str:
    """One warning line for a run that did not finish normally."""
    if r.status == "diverged":
        at = f" at step {r.diverged_at}" if r.diverged_at is not None else ""
        return f"⚠ {r.label} diverged{at}: values from there on may be NaN/Inf (marked red)."
    if r.status == "running":
        return f"⚠ {r.label} was still running when this report was built: its tables may be incomplete."
    return f"⚠ {r.label} {r.status}: its tables may be incomplete."


def zero_median_notes(g: pd.DataFrame) -> list[str]:
    """Per run/key with exactly-zero medians in ``gradnorms``: how many cells, how many of them are
    hatched (coloured by the 95th percentile) or grey, and the share of the batch that was 0."""
    out = []
    for (run, key), s in g.groupby(["run", "key"], sort=False):
        L = heatmap_layers(s)
        n_zero = int(np.isneginf(L["q50"]).sum())
        if not n_zero:
            continue
        who = run if g.loc[g["run"] == run, "key"].nunique() == 1 else f"{run} ({key})"
        n, up, grey = L["q50"].size, int(L["upper"].sum()), int(L["zero"].sum())
        share = "all" if n_zero == n else f"{n_zero} of {n}"
        parts = []
        if up:
            fz = L["frac_zero"][L["upper"]]
            fz = fz[np.isfinite(fz)]
            of = (f" ({fz.min():.0%} of the batch exactly 0)" if fz.size and fz.min() == fz.max() else
                  f" ({fz.min():.0%}–{fz.max():.0%} of the batch exactly 0)" if fz.size else "")
            parts.append(f"{'all' if up == n_zero else up} hatched, coloured by the 95th percentile{of}")
        if grey:
            parts.append(f"{'all' if grey == n_zero else grey} grey (95th percentile exactly 0 too)")
        out.append(f"{who}: the median gradient is exactly 0 in {share} cells; " + "; ".join(parts) + ".")
    return out


def lyapunov_notes(ly: pd.DataFrame) -> list[str]:
    """One note per run/key with non-finite Lyapunov exponents (−∞: a direction the Jacobian product
    maps exactly to 0, drawn as a triangle at the bottom; NaN/+∞: not drawn)."""
    out = []
    multi = ly.groupby("run")["key"].nunique()
    for (run, key), what in nonfinite_lyapunov(ly).items():
        who = run if multi[run] == 1 else f"{run} ({key})"
        e = ly.loc[(ly["run"] == run) & (ly["key"] == key), "exponent"].to_numpy(float)
        if not np.isfinite(e).any():
            how = ("no line can be drawn; triangles at the bottom mark the −∞ ranks" if np.isneginf(e).any()
                   else "nothing can be drawn")
            out.append(f"{who}: no finite Lyapunov exponent ({what}): {how}.")
        else:
            what = (what.replace(" −∞", " Lyapunov exponents are −∞", 1) if "−∞" in what
                    else what + " Lyapunov exponents")
            out.append(f"{who}: {what}; the line joins the finite ones"
                       + (", triangles at the bottom mark the −∞ ones (directions mapped exactly to 0)."
                          if np.isneginf(e).any() else "."))
    return out
