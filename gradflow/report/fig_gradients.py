"""Figures of gradient norms: over training step × timestep, and against temporal distance.

Both read log10 norms (base 10, as in :mod:`gradflow.tables`) and plot them on axes whose ticks are
labelled as powers of ten, so a value far below float64 range still plots. Exact zeros (float32
underflow, log10 = -inf) and NaN/Inf are drawn as such, never dropped silently.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..errors import GradflowError
from ._style import (
    FLOAT32_SUBNORMAL_LOG10,
    NONFINITE_COLOR,
    PAGE_WIDTH,
    UNDERFLOW_COLOR,
    grid_shape,
    log10_axis,
    new_figure,
    ordered,
    require,
    styled,
)

__all__ = ["fig_gradnorm_heatmap", "fig_distance", "heatmap_matrix", "fit_intercept"]

HEATMAP_CMAP = "viridis"
# heatmap cells are rasterised inside the otherwise vector figure: thousands of vector quads make
# large files and show hairline seams between cells in SVG/PDF viewers
RASTER_CELLS = 0


def heatmap_matrix(sub: pd.DataFrame, value: str = "q50") -> pd.DataFrame:
    """Pivot one run/key of ``gradnorms`` to a steps × t frame (rows and columns sorted)."""
    dup = sub.duplicated(["step", "t"])
    if dup.any():
        r = sub[dup].iloc[0]
        raise GradflowError(
            f"gradnorms: duplicate rows for run {r['run']!r} key {r['key']!r} step {r['step']} t {r['t']}"
        )
    return sub.pivot(index="step", columns="t", values=value).sort_index().sort_index(axis=1)


def _edges(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.size == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def fig_gradnorm_heatmap(gradnorms: pd.DataFrame, *, target: Callable | None = None):
    """Heatmap of the median log10 ‖dL/ds_t‖ (``q50``) over recorded training step × timestep t.

    One panel per (run, key) in first-seen order, each with its own colour scale and colour bar (a
    vanishing run spans tens of decades and would flatten every other panel on a shared scale; the
    distance figure compares runs on one axis), rows are the recorded steps (equal height, labelled with the step number), columns the timesteps.
    Cells whose median is -inf (exactly zero: float32 underflow, or no path to the loss such as an
    LSTM cell state at the last step) are grey, NaN/+inf cells red, and a
    red dot marks finite cells where some batch items were non-finite (``frac_nonfinite > 0``).
    """
    require(gradnorms, "gradnorms", ("run", "key", "step", "t", "q50", "frac_nonfinite"))
    panels = ordered(zip(gradnorms["run"], gradnorms["key"]))
    rows, cols = grid_shape(len(panels), 3 if len(panels) > 4 else 2)
    with styled():
        f = new_figure(PAGE_WIDTH, 0.9 + 2.3 * rows, target)
        axes = np.atleast_1d(f.subplots(rows, cols, squeeze=False)).ravel()
        any_under = any_nonfin = False
        for ax, (run, key) in zip(axes, panels):
            sub = gradnorms[(gradnorms["run"] == run) & (gradnorms["key"] == key)]
            piv = heatmap_matrix(sub)
            nf = heatmap_matrix(sub, "frac_nonfinite").to_numpy(dtype=float)
            z = piv.to_numpy(dtype=float)
            fin = z[np.isfinite(z)]
            vmin, vmax = (float(fin.min()), float(fin.max())) if fin.size else (-1.0, 0.0)
            if vmax - vmin < 0.1:
                vmin, vmax = (vmin + vmax) / 2 - 0.05, (vmin + vmax) / 2 + 0.05
            raster = z.size > RASTER_CELLS
            xe = _edges(piv.columns.to_numpy(dtype=float))
            ye = np.arange(len(piv.index) + 1, dtype=float)
            mesh = ax.pcolormesh(
                xe, ye, np.ma.masked_invalid(z), cmap=HEATMAP_CMAP, vmin=vmin, vmax=vmax, rasterized=raster, **_seamless(raster)
            )
            mesh.set_gid("q50")
            under = np.isneginf(z)
            nonfin = np.isnan(z) | np.isposinf(z)
            if under.any():
                any_under = True
                m = ax.pcolormesh(xe, ye, np.ma.masked_where(~under, np.ones_like(z)),
                                  cmap=ListedColormap([UNDERFLOW_COLOR]), rasterized=raster, **_seamless(raster))
                m.set_gid("underflow")
            if nonfin.any():
                any_nonfin = True
                m = ax.pcolormesh(xe, ye, np.ma.masked_where(~nonfin, np.ones_like(z)),
                                  cmap=ListedColormap([NONFINITE_COLOR]), rasterized=raster, **_seamless(raster))
                m.set_gid("nonfinite")
            part = (nf > 0) & ~nonfin
            if part.any():
                any_nonfin = True
                ii, jj = np.nonzero(part)
                xc = (xe[:-1] + xe[1:]) / 2
                pts = ax.scatter(xc[jj], ii + 0.5, s=6, color=NONFINITE_COLOR, marker="o", linewidths=0)
                pts.set_gid("partial_nonfinite")
            steps = piv.index.to_numpy()
            ticks = np.unique(np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int))
            ax.set_yticks(ticks + 0.5, [f"{steps[i]:g}" for i in ticks])
            ax.set_ylim(0, len(steps))
            ax.set_xlim(xe[0], xe[-1])
            ax.grid(False)
            ax.set_title(f"{run} — {key}", loc="left")
            ax.set_xlabel("timestep t")
            ax.set_ylabel("training step")
            cb = f.colorbar(mesh, ax=ax, aspect=25, pad=0.01, fraction=0.08)
            cb.set_label("median ‖dL/ds_t‖ (log)", fontsize=7.5)
            cb.ax.tick_params(labelsize=7)
            log10_axis(cb.ax, "y")
        for ax in axes[len(panels):]:
            ax.remove()
        handles = []
        if any_under:
            handles.append(Patch(color=UNDERFLOW_COLOR, label="exactly 0 (float32 underflow, or no path to the loss)"))
        if any_nonfin:
            handles.append(Patch(color=NONFINITE_COLOR, label="NaN / Inf (dot: some of the batch)"))
        if handles:
            f.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
    return f


def _seamless(raster: bool) -> dict:
    """Vector quads drawn with edges in their own colour, so viewers show no hairline seams."""
    return {} if raster else {"edgecolors": "face", "linewidth": 0.2}


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
                if bool(row["horizon_censored"]) or not np.isfinite(hz):
                    note += f"; horizon > {d.max():g} steps"
                    ext = float(row.get("horizon_extrapolated", np.nan))
                    if np.isfinite(ext) and ext > 0:
                        note += f" (≈{ext:.3g} extrapolated)"
                else:
                    vl = ax.axvline(hz, color=c, ls=":", lw=1.4)
                    vl.set_gid(f"horizon|{run}|{key}")
                    any_hz = True
                    note += f"; horizon {hz:.3g} steps ({_factor(frac)})"
                if bool(row["underflow"]):
                    note += "; float32 underflow"
                notes[key] = note.lstrip("; ")
            if near_limit:
                ax.axhline(FLOAT32_SUBNORMAL_LOG10, color="0.4", ls=(0, (4, 2)), lw=0.8)
            keys = ordered(dr["key"])
            hs = [h for h in ax.get_lines() if (h.get_gid() or "").startswith("median|")]
            labels = [(f"{k}: {notes[k]}" if k in notes else k) if len(keys) > 1 else notes.get(k, k) for k in keys]
            ax.legend(hs, labels, loc="best", fontsize=7, framealpha=0.85)
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
        f.legend(handles=handles, loc="outside lower center", ncol=3, frameon=False)
    return f


def _factor(frac: float) -> str:
    if not np.isfinite(frac) or frac <= 0:
        return "threshold unknown"
    return f"falls {_times(1 / frac)}" if frac < 1 else f"grows {_times(frac)}"


def _times(x: float) -> str:
    return f"{x:,.0f}×" if 10 <= x < 1e7 else f"{x:.3g}×"
