"""Figure of gradient norms against temporal distance (the heatmap over training step × timestep
is in :mod:`.fig_heatmap`).

Reads log10 norms (base 10, as in :mod:`gradflow.tables`) and plots them on axes whose ticks are
labelled as powers of ten, so a value far below float64 range still plots. Exact zeros (float32
underflow, log10 = -inf) and NaN/Inf are drawn as such, never dropped silently.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..errors import GradflowError
from ._style import (
    FLOAT32_SUBNORMAL_LOG10,
    NONFINITE_COLOR,
    PAGE_WIDTH,
    grid_shape,
    legend_below,
    log10_axis,
    new_figure,
    ordered,
    require,
    styled,
    wrap_text,
)

__all__ = ["fig_distance", "fit_intercept"]

def fit_intercept(d: np.ndarray, y: np.ndarray, slope: float) -> float:
    """Least-squares intercept of ``y ≈ b + slope·d`` with the slope fixed (finite points only)."""
    d, y = np.asarray(d, float), np.asarray(y, float)
    ok = np.isfinite(y) & np.isfinite(d)
    if not ok.any():
        return float("nan")
    return float(np.mean(y[ok] - slope * d[ok]))


def fig_distance(distance: pd.DataFrame, decay: pd.DataFrame | None = None, *, target: Callable | None = None):
    """Gradient norm against temporal distance, one panel per run, one colour per key.

    Line: median over the batch (``q50``); dark band ``q25..q75``, light band ``q05..q95``.
    From ``decay`` (optional): dashed fitted line with slope ``decay_rate`` (log10 per step; the
    intercept is the least-squares one given that slope, since ``decay`` has no intercept), dotted
    vertical line at ``horizon`` (an arrow at the right edge when ``horizon_censored``).
    Distances with ``frac_zero > 0`` get a triangle at the bottom edge (float32 underflow), those with
    ``frac_nonfinite > 0`` (an optional column) a red cross at the top; a dashed grey line marks the
    smallest float32 value when the data come near it.
    """
    require(distance, "distance", ("run", "key", "distance", "q05", "q25", "q50", "q75", "q95", "frac_zero"))
    decay = decay if decay is not None and len(decay) else None
    runs = ordered(distance["run"])
    rows, cols = grid_shape(len(runs), 2)
    with styled():
        f = new_figure(PAGE_WIDTH, 1.0 + 2.9 * rows, target)
        axes = np.atleast_1d(f.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)).ravel()
        import seaborn as sns

        allkeys = ordered(distance["key"])
        colors = dict(zip(allkeys, sns.color_palette("colorblind", len(allkeys))))
        qs = distance[["q05", "q50", "q95"]].to_numpy(dtype=float)
        fin = qs[np.isfinite(qs)]
        near_limit = fin.size and fin.min() < FLOAT32_SUBNORMAL_LOG10 + 8
        any_under = any_fit = any_hz = any_nonfin = False
        for ax, run in zip(axes, runs):
            dr = distance[distance["run"] == run]
            notes = {}
            for key in ordered(dr["key"]):
                s = dr[dr["key"] == key].sort_values("distance")
                if s["distance"].duplicated().any():
                    raise GradflowError(f"distance: duplicate distances for run {run!r} key {key!r}")
                d = s["distance"].to_numpy(dtype=float)
                c = colors[key]
                ax.fill_between(d, s["q05"], s["q95"], color=c, alpha=0.12, linewidth=0)
                ax.fill_between(d, s["q25"], s["q75"], color=c, alpha=0.28, linewidth=0)
                (ln,) = ax.plot(d, s["q50"].to_numpy(dtype=float), color=c, lw=1.6, label=key)
                ln.set_gid(f"median|{run}|{key}")
                fz = s["frac_zero"].to_numpy(dtype=float)
                if (fz > 0).any():
                    any_under = True
                    pts = ax.scatter(d[fz > 0], np.full((fz > 0).sum(), 0.03), marker="v", s=16, color=c,
                                     transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
                    pts.set_gid(f"underflow|{run}|{key}")
                if "frac_nonfinite" in s.columns:
                    nf = s["frac_nonfinite"].to_numpy(dtype=float) > 0
                    if nf.any():
                        any_nonfin = True
                        pts = ax.scatter(d[nf], np.full(nf.sum(), 0.97), marker="x", s=18, color=NONFINITE_COLOR,
                                         transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
                        pts.set_gid(f"nonfinite|{run}|{key}")
                if decay is None:
                    continue
                row = decay[(decay["run"] == run) & (decay["key"] == key)]
                if row.empty:
                    continue
                row = row.iloc[0]
                note = ""
                rate = float(row["decay_rate"])
                if np.isfinite(rate):
                    b = fit_intercept(d, s["q50"].to_numpy(dtype=float), rate)
                    (fl,) = ax.plot(d, b + rate * d, color=c, ls="--", lw=1.1)
                    fl.set_gid(f"fit|{run}|{key}")
                    any_fit = True
                    note += f"×{10 ** rate:.3g} per step"
                hz, frac = float(row["horizon"]), float(row["fraction"])
                if not np.isfinite(rate) and not np.isfinite(hz):
                    note += "; no decay fit (no finite gradient)"
                elif bool(row["horizon_censored"]) or not np.isfinite(hz):
                    note += f"; horizon > {d.max():g} steps"
                    ext = float(row.get("horizon_extrapolated", np.nan))
                    if np.isfinite(ext) and ext > 0:
                        note += f" (≈{ext:.3g} extrapolated)"
                else:
                    vl = ax.axvline(hz, color=c, ls=":", lw=1.4)
                    vl.set_gid(f"horizon|{run}|{key}")
                    any_hz = True
                    note += f"; horizon at {hz:.3g} ({_factor(frac)})"
                if bool(row["underflow"]):
                    note += "; float32 underflow"
                notes[key] = note.lstrip("; ")
            empty = _empty_panel_text(dr)
            if empty:
                ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center", fontsize=7.5,
                        color="0.15", bbox=dict(facecolor="white", edgecolor="0.6", alpha=0.9, pad=3))
            if near_limit:
                ax.axhline(FLOAT32_SUBNORMAL_LOG10, color="0.4", ls=(0, (4, 2)), lw=0.8)
            keys = ordered(dr["key"])
            hs = [h for h in ax.get_lines() if (h.get_gid() or "").startswith("median|")]
            labels = [(f"{k}: {notes[k]}" if k in notes else k) if len(keys) > 1 else notes.get(k, k) for k in keys]
            # wrapped to the panel's width (less the y axis), so that a long note never leaves the figure
            inner_pt = (f.bbox.width / f.figure.dpi / cols - 1.3) * 72
            ax.legend(hs, [wrap_text(s, inner_pt, 7) for s in labels], loc="best", fontsize=7, framealpha=0.85)
            ax.set_title(run, loc="left")
            ax.set_xlabel("temporal distance to the loss (steps)")
            ax.set_ylabel("‖dL/ds_t‖ (log scale)")
            ax.tick_params(labelbottom=True, labelleft=True)
            log10_axis(ax, "y")
        for ax in axes[len(runs):]:
            ax.remove()
        handles = [Line2D([], [], color="0.3", lw=1.6, label="median over batch"),
                   Patch(color="0.3", alpha=0.35, label="25–75% / 5–95% of batch")]
        if any_fit:
            handles.append(Line2D([], [], color="0.3", ls="--", label="fitted decay rate"))
        if any_hz:
            handles.append(Line2D([], [], color="0.3", ls=":", lw=1.4, label="memory horizon"))
        if any_under:
            handles.append(Line2D([], [], color="0.3", marker="v", ls="", label="some exactly 0 (underflow / no path)"))
        if any_nonfin:
            handles.append(Line2D([], [], color=NONFINITE_COLOR, marker="x", ls="", label="some NaN/Inf"))
        if near_limit:
            handles.append(Line2D([], [], color="0.4", ls=(0, (4, 2)), label="float32 smallest value"))
        legend_below(f, handles, [h.get_label() for h in handles], max_cols=3)
    return f


def _empty_panel_text(dr: pd.DataFrame) -> str:
    """What to write in a distance panel whose median line draws nothing (every median exactly 0
    or non-finite), per key; "" when some median is finite."""
    lines = []
    for key in ordered(dr["key"]):
        s = dr[dr["key"] == key]
        q = s["q50"].to_numpy(dtype=float)
        if np.isfinite(q).any():
            continue
        who = f"{key}: " if dr["key"].nunique() > 1 else ""
        if np.isneginf(q).all():
            fz = s["frac_zero"].to_numpy(dtype=float)
            fz = fz[np.isfinite(fz)]
            share = ("" if not fz.size or fz.max() <= 0 else f"{fz.max():.0%}" if fz.min() == fz.max()
                     else f"{fz.min():.0%}–{fz.max():.0%}")
            lines.append(f"{who}median exactly 0 at every distance"
                         + (f"\n({share} of the batch got no gradient at all)" if share else ""))
        elif (np.isnan(q) | np.isposinf(q)).all():
            lines.append(f"{who}no finite gradient: NaN/Inf at every distance")
        else:
            lines.append(f"{who}no finite median (exactly 0 or NaN/Inf at every distance)")
    return "\n".join(lines)


def _factor(frac: float) -> str:
    if not np.isfinite(frac) or frac <= 0:
        return "threshold unknown"
    return f"falls {_times(1 / frac)}" if frac < 1 else f"grows {_times(frac)}"


def _times(x: float) -> str:
    return f"{x:,.0f}×" if 10 <= x < 1e7 else f"{x:.3g}×"
