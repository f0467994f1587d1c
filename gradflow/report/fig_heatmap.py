"""Heatmap of gradient norms over recorded training step × timestep, one panel per run/key.

Reads log10 norms (base 10, as in :mod:`gradflow.tables`) on colour bars labelled as powers of ten.
Exact zeros (log10 = -inf) and NaN/Inf are drawn as such, never dropped silently; where the batch
median is exactly 0 but the upper part of the batch is not, the cell shows the 95th percentile,
hatched (:func:`heatmap_layers`).
"""

from __future__ import annotations

import math
from typing import Callable

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.collections import PolyCollection
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.patches import Patch

from ..errors import GradflowError
from ._style import (
    NONFINITE_COLOR,
    PAGE_WIDTH,
    UNDERFLOW_COLOR,
    grid_shape,
    legend_below,
    log10_axis,
    new_figure,
    ordered,
    require,
    styled,
    wrap_title,
)

__all__ = ["fig_gradnorm_heatmap", "heatmap_matrix", "heatmap_layers", "step_ticks"]

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


def heatmap_layers(sub: pd.DataFrame) -> dict:
    """What each heatmap cell of one run/key shows (arrays of shape steps × t, from :func:`heatmap_matrix`).

    ``q50``: the median log10 norm; ``colour``: the value the cell is coloured by, the median where
    it is finite, else the 95th percentile (``q95``) where the median is exactly 0 (-inf) but q95 is
    finite (``upper``: most of the batch got an exactly-zero gradient, the rest did not); ``zero``:
    median and q95 exactly 0 (grey); ``nonfinite``: median NaN/+inf (red); ``partial``: finite cells
    where some batch items were non-finite (``frac_nonfinite > 0``, a red dot). ``frac_zero`` when
    the table has it (NaN otherwise). Also ``steps`` and ``t`` (row and column values).
    """
    piv = heatmap_matrix(sub)
    q50 = piv.to_numpy(dtype=float)
    q95 = heatmap_matrix(sub, "q95").to_numpy(dtype=float) if "q95" in sub.columns else np.full_like(q50, np.nan)
    nf = heatmap_matrix(sub, "frac_nonfinite").to_numpy(dtype=float)
    fz = (heatmap_matrix(sub, "frac_zero").to_numpy(dtype=float) if "frac_zero" in sub.columns
          else np.full_like(q50, np.nan))
    upper = np.isneginf(q50) & np.isfinite(q95)
    nonfinite = np.isnan(q50) | np.isposinf(q50)
    return dict(
        steps=piv.index.to_numpy(), t=piv.columns.to_numpy(dtype=float), q50=q50, q95=q95,
        colour=np.where(upper, q95, q50), upper=upper, zero=np.isneginf(q50) & ~upper, nonfinite=nonfinite,
        partial=(nf > 0) & ~nonfinite, frac_zero=fz,
    )


def step_ticks(n: int, most: int = 6) -> np.ndarray:
    """Row indices to label among ``n`` equal rows: first and last, evenly spaced when possible."""
    if n <= most:
        return np.arange(n)
    for k in range(1, n):
        if (n - 1) % k == 0 and (n - 1) // k + 1 <= most and (n - 1) // k >= 3:
            return np.arange(0, n, k)
    k = math.ceil((n - 1) / (most - 1))
    ticks = list(range(0, n, k))
    if ticks[-1] != n - 1:
        if n - 1 - ticks[-1] <= k / 2:
            ticks[-1] = n - 1
        else:
            ticks.append(n - 1)
    return np.array(ticks)


HATCH = "////"
HATCH_LABEL = "median exactly 0 (most of the batch): colour shows the 95th percentile"


