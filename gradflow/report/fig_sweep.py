"""Sweep comparison: memory horizon and eval metric against each numeric sweep axis, per cell.

Input is the tidy ``sweep.csv`` that ``gradflow sweep`` writes (one row per run x state key). Only the
primary state key of each run is used (:func:`primary_rows`); each plotted point is the mean over
seeds and the other axes of the runs with that cell and axis value (:func:`sweep_points`), with the
lowest..highest value as error bar. Censored horizons (never reached within the sequence) are not
averaged: they are open markers at the top of the horizon panel.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from ..errors import GradflowError
from ._style import PAGE_WIDTH, legend_below, log_scale, new_figure, ordered, palette, span_decades, styled

__all__ = ["fig_sweep", "primary_rows", "sweep_points", "numeric_axes", "sweep_axis_names", "primary_key"]

RESULT_COLUMNS = ("status", "eval_metric", "chance", "solved", "diverged_at", "key", "decay_rate", "ci_low",
                  "ci_high", "horizon", "horizon_censored", "error")


def sweep_axis_names(sweep: pd.DataFrame, axes: Sequence[str] | None = None) -> list[str]:
    """The sweep's axis columns: ``axes`` when given (those present), else the columns between
    ``dir`` and the result columns, as ``sweep_table`` writes them."""
    if axes:
        return [a for a in axes if a in sweep.columns]
    cols = list(sweep.columns)
    start = cols.index("dir") + 1 if "dir" in cols else 0
    out = []
    for c in cols[start:]:
        if c in RESULT_COLUMNS:
            break
        out.append(c)
    return out


def numeric_axes(sweep: pd.DataFrame, axes: Sequence[str]) -> list[str]:
    """Axes other than ``seed`` and ``cell`` whose values are all numbers and take more than one value."""
    out = []
    for a in axes:
        if a in ("seed", "cell") or a not in sweep.columns:
            continue
        v = pd.to_numeric(sweep[a], errors="coerce")
        if v.notna().all() and v.nunique() > 1:
            out.append(a)
    return out


def primary_key(keys: Sequence[str]) -> str | None:
    """The state key that stands for a run: one ending in ``/hc`` (LSTM: hidden and cell state
    together), else one ending in ``/h``, else the first; None when there is none."""
    keys = [k for k in keys if isinstance(k, str) and k]
    for suffix in ("/hc", "/h"):
        for k in keys:
            if k.endswith(suffix):
                return k
    return keys[0] if keys else None


def primary_rows(sweep: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the row of its primary state key (a run without decay keeps its one row)."""
    rows = []
    by = ["study", "run"] if "study" in sweep.columns else ["run"]
    for _, g in sweep.groupby(by, sort=False):
        k = primary_key(list(g["key"]))
        rows.append(g.index[0] if k is None else g.index[(g["key"] == k).to_numpy()][0])
    return sweep.loc[rows].reset_index(drop=True)


def _cells(df: pd.DataFrame) -> pd.Series:
    return df["cell"].astype(str) if "cell" in df.columns else pd.Series("all runs", index=df.index)


def sweep_points(sweep: pd.DataFrame, axis: str, metric: str) -> pd.DataFrame:
    """Per cell and value of ``axis``: ``mean``, ``lo``/``hi`` (min/max) and ``n`` of ``metric`` over the
    primary-key rows with a finite value; ``censored`` counts rows whose horizon was not reached
    (for ``metric="horizon"`` those rows are left out of the mean); ``chance`` the mean chance level.

    ``sweep`` is the tidy sweep table (all keys); the result has columns cell, x, mean, lo, hi, n,
    censored, chance, sorted by cell (first-seen order) then x.
    """
    if metric not in sweep.columns or axis not in sweep.columns:
        raise GradflowError(f"sweep.csv: missing column {metric if metric not in sweep.columns else axis!r}")
    p = primary_rows(sweep)
    x = pd.to_numeric(p[axis], errors="coerce")
    val = pd.to_numeric(p[metric], errors="coerce").astype(float)
    cens = (p["horizon_censored"].astype(str).str.lower().isin(["true", "1", "1.0"])
            if "horizon_censored" in p.columns else pd.Series(False, index=p.index))
    if metric != "horizon":
        cens = pd.Series(False, index=p.index)
    val[cens] = np.nan
    chance = pd.to_numeric(p["chance"], errors="coerce") if "chance" in p.columns else pd.Series(np.nan, index=p.index)
    t = pd.DataFrame({"cell": _cells(p), "x": x, "v": val, "censored": cens, "chance": chance})
    t = t[t["x"].notna()]
    out = []
    for cell in ordered(t["cell"]):
        for xv, g in sorted(t[t["cell"] == cell].groupby("x"), key=lambda kv: kv[0]):
            v = g["v"].to_numpy(float)
            v = v[np.isfinite(v)]
            out.append(dict(cell=cell, x=float(xv), mean=float(v.mean()) if v.size else np.nan,
                            lo=float(v.min()) if v.size else np.nan, hi=float(v.max()) if v.size else np.nan,
                            n=int(v.size), censored=int(g["censored"].sum()),
                            chance=float(g["chance"].mean()) if g["chance"].notna().any() else np.nan))
    return pd.DataFrame(out, columns=["cell", "x", "mean", "lo", "hi", "n", "censored", "chance"])


