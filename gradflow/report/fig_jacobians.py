"""Figures of the recurrent Jacobians: per-step singular values, products over distance, Lyapunov.

Per-step Jacobian ``J_t = ∂s_t/∂s_{t-1}``; a singular value σ > 1 stretches a gradient along its
direction, σ < 1 shrinks it. Products ``∂s_{t0+k}/∂s_{t0}`` show what k steps do together; the
Lyapunov exponents are their asymptotic growth rates per step (natural log).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.lines import Line2D

from ..errors import GradflowError
from ._style import (
    NONFINITE_COLOR,
    PAGE_WIDTH,
    grid_shape,
    MATH,
    legend_below,
    log10_axis,
    log_scale,
    new_figure,
    ordered,
    palette,
    pow10_text,
    require,
    series_label,
    span_decades,
    styled,
    wrap_title,
)

__all__ = ["fig_spectra", "fig_products", "series_labels", "lyapunov_ylim", "nonfinite_lyapunov"]


def series_labels(df: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(run, key) -> legend label: the run alone when it has a single key in ``df``."""
    out = {}
    for run in ordered(df["run"]):
        keys = ordered(df.loc[df["run"] == run, "key"])
        for key in keys:
            out[(run, key)] = series_label(run, key, keys)
    return out


def fig_spectra(spectra: pd.DataFrame | None = None, spectra_summary: pd.DataFrame | None = None, *,
                target: Callable | None = None):
    """Singular values of the per-step Jacobians.

    Top (from ``spectra``): distribution of σ pooled over t, batch and rank, one step-histogram per
    run/key on a log σ axis (bins equal in log σ; heights are the fraction of that series' values),
    dashed line at σ = 1. σ = 0 exactly cannot sit on a log axis: their count is written in the
    legend. Bottom (from ``spectra_summary``): σ_max and spectral radius ρ per timestep (batch means),
    reference at 1; log y axis when the values (and 1) span more than a decade, exact zeros then
    drawn as triangles at the bottom edge. The legend under the figure wraps to fit its width.
    """
    spectra = spectra if spectra is not None and len(spectra) else None
    summ = spectra_summary if spectra_summary is not None and len(spectra_summary) else None
    if spectra is None and summ is None:
        raise GradflowError("spectra: no rows to plot (need spectra and/or spectra_summary)")
    if spectra is not None:
        require(spectra, "spectra", ("run", "key", "sigma"))
    if summ is not None:
        require(summ, "spectra_summary", ("run", "key", "t", "sigma_max", "spectral_radius"))
    frames = [x for x in (spectra, summ) if x is not None]
    both = pd.concat([x[["run", "key"]] for x in frames], ignore_index=True)
    labels = series_labels(both)
    colors = palette(list(labels.values()))
    with styled():
        h = (3.1 if spectra is not None else 0) + (2.7 if summ is not None else 0) + 0.8
        f = new_figure(PAGE_WIDTH, h, target)
        n_rows = (spectra is not None) + (summ is not None)
        gs = f.add_gridspec(n_rows, 2, height_ratios=[1.15, 1][:n_rows] if n_rows == 2 else [1])
        r = 0
        notes: dict[str, str] = {}
        any_zero = False
        if spectra is not None:
            ax = f.add_subplot(gs[r, :])
            r += 1
            notes = _sigma_hist(ax, spectra, labels, colors)
        if summ is not None:
            has_rho = bool(np.isfinite(summ["spectral_radius"].to_numpy(float)).any())
            ax1 = f.add_subplot(gs[r, 0] if has_rho else gs[r, :])
            ax2 = f.add_subplot(gs[r, 1], sharey=ax1) if has_rho else None
            vals = summ[["sigma_max", "spectral_radius"]].to_numpy(float)
            logy = span_decades(np.r_[vals.ravel(), 1.0]) > 1
            for ax, col, name, sym in ((ax1, "sigma_max", r"largest singular value $\sigma_{max}$", r"$\sigma_{max}$"),
                                       (ax2, "spectral_radius", r"spectral radius $\rho$ (max |eigenvalue|)", r"$\rho$")):
                if ax is None:
                    continue
                for (run, key), lab in labels.items():
                    s = summ[(summ["run"] == run) & (summ["key"] == key)].sort_values("t")
                    if s.empty:
                        continue
                    t, y = s["t"].to_numpy(float), s[col].to_numpy(float)
                    (ln,) = ax.plot(t, y, color=colors[lab], lw=1.4, label=lab)
                    ln.set_gid(f"{col}|{run}|{key}")
                    zero = y == 0
                    if logy and zero.any():  # exact zeros have no place on a log axis: ticks at the bottom
                        any_zero = True
                        pts = ax.scatter(t[zero], np.full(zero.sum(), 0.02), marker="v", s=14, color=colors[lab],
                                         transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
                        pts.set_gid(f"{col}_zero|{run}|{key}")
                ax.axhline(1.0, color="black", ls="--", lw=0.9)
                ax.set_xlabel("timestep t")
                ax.set_ylabel(f"{sym} (mean over sequences analysed{', log scale' if logy else ''})", **MATH)
                ax.set_title(name + r" of $\partial s_t/\partial s_{t-1}$", loc="left", **MATH)
            if logy:
                log_scale(ax1, "y")
            if ax2 is not None:
                ax2.tick_params(labelleft=True)
        hs = [Line2D([], [], color=colors[lab], lw=1.4) for lab in labels.values()]
        ls = [f"{lab} ({notes[lab]})" if lab in notes else lab for lab in labels.values()]
        hs.append(Line2D([], [], color="black", ls="--", lw=0.9))
        ls.append("σ = 1 (neither grows nor shrinks)")
        if any_zero:
            hs.append(Line2D([], [], color="0.3", marker="v", ls=""))
            ls.append("exactly 0 at that t (the Jacobian is zero: no gradient passes)")
        legend_below(f, hs, ls, max_cols=3)
    return f


def _sigma_hist(ax, spectra: pd.DataFrame, labels, colors) -> dict[str, str]:
    """Draw the histograms; return label -> "x% > 1[; n σ = 0 not shown]" for the legend."""
    sig = spectra["sigma"].to_numpy(float)
    pos = sig[np.isfinite(sig) & (sig > 0)]
    if pos.size == 0:
        raise GradflowError("spectra: no positive finite singular value to plot")
    lo, hi = np.log10(pos.min()), np.log10(pos.max())
    if hi - lo < 0.2:
        lo, hi = lo - 0.1, hi + 0.1
    bins = np.linspace(lo, hi, 41)
    notes = {}
    for (run, key), lab in labels.items():
        s = spectra[(spectra["run"] == run) & (spectra["key"] == key)]
        if s.empty:
            continue
        v = s["sigma"].to_numpy(float)
        ok = np.isfinite(v) & (v > 0)
        sns.histplot(x=v[ok], bins=bins, log_scale=True, stat="probability", element="step", fill=False,
                     color=colors[lab], ax=ax, linewidth=1.4)
        ax.get_lines()[-1].set_gid(f"hist|{run}|{key}")
        extra = []
        if (~ok).sum():
            nz, nn = int((v == 0).sum()), int((~np.isfinite(v)).sum())
            if nz:
                extra.append(f"{nz:,} σ = 0 not shown")
            if nn:
                extra.append(f"{nn:,} non-finite")
        gt1 = float((v[np.isfinite(v)] > 1).mean()) if np.isfinite(v).any() else float("nan")
        notes[lab] = f"{gt1:.0%} of σ > 1" + ("; " + "; ".join(extra) if extra else "")
    ref = ax.axvline(1.0, color="black", ls="--", lw=0.9)
    ref.set_gid("sigma=1")
    ax.set_xlabel(r"singular value $\sigma$ of $\partial s_t/\partial s_{t-1}$ (log scale)", **MATH)
    log_scale(ax, "x")
    ax.set_ylabel("fraction of values per bin")
    # pooled over what spectra.csv holds: every step and rank on the dense route, the top k at the
    # distribution steps on the matrix-free one (the plan beside the figure says which)
    ax.set_title("distribution of per-step Jacobian singular values (steps and ranks per the analysis plan)",
                 loc="left")
    return notes



def product_ylim(products: pd.DataFrame) -> tuple[float, float, float]:
    """y range (log10) for the product panels: every point of the three largest singular values of
    every panel is shown with 10 % margin (at least 3 decades below them); smaller ones may run off
    the bottom (the panel then says how far). Returns (low, high, lowest finite value)."""
    v = products["log10_sigma"].to_numpy(float)
    fin = np.isfinite(v)
    if not fin.any():
        return -1.0, 1.0, float("nan")
    lowest, highest = float(v[fin].min()), float(v[fin].max())
    top = products.groupby(["run", "key"], sort=False)["rank"].transform(lambda r: r.rank(method="dense"))
    tv = v[(top.to_numpy() <= 3) & fin]
    lo_top = float(tv.min()) if tv.size else lowest
    span = max(highest, 0.0) - lo_top
    lo = max(lowest, lo_top - max(3.0, 0.1 * span))
    hi = max(highest, 0.0) + max(0.5, 0.05 * (max(highest, 0.0) - lo))
    return lo, hi, lowest


def fig_products(products: pd.DataFrame | None = None, lyapunov: pd.DataFrame | None = None, *,
                 target: Callable | None = None):
    """Singular values of Jacobian products against distance, and the Lyapunov spectrum.

    Top (from ``products``): one panel per run/key, one line per rank i of ``log10 σ_i`` of
    ``∂s_{t0+k}/∂s_{t0}`` against k (colour = rank, shared colour bar), dashed line at σ = 1. The
    shared y axis is fitted to the three largest σ_i of every panel (what a gradient can keep);
    smaller ones may run off the bottom, and the panel then says down to which power of ten.
    Bottom (from ``lyapunov``): exponent λ_i (ln per step) against rank with ± stderr bars, one
    line per run/key, dashed line at 0; −∞ exponents (a direction mapped exactly to 0) as triangles at
    the bottom edge; the y range is fitted to the largest exponents (:func:`lyapunov_ylim`) and the
    panel says how far smaller ones go and which run/key has no finite exponent at all.
    """
    products = products if products is not None and len(products) else None
    lyapunov = lyapunov if lyapunov is not None and len(lyapunov) else None
    if products is None and lyapunov is None:
        raise GradflowError("products: no rows to plot (need products and/or lyapunov)")
    if products is not None:
        require(products, "products", ("run", "key", "distance", "rank", "log10_sigma"))
    if lyapunov is not None:
        require(lyapunov, "lyapunov", ("run", "key", "rank", "exponent", "stderr"))
    with styled():
        panels = ordered(zip(products["run"], products["key"])) if products is not None else []
        rows, cols = grid_shape(len(panels), 3) if panels else (0, 0)
        h_top = 0.6 + 2.2 * rows if panels else 0
        h_bot = 3.4 if lyapunov is not None else 0
        f = new_figure(PAGE_WIDTH, h_top + h_bot + 0.3, target)
        if panels and lyapunov is not None:
            top, bot = f.subfigures(2, 1, height_ratios=[h_top, h_bot])
        else:
            top = bot = f
        if panels:
            ranks = np.sort(products["rank"].unique())
            norm = Normalize(vmin=float(ranks.min()), vmax=float(max(ranks.max(), ranks.min() + 1)))
            cmap = sns.color_palette("viridis", as_cmap=True)
            axes = np.atleast_1d(top.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)).ravel()
            ylo, yhi, floor = product_ylim(products)
            for ax, (run, key) in zip(axes, panels):
                s = products[(products["run"] == run) & (products["key"] == key)]
                for rank in ordered(np.sort(s["rank"].unique())):
                    sr = s[s["rank"] == rank].sort_values("distance")
                    (ln,) = ax.plot(sr["distance"].to_numpy(float), sr["log10_sigma"].to_numpy(float),
                                    color=cmap(norm(rank)), lw=1.0)
                    ln.set_gid(f"product|{run}|{key}|{rank}")
                ax.axhline(0.0, color="black", ls="--", lw=0.9)
                fin = s["log10_sigma"].to_numpy(float)
                fin = fin[np.isfinite(fin)]
                smin = float(fin.min()) if fin.size else float("nan")
                if not fin.size:
                    ax.text(0.5, 0.5, "no finite value (all σ exactly 0 or NaN)", transform=ax.transAxes,
                            ha="center", va="center", fontsize=7.5, color=NONFINITE_COLOR)
                elif smin < ylo:
                    ax.text(0.03, 0.03, f"smaller σ continue down to {pow10_text(math.floor(smin))}",
                            transform=ax.transAxes, fontsize=6.5, color="0.2", va="bottom",
                            bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=1.5))
                title_w = (top.bbox.width / top.figure.dpi - 0.8) / cols - 0.5  # less the colour bar, y ticks
                ax.set_title(wrap_title(f"{run} — {key}", title_w), loc="left")
                ax.set_xlabel("distance k (steps)")
                if ax.get_subplotspec().is_first_col():
                    ax.set_ylabel(r"$\sigma_i$ of $\partial s_{t_0+k}/\partial s_{t_0}$", **MATH)
                ax.tick_params(labelleft=True, labelbottom=True)
                log10_axis(ax, "y")
            axes[0].set_ylim(ylo, yhi)
            for ax in axes[len(panels):]:
                ax.remove()
            cb = top.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[: len(panels)]), shrink=0.9,
                              aspect=25, pad=0.02)
            cb.set_label("rank i (0 = largest)" if ranks.min() == 0 else "rank i (1 = largest)")
            cb.ax.yaxis.get_major_locator().set_params(integer=True)
            top.suptitle("singular values of Jacobian products over k steps (dashed: σ = 1)", x=0.03,
                         ha="left", fontsize=9.5)
        if lyapunov is not None:
            _lyapunov(bot.subplots(), bot, lyapunov)
    return f


