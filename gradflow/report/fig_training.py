"""Figures of training dynamics: gate activations over time, and gradient clipping.

Clipping by global norm rescales every timestep's gradient by the same factor
``min(1, threshold / ‖g‖)``: it caps an explosion but cannot restore a gradient that vanished.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from ..errors import GradflowError
from ._style import (
    NONFINITE_COLOR,
    PAGE_WIDTH,
    legend_below,
    log10_axis,
    log_scale,
    new_figure,
    ordered,
    palette,
    require,
    span_decades,
    styled,
    wrap_title,
)
from .fig_jacobians import series_labels

__all__ = ["fig_gates", "fig_clipping", "gate_kind", "clip_rates", "clip_steps"]


def gate_kind(gates):
    """The cell kind whose gates are ``gates`` (a table names gates, not kinds), or None."""
    from .. import kinds

    return kinds.for_gates(gates)


def fig_gates(gates: pd.DataFrame, *, target: Callable | None = None):
    """Gate activations against timestep: one row of panels per run/key, one panel per gate.

    Line: mean over the batch (``mean``); band: ``q25..q75``. One colour per ``token_class``; the
    pooled class ``"all"`` is a thin dotted grey line when classes are present, the only (grey) line
    when the task has none.
    """
    require(gates, "gates", ("run", "key", "gate", "t", "token_class", "mean", "q25", "q75"))
    series = ordered(zip(gates["run"], gates["key"]))
    labels = series_labels(gates)
    classes = ordered(gates["token_class"])
    split = classes != ["all"]
    named = [c for c in classes if c != "all"]
    colors = dict(zip(named, sns.color_palette("colorblind", len(named))))
    colors["all"] = (0.25, 0.25, 0.25)
    ncols = max(len(ordered(gates.loc[(gates["run"] == r) & (gates["key"] == k), "gate"])) for r, k in series)
    with styled():
        f = new_figure(PAGE_WIDTH, 0.7 + 2.0 * len(series), target)
        axes = f.subplots(len(series), ncols, squeeze=False, sharex=True)
        # a title starts at its axes' left edge, right of the y tick labels (~0.45 in), and must end
        # inside the column (the last column's would otherwise run off the page)
        title_w = f.bbox.width / f.figure.dpi / ncols - 0.5
        for i, (run, key) in enumerate(series):
            s = gates[(gates["run"] == run) & (gates["key"] == key)]
            gl = ordered(s["gate"])
            kind = gate_kind(gl)
            for j in range(ncols):
                ax = axes[i, j]
                if j >= len(gl):
                    ax.remove()
                    continue
                g = gl[j]
                for cls in classes:
                    sc = s[(s["gate"] == g) & (s["token_class"] == cls)].sort_values("t")
                    if sc.empty:
                        continue
                    if sc["t"].duplicated().any():
                        raise GradflowError(f"gates: duplicate t for run {run!r} key {key!r} gate {g!r} class {cls!r}")
                    t = sc["t"].to_numpy(float)
                    pooled = split and cls == "all"  # all tokens, drawn thin under the classes
                    if not pooled:
                        ax.fill_between(t, sc["q25"].to_numpy(float), sc["q75"].to_numpy(float),
                                        color=colors[cls], alpha=0.2, linewidth=0)
                    y = sc["mean"].to_numpy(float)
                    # classes present at few timesteps (a key token at t=0) would vanish as a line
                    sparse = np.isfinite(y).sum() <= 12 or _isolated(y).any()
                    (ln,) = ax.plot(t, y, color=colors[cls], lw=0.8 if pooled else 1.3,
                                    ls=":" if pooled else "-", label=cls, marker="o" if sparse else None, ms=3)
                    ln.set_gid(f"gate|{run}|{key}|{g}|{cls}")
                q = s.loc[s["gate"] == g, "q25"].to_numpy(float)
                lo = float(np.nanmin(q)) if np.isfinite(q).any() else 0.0
                ax.set_ylim(-1.05 if lo < -0.02 else -0.02, 1.02)
                label = kind.gate_label(g) if kind else f"gate {g}"
                ax.set_title(wrap_title(f"{labels[(run, key)]}: {label}", title_w, 8.5, sep=": "), loc="left",
                             fontsize=8.5)
                ax.set_xlabel("timestep t")
                if j == 0:
                    ax.set_ylabel("activation")
                ax.tick_params(labelbottom=True)
        if split:
            order = named + (["all"] if "all" in classes else [])
            hs = [Line2D([], [], color=colors[c], lw=0.8 if c == "all" else 1.3, ls=":" if c == "all" else "-")
                  for c in order]
            labels_ = [f"{c} (all tokens)" if c == "all" else c for c in order]
            legend_below(f, hs, labels_, max_cols=5, title="token class (line: mean over batch, band: 25–75%)")
        else:
            legend_below(f, [Line2D([], [], color=colors["all"], lw=1.3)], ["mean over batch (band: 25–75%)"])
    return f


def _isolated(y: np.ndarray) -> np.ndarray:
    """Finite points whose neighbours are both missing (they draw no line segment)."""
    f = np.isfinite(y)
    left = np.r_[False, f[:-1]]
    right = np.r_[f[1:], False]
    return f & ~left & ~right


def clip_rates(metrics: pd.DataFrame) -> pd.Series:
    """Fraction of training steps on which clipping fired, per run (first-seen order)."""
    runs = ordered(metrics["run"])
    return metrics.groupby("run", sort=False)["clipped"].mean().astype(float).reindex(runs)


def fig_clipping(metrics: pd.DataFrame | None = None, clip_timesteps: pd.DataFrame | None = None, *,
                 clip_text: Mapping[str, str] | None = None, diverged_at: Mapping[str, int] | None = None,
                 target: Callable | None = None):
    """Training loss, global gradient norm before/after clipping, clipping rate, per-timestep norms.

    From ``metrics``: (a) loss per step, one line per run (log y when it spans > 1 decade, exact
    zeros then as triangles at the bottom edge); a red cross at a run's ``diverged_at`` step and red
    ticks at the top where the loss is NaN/Inf; (b) ``grad_norm_before`` (solid) and
    ``grad_norm_after`` (dashed), log y; (c) fraction of steps with ``clipped`` true, per run. From
    ``clip_timesteps``: (d) log10 norm of the per-timestep gradient before (solid) and after (dashed)
    clipping at one recorded step per run (:func:`clip_steps`, named in the legend).
    ``clip_text`` maps run -> e.g. "clip norm ≤ 1" for the legend.
    """
    metrics = metrics if metrics is not None and len(metrics) else None
    ct = clip_timesteps if clip_timesteps is not None and len(clip_timesteps) else None
    if metrics is None and ct is None:
        raise GradflowError("clipping: no rows to plot (need metrics and/or clip_timesteps)")
    if metrics is not None:
        require(metrics, "metrics", ("run", "step", "loss", "grad_norm_before", "grad_norm_after", "clipped"))
    if ct is not None:
        require(ct, "clip_timesteps", ("run", "step", "key", "t", "when", "log10_norm"))
        bad = sorted(set(ct["when"]) - {"before", "after"})
        if bad:
            raise GradflowError(f"clip_timesteps: column 'when' must be 'before' or 'after', not {bad[0]!r}")
    clip_text = clip_text or {}
    diverged_at = diverged_at or {}
    runs = ordered(list(metrics["run"] if metrics is not None else []) + list(ct["run"] if ct is not None else []))
    colors = palette(runs)
    with styled():
        if metrics is not None:
            rate_h = 0.8 + 0.3 * len(runs)
            bottom_h = 2.8 if ct is not None else rate_h
            f = new_figure(PAGE_WIDTH, 0.9 + 2.8 + bottom_h, target)
            gs = f.add_gridspec(2, 2, height_ratios=[2.8, bottom_h])
            _loss(f.add_subplot(gs[0, 0]), metrics, runs, colors, diverged_at)
            _norms(f.add_subplot(gs[0, 1]), metrics, runs, colors)
            _rates(f.add_subplot(gs[1, 0] if ct is not None else gs[1, :]), metrics, colors)
            if ct is not None:
                _timesteps(f.add_subplot(gs[1, 1]), ct, colors)
        else:
            f = new_figure(PAGE_WIDTH, 0.9 + 3.2, target)
            _timesteps(f.add_subplot(), ct, colors)
        shown = clip_steps(ct) if ct is not None else {}
        hs = [Line2D([], [], color=colors[r], lw=1.6) for r in runs]
        ls = []
        for r in runs:
            bits = [clip_text[r]] if r in clip_text else []
            if r in shown and len(set(shown.values())) > 1:
                bits.append(f"(d) at step {shown[r]:g}")
            ls.append(f"{r} ({'; '.join(bits)})" if bits else r)
        hs += [Line2D([], [], color="0.3", lw=1.4), Line2D([], [], color="0.3", ls="--", lw=1.4)]
        ls += ["before clipping", "after clipping"]
        if diverged_at:
            hs.append(Line2D([], [], color=NONFINITE_COLOR, marker="x", ls=""))
            ls.append("diverged (red ticks at the top: loss or norm NaN/Inf)")
        if f.findobj(lambda a: (a.get_gid() or "").split("|")[0] in ("loss_zero", "norm_zero")):
            hs.append(Line2D([], [], color="0.3", marker="v", ls=""))
            ls.append("exactly 0 (no place on a log axis)")
        legend_below(f, hs, ls, max_cols=3)
    return f


def clip_steps(ct: pd.DataFrame) -> dict[str, float]:
    """run -> the recorded step panel (d) shows: the one where clipping shrank the per-timestep norms
    most, or, where clipping never changed them, the last step with a finite norm."""
    out = {}
    for run, s in ct.groupby("run", sort=False):
        piv = s.pivot_table(index=["step", "key", "t"], columns="when", values="log10_norm", aggfunc="first")
        steps = ordered(s["step"])
        best = None
        if {"before", "after"} <= set(piv.columns):
            d = (piv["before"] - piv["after"]).replace([np.inf, -np.inf], np.nan)
            g = d.groupby(level="step").max()
            g = g[g > 1e-9]
            if len(g):
                best = g.idxmax()
        if best is None:
            fin = s.loc[np.isfinite(s["log10_norm"].to_numpy(float)), "step"]
            best = ordered(fin)[-1] if len(fin) else steps[-1]
        out[run] = best
    return out


def _loss(ax, m, runs, colors, diverged_at):
    for r in runs:
        s = m[m["run"] == r].sort_values("step")
        if s.empty:
            continue
        x, y = s["step"].to_numpy(float), s["loss"].to_numpy(float)
        (ln,) = ax.plot(x, y, color=colors[r], lw=1.3)
        ln.set_gid(f"loss|{r}")
        bad = ~np.isfinite(y)
        if bad.any():
            mk = ax.scatter(x[bad], np.full(bad.sum(), 0.98), marker="|", color=NONFINITE_COLOR, s=20,
                            transform=ax.get_xaxis_transform(), clip_on=False)
            mk.set_gid(f"loss_nonfinite|{r}")
        if r in diverged_at:
            ok = np.isfinite(y) & (x <= diverged_at[r])
            yv = y[ok][-1] if ok.any() else np.nan
            mk = ax.plot([diverged_at[r]], [yv], marker="x", ms=8, mew=2, color=NONFINITE_COLOR, ls="")[0]
            mk.set_gid(f"diverged|{r}")
    y = m["loss"].to_numpy(float)
    logy = span_decades(y) > 1
    if logy:
        log_scale(ax, "y")
        _zero_ticks(ax, m, "loss", runs, colors, "loss_zero")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss" + (" (log scale)" if logy else ""))
    ax.set_title("(a) loss", loc="left")


def _norms(ax, m, runs, colors):
    for r in runs:
        s = m[m["run"] == r].sort_values("step")
        x = s["step"].to_numpy(float)
        for col, ls in (("grad_norm_before", "-"), ("grad_norm_after", "--")):
            y = s[col].to_numpy(float)
            (ln,) = ax.plot(x, y, color=colors[r], ls=ls, lw=1.2)
            ln.set_gid(f"{col}|{r}")
            bad = ~np.isfinite(y)
            if col == "grad_norm_before" and bad.any():
                mk = ax.scatter(x[bad], np.full(bad.sum(), 0.98), marker="|", color=NONFINITE_COLOR, s=20,
                                transform=ax.get_xaxis_transform(), clip_on=False)
                mk.set_gid(f"norm_nonfinite|{r}")
    v = m[["grad_norm_before", "grad_norm_after"]].to_numpy(float)
    if (v[np.isfinite(v)] > 0).any():
        log_scale(ax, "y")
        _zero_ticks(ax, m, "grad_norm_before", runs, colors, "norm_zero")
    ax.set_xlabel("training step")
    ax.set_ylabel("global gradient norm ‖g‖ (log scale)")
    ax.set_title("(b) global norm before / after clipping", loc="left")


def _zero_ticks(ax, m, col, runs, colors, gid):
    """Triangles at the bottom edge of a log axis at the steps where ``col`` is exactly 0."""
    for r in runs:
        s = m[m["run"] == r].sort_values("step")
        zero = s[col].to_numpy(float) == 0
        if zero.any():
            pts = ax.scatter(s["step"].to_numpy(float)[zero], np.full(zero.sum(), 0.02), marker="v", s=12,
                             color=colors[r], transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
            pts.set_gid(f"{gid}|{r}")


def _rates(ax, m, colors):
    rates = clip_rates(m)
    y = np.arange(len(rates))
    bars = ax.barh(y, rates.to_numpy(float) * 100, color=[colors[r] for r in rates.index], height=0.6)
    for b, r in zip(bars, rates.index):
        b.set_gid(f"clip_rate|{r}")
    for yi, v in zip(y, rates.to_numpy(float)):
        ax.text(v * 100 + 1.5, yi, f"{v:.0%}", va="center", fontsize=8)
    ax.set_yticks(y, list(rates.index))
    ax.invert_yaxis()
    ax.set_xlim(0, 112)
    ax.set_xlabel("steps on which clipping fired (%)")
    ax.set_title("(c) how often clipping fired", loc="left")
    ax.grid(axis="y", visible=False)


def _timesteps(ax, ct, colors):
    shown = clip_steps(ct)
    for (r, key, step), s in ct.groupby(["run", "key", "step"], sort=False):
        if step != shown[r]:
            continue
        for when, ls in (("before", "-"), ("after", "--")):
            sw = s[s["when"] == when].sort_values("t")
            if sw.empty:
                continue
            (ln,) = ax.plot(sw["t"].to_numpy(float), sw["log10_norm"].to_numpy(float), color=colors[r], ls=ls,
                            lw=1.2)
            ln.set_gid(f"clip_t|{r}|{key}|{step}|{when}")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("per-timestep gradient norm (log scale)")
    log10_axis(ax, "y")
    steps = ordered(shown.values())
    where = f"at step {steps[0]:g}" if len(steps) == 1 else "(step: see legend)"
    ax.set_title(f"(d) per-timestep norm {where}", loc="left")