def _axis_label(axis: str) -> str:
    return {"gain": "initial gain g", "task.T": "sequence length T"}.get(axis, axis)


def fig_sweep(sweep: pd.DataFrame, axes: Sequence[str], *, target: Callable | None = None):
    """One row of panels per numeric axis: (left) memory horizon, (right) eval metric against the axis,
    one line per cell (:func:`sweep_points`). Horizon: log y when the means span more than a decade;
    censored horizons are open markers at the top. Eval metric: chance as a dashed grey line."""
    num = numeric_axes(sweep, axes)
    if not num:
        raise GradflowError("sweep.csv: no numeric sweep axis other than seed to plot against")
    cells = ordered(_cells(primary_rows(sweep)))
    colors = palette(cells)
    with styled():
        f = new_figure(PAGE_WIDTH, 1.1 + 2.6 * len(num), target)
        grid = f.subplots(len(num), 2, squeeze=False)
        any_cens = False
        for row, axis in enumerate(num):
            ax_h, ax_m = grid[row]
            hp = sweep_points(sweep, axis, "horizon")
            mp = sweep_points(sweep, axis, "eval_metric")
            xs = sorted(set(hp["x"]))
            dx = (max(xs) - min(xs)) * 0.012 if len(xs) > 1 else 0.0
            for i, cell in enumerate(cells):
                c = colors[cell]
                off = (i - (len(cells) - 1) / 2) * dx
                for ax, pts in ((ax_h, hp), (ax_m, mp)):
                    q = pts[(pts["cell"] == cell) & (pts["n"] > 0)]
                    if len(q):
                        m = q["mean"].to_numpy(float)
                        eb = ax.errorbar(q["x"].to_numpy(float) + off, m,
                                         yerr=[m - q["lo"].to_numpy(float), q["hi"].to_numpy(float) - m],
                                    color=c, marker="o", ms=4, capsize=2.5, lw=1.4, label=cell)
                        eb.lines[0].set_gid(f"sweep-mean:{cell}")
            finite = hp.loc[hp["n"] > 0, ["lo", "hi"]].to_numpy(float).ravel()
            if span_decades(finite) > 1:
                log_scale(ax_h, "y")
            cens = hp[hp["censored"] > 0]
            if len(cens):
                any_cens = True
                ax_h.relim()
                ax_h.autoscale_view()
                lo_, hi_ = ax_h.get_ylim() if len(finite) else (0.0, 1.0)
                ytop = hi_ * 1.4 if ax_h.get_yscale() == "log" else hi_ + 0.12 * (hi_ - lo_ if hi_ > lo_ else 1.0)
                for i, cell in enumerate(cells):
                    q = cens[cens["cell"] == cell]
                    off = (i - (len(cells) - 1) / 2) * dx
                    ax_h.plot(q["x"].to_numpy(float) + off, np.full(len(q), ytop), ls="none", marker="^", ms=7, mfc="none",
                              mec=colors[cell], mew=1.4)
                ax_h.set_ylim(lo_, ytop * 1.15 if ax_h.get_yscale() == "log" else ytop + 0.06 * (ytop - lo_))
                ax_h.axhline(ytop, color="0.75", lw=0.6, ls=":", zorder=0)
            ch = mp.groupby("x")["chance"].mean().dropna()
            if len(ch):
                ax_m.plot(ch.index, ch.to_numpy(), color="0.45", ls="--", lw=1.0, zorder=0)
            for ax in (ax_h, ax_m):
                ax.set_xlabel(_axis_label(axis))
            ax_h.set_ylabel("memory horizon (steps)")
            ax_m.set_ylabel("eval metric")
            ax_h.set_title(f"Memory horizon vs {_axis_label(axis)}")
            ax_m.set_title(f"Eval metric vs {_axis_label(axis)}")
        handles = [Line2D([], [], color=colors[c], marker="o", ms=4, lw=1.4) for c in cells]
        labels = list(cells)
        handles.append(Line2D([], [], color="0.45", ls="--", lw=1.0))
        labels.append("chance level")
        if any_cens:
            handles.append(Line2D([], [], ls="none", marker="^", ms=7, mfc="none", mec="0.3"))
            labels.append("horizon not reached (censored; count in notes)")
        legend_below(f, handles, labels, max_cols=4, title="mean over seeds and other axes; bars: min–max")
    return f