def lyapunov_ylim(lyapunov: pd.DataFrame) -> tuple[float, float, float]:
    """y range of the Lyapunov panel: the three largest finite exponents of every run/key and 0 are
    shown with room below (at least 1, or twice their spread); smaller exponents (dead or strongly
    contracting directions, down to tens below 0) may run off the bottom, and the panel then says
    how far. Returns (low, high, lowest finite exponent)."""
    e = lyapunov["exponent"].to_numpy(float)
    fin = np.isfinite(e)
    if not fin.any():
        return -1.0, 1.0, float("nan")
    lowest, highest = float(e[fin].min()), max(float(e[fin].max()), 0.0)
    sub = lyapunov[fin]
    top = sub.groupby(["run", "key"], sort=False)["exponent"].rank(method="first", ascending=False)
    lo_top = float(sub["exponent"].to_numpy(float)[top.to_numpy() <= 3].min())
    lo = max(lowest, lo_top - max(1.0, 2 * (highest - lo_top)))
    pad = 0.06 * max(highest - lo, 0.1)
    return lo - pad, highest + pad, lowest


def nonfinite_lyapunov(lyapunov: pd.DataFrame) -> dict[tuple[str, str], str]:
    """(run, key) -> what is not finite among its exponents, e.g. "all −∞" or "3 of 32 −∞; 1 NaN"."""
    out = {}
    for (run, key), s in lyapunov.groupby(["run", "key"], sort=False):
        e = s["exponent"].to_numpy(float)
        n, ninf, nan, pinf = len(e), int(np.isneginf(e).sum()), int(np.isnan(e).sum()), int(np.isposinf(e).sum())
        parts = []
        for k, what in ((ninf, "−∞"), (nan, "NaN"), (pinf, "+∞")):
            if k:
                parts.append(f"all {what}" if k == n else f"{k} of {n} {what}")
        if parts:
            out[(run, key)] = "; ".join(parts)
    return out