def fig_gradnorm_heatmap(gradnorms: pd.DataFrame, *, target: Callable | None = None):
    """Heatmap of the median log10 ‖dL/ds_t‖ (``q50``) over recorded training step × timestep t.

    One panel per (run, key) in first-seen order, each with its own colour scale and colour bar (a
    vanishing run spans tens of decades and would flatten every other panel on a shared scale; the
    distance figure compares runs on one axis); rows are the recorded steps (equal height, labelled
    with the step number), columns the timesteps. Cell contents follow :func:`heatmap_layers`: where
    the median is exactly 0 (-inf) but the 95th percentile ``q95`` is not (most of the batch got no
    gradient at all: a saturated output, dead ReLUs), the cell is coloured by q95 on the same scale
    and hatched; where q95 is exactly 0 too (float32 underflow, or no path to the loss such as an
    LSTM cell state at the last step) it is grey; NaN/+inf cells are red, and a red dot marks finite
    cells where some batch items were non-finite (``frac_nonfinite > 0``).
    """
    require(gradnorms, "gradnorms", ("run", "key", "step", "t", "q50", "frac_nonfinite"))
    panels = ordered(zip(gradnorms["run"], gradnorms["key"]))
    rows, cols = grid_shape(len(panels), 3 if len(panels) > 4 else 2)
    cmap = mpl.colormaps[HEATMAP_CMAP]
    with styled():
        f = new_figure(PAGE_WIDTH, 0.9 + 2.3 * rows, target)
        axes = np.atleast_1d(f.subplots(rows, cols, squeeze=False)).ravel()
        title_w = f.bbox.width / f.figure.dpi / cols - 0.45
        any_under = any_nonfin = any_upper = False
        for ax, (run, key) in zip(axes, panels):
            sub = gradnorms[(gradnorms["run"] == run) & (gradnorms["key"] == key)]
            L = heatmap_layers(sub)
            z, colour = L["q50"], L["colour"]
            fin = colour[np.isfinite(colour)]
            vmin, vmax = (float(fin.min()), float(fin.max())) if fin.size else (-1.0, 0.0)
            if vmax - vmin < 0.1:
                vmin, vmax = (vmin + vmax) / 2 - 0.05, (vmin + vmax) / 2 + 0.05
            norm = Normalize(vmin=vmin, vmax=vmax)
            raster = z.size > RASTER_CELLS
            xe = _edges(L["t"])
            ye = np.arange(len(L["steps"]) + 1, dtype=float)

            def layer(values, mask, gid, **kw):
                m = ax.pcolormesh(xe, ye, np.ma.masked_where(~mask, values), rasterized=raster,
                                  **_seamless(raster), **kw)
                m.set_gid(gid)
                return m

            mesh = layer(z, np.isfinite(z), "q50", cmap=cmap, norm=norm)
            if L["upper"].any():
                any_upper = True
                layer(colour, L["upper"], "q95_median_zero", cmap=cmap, norm=norm)
                _hatch(ax, xe, L["upper"], cmap(norm(colour)))
            if L["zero"].any():
                any_under = True
                layer(np.ones_like(z), L["zero"], "underflow", cmap=ListedColormap([UNDERFLOW_COLOR]))
            if L["nonfinite"].any():
                any_nonfin = True
                layer(np.ones_like(z), L["nonfinite"], "nonfinite", cmap=ListedColormap([NONFINITE_COLOR]))
            if L["partial"].any():
                any_nonfin = True
                ii, jj = np.nonzero(L["partial"])
                xc = (xe[:-1] + xe[1:]) / 2
                pts = ax.scatter(xc[jj], ii + 0.5, s=6, color=NONFINITE_COLOR, marker="o", linewidths=0)
                pts.set_gid("partial_nonfinite")
            steps = L["steps"]
            ticks = step_ticks(len(steps))
            ax.set_yticks(ticks + 0.5, [f"{steps[i]:g}" for i in ticks])
            ax.set_ylim(0, len(steps))
            ax.set_xlim(xe[0], xe[-1])
            ax.grid(False)
            ax.set_title(wrap_title(f"{run} — {key}", title_w), loc="left")
            ax.set_xlabel("timestep t")
            ax.set_ylabel("training step")
            cb = f.colorbar(mesh, ax=ax, aspect=25, pad=0.01, fraction=0.08)
            cb.set_label("‖dL/ds_t‖ (log): median;\nhatched: 95th percentile" if L["upper"].any()
                         else "median ‖dL/ds_t‖ (log)", fontsize=7.5)
            cb.ax.tick_params(labelsize=7)
            log10_axis(cb.ax, "y")
        for ax in axes[len(panels):]:
            ax.remove()
        handles = []
        if any_upper:
            handles.append(Patch(facecolor=cmap(0.55), edgecolor="white", hatch=HATCH, linewidth=0,
                                 label=HATCH_LABEL))
        if any_under:
            handles.append(Patch(color=UNDERFLOW_COLOR,
                                 label="exactly 0 for (nearly) the whole batch (float32 underflow, no path to "
                                       "the loss, or no gradient at all)"))
        if any_nonfin:
            handles.append(Patch(color=NONFINITE_COLOR, label="NaN / Inf (dot: some of the batch)"))
        if handles:
            legend_below(f, handles, [h.get_label() for h in handles], max_cols=2)
    return f


def _hatch(ax, xe: np.ndarray, mask: np.ndarray, rgba: np.ndarray) -> None:
    """Hatch the cells in ``mask``: white lines on dark cells, dark lines on light ones."""
    lum = 0.299 * rgba[..., 0] + 0.587 * rgba[..., 1] + 0.114 * rgba[..., 2]
    for tone, sel, color in (("dark", mask & (lum < 0.5), "white"), ("light", mask & (lum >= 0.5), "0.15")):
        verts = []
        for i, row in enumerate(sel):  # one rectangle per run of adjacent cells in a row
            edges = np.flatnonzero(np.diff(np.r_[0, row.astype(np.int8), 0]))
            for j0, j1 in zip(edges[::2], edges[1::2]):
                verts.append([(xe[j0], i), (xe[j1], i), (xe[j1], i + 1), (xe[j0], i + 1)])
        if not verts:
            continue
        pc = PolyCollection(verts, facecolors="none", edgecolors="none", linewidths=0, hatch=HATCH)
        pc.set_hatchcolor(color)
        pc.set_hatch_linewidth(0.6)
        pc.set_gid(f"median_zero_hatch|{tone}")
        ax.add_collection(pc, autolim=False)


def _seamless(raster: bool) -> dict:
    """Vector quads drawn with edges in their own colour, so viewers show no hairline seams."""
    return {} if raster else {"edgecolors": "face", "linewidth": 0.2}