def _lyapunov(ax, fig, lyapunov: pd.DataFrame) -> None:
    """Exponents against rank with ± stderr; −∞ as triangles at the bottom edge (a direction mapped
    exactly to 0), y range from :func:`lyapunov_ylim`, legend under the panel."""
    labels = series_labels(lyapunov)
    colors = palette(list(labels.values()))
    bad = nonfinite_lyapunov(lyapunov)
    ylo, yhi, lowest = lyapunov_ylim(lyapunov)
    hs, ls, any_neginf, undrawn = [], [], False, []
    for (run, key), lab in labels.items():
        s = lyapunov[(lyapunov["run"] == run) & (lyapunov["key"] == key)].sort_values("rank")
        x, e = s["rank"].to_numpy(float), s["exponent"].to_numpy(float)
        eb = ax.errorbar(x, e, yerr=s["stderr"].to_numpy(float), color=colors[lab], marker="o", ms=3, lw=1.2,
                         capsize=2)
        eb.lines[0].set_gid(f"lyapunov|{run}|{key}")
        ninf = np.isneginf(e)
        if ninf.any():
            any_neginf = True
            pts = ax.scatter(x[ninf], np.full(ninf.sum(), 0.03), marker="v", s=16, color=colors[lab],
                             transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
            pts.set_gid(f"lyapunov_neginf|{run}|{key}")
        elif not np.isfinite(e).any():
            undrawn.append(f"{lab} ({bad[(run, key)]})")
        hs.append(Line2D([], [], color=colors[lab], marker="o", ms=3, lw=1.2))
        ls.append(f"{lab} ({bad[(run, key)]})" if (run, key) in bad else lab)
    ax.axhline(0.0, color="black", ls="--", lw=0.9)
    hs.append(Line2D([], [], color="black", ls="--", lw=0.9))
    ls.append("0 (neither grows nor shrinks)")
    if any_neginf:
        hs.append(Line2D([], [], color="0.3", marker="v", ls=""))
        ls.append("−∞ (a direction mapped exactly to 0)")
    ax.set_ylim(ylo, yhi)
    notes = []
    if np.isfinite(lowest) and lowest < ylo:
        notes.append(f"smaller exponents continue down to {lowest:.3g}")
    if undrawn:
        notes.append("not drawn (no finite exponent): " + ", ".join(undrawn))
    if notes:
        ax.text(0.99, 0.04, "\n".join(notes), transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
                color="0.2", bbox=dict(facecolor="white", edgecolor="none", alpha=0.85, pad=1.5))
    ax.set_xlabel("index i (exponents sorted, largest first)")
    ax.set_ylabel(r"$\lambda_i$ (ln per step)", **MATH)
    ax.set_title("Lyapunov spectrum (mean over sequences analysed ± standard error)", loc="left")
    ax.xaxis.get_major_locator().set_params(integer=True)
    legend_below(fig, hs, ls, max_cols=3, fontsize=7.5)
