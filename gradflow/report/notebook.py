"""How traces, run sets and verdicts look in a Jupyter notebook (``_repr_html_``).

:func:`trace_html` (``Trace._repr_html_``) and :func:`runset_html` (``RunSet._repr_html_``, what
``gradflow.load(dir)`` shows) render a compact HTML block: the recorded states with their shapes,
the runs and their verdicts, and a small heatmap (:func:`fig_overview`, an inline PNG ``data:`` URI)
of the median gradient norm over the batch against timestep t, one row per state. Every label comes
from data, so all text is HTML-escaped, and mathtext is escaped in the figure. The full figures are
:func:`gradflow.report.figure`; a whole report is :func:`gradflow.report.build_report`.
"""

from __future__ import annotations

import base64
import functools
import html
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.ticker import MaxNLocator

from ._style import NONFINITE_COLOR, UNDERFLOW_COLOR, log10_axis, new_figure, savefig_bytes, styled
from .load import RunSet
from .sections import run_rows, verdict_table

__all__ = ["VerdictTable", "displayable", "trace_html", "runset_html", "fig_overview", "overview_png", "MAX_ROWS"]

MAX_ROWS = 24  # rows of a table or heatmap shown inline; the rest is counted
KIND_COLOR = {"vanishing": "#175cd3", "exploding": "#b42318", "nonfinite": "#b42318", "ok": "#067647"}
CAPTION = ("median over the batch of ‖dL/ds_t‖ against timestep t; grey: exactly 0 (float32 underflow or "
           "no path to the loss); red: NaN/Inf")


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def _table(columns, rows, cell_styles=None, limit: int = MAX_ROWS) -> str:
    """An HTML table of escaped text; ``cell_styles[i][j]``: extra CSS of cell (i, j) (or None)."""
    rows = list(rows)
    head = "".join(f'<th style="text-align:left;padding:1px 8px">{esc(c)}</th>' for c in columns)
    body = []
    for i, r in enumerate(rows[:limit]):
        st = cell_styles[i] if cell_styles else [""] * len(r)
        body.append("<tr>" + "".join(f'<td style="text-align:left;padding:1px 8px;{st[j] or ""}">{esc(v)}</td>'
                                     for j, v in enumerate(r)) + "</tr>")
    more = (f'<tr><td colspan="{len(columns)}">… {len(rows) - limit} more rows</td></tr>'
            if len(rows) > limit else "")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}{more}</tbody></table>"


@dataclass(frozen=True, eq=False)
class VerdictTable:
    """The verdicts of a run set, one row per run and recorded state: ``frame`` has the columns
    run, state, verdict, detail and kind (vanishing / exploding / nonfinite / ok / neutral, as the
    report colours them). Renders as a coloured table in Jupyter."""

    frame: pd.DataFrame

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        return self.frame.to_string(index=False) if len(self.frame) else "VerdictTable(no verdicts)"

    def _repr_html_(self, limit: int | None = None) -> str:
        f = self.frame
        if not len(f):
            return '<p class="gradflow-verdicts">No verdicts (no run has summary.csv rows).</p>'
        styles = [("", "", f"color:{KIND_COLOR[k]};font-weight:600" if k in KIND_COLOR else "", "")
                  for k in f["kind"]]
        rows = zip(f["run"], f["state"], f["verdict"], f["detail"])
        table = _table(("run", "state", "verdict", "detail"), rows, styles, limit=limit or len(f))
        return f'<div class="gradflow-verdicts">{table}</div>'


def displayable(fig):
    """``fig`` with a ``_repr_png_`` of its own, so a notebook shows it inline whatever the
    matplotlib backend (report figures are not pyplot figures, which only the inline backend draws)."""
    fig._repr_png_ = functools.partial(savefig_bytes, fig, "png")
    return fig


def verdicts(rs: RunSet) -> VerdictTable:
    """The verdict table of ``rs`` (from its summary.csv rows)."""
    return VerdictTable(verdict_table(rs.table("summary")))


def fig_overview(frame: pd.DataFrame, *, width: float = 5.6):
    """A small heatmap: one row per ``row`` label, columns timestep ``t``, colour ``log10`` (the
    median log10 gradient norm; one colour scale for all rows). −inf (exactly 0) is grey, rows
    flagged ``nonfinite`` at t are red, and timesteps a row does not have are left blank."""
    labels = list(dict.fromkeys(frame["row"]))
    ts = np.sort(frame["t"].unique())
    col = {t: j for j, t in enumerate(ts)}
    z = np.full((len(labels), len(ts)), np.nan)
    bad = np.zeros_like(z, dtype=bool)
    for i, (_, sub) in enumerate(frame.groupby("row", sort=False)):
        j = sub["t"].map(col).to_numpy()
        z[i, j] = sub["log10"].to_numpy(float)
        bad[i, j] = sub["nonfinite"].to_numpy(bool) | np.isnan(sub["log10"].to_numpy(float)) | np.isposinf(
            sub["log10"].to_numpy(float))
    fin = z[np.isfinite(z) & ~bad]
    vmin, vmax = (float(fin.min()), float(fin.max())) if fin.size else (-1.0, 0.0)
    if vmax - vmin < 0.1:
        vmin, vmax = (vmin + vmax) / 2 - 0.05, (vmin + vmax) / 2 + 0.05
    extent = (ts[0] - 0.5, ts[-1] + 0.5, len(labels), 0)
    with styled():
        f = new_figure(width, 0.75 + 0.2 * len(labels))
        ax = f.subplots()
        kw = dict(aspect="auto", interpolation="nearest", extent=extent)
        im = ax.imshow(np.ma.masked_where(~np.isfinite(z) | bad, z), cmap="viridis",
                       norm=Normalize(vmin, vmax), **kw)
        ax.imshow(np.ma.masked_where(~(np.isneginf(z) & ~bad), np.ones_like(z)),
                  cmap=ListedColormap([UNDERFLOW_COLOR]), **kw)
        ax.imshow(np.ma.masked_where(~bad, np.ones_like(z)), cmap=ListedColormap([NONFINITE_COLOR]), **kw)
        ax.set_yticks(np.arange(len(labels)) + 0.5, [str(s) for s in labels], fontsize=7)
        ax.grid(False)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        ax.set_xlabel("timestep t", fontsize=7.5)
        ax.tick_params(axis="x", labelsize=7)
        cb = f.colorbar(im, ax=ax, aspect=15, pad=0.01, fraction=0.06)
        cb.set_label("median ‖dL/ds_t‖", fontsize=7)
        cb.ax.tick_params(labelsize=6.5)
        log10_axis(cb.ax, "y")
    return f


def overview_png(frame: pd.DataFrame) -> str:
    """:func:`fig_overview` as an ``<img>`` with an inline PNG (``data:`` URI) and an escaped alt text."""
    f = fig_overview(frame)
    data = base64.b64encode(savefig_bytes(f, "png")).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(CAPTION)}" style="max-width:100%">'


def _pow(x: float) -> str:
    if np.isnan(x):
        return "NaN"
    if np.isneginf(x):
        return "0"
    if np.isposinf(x):
        return "inf"
    return f"{10 ** x:.3g}" if -300 < x < 300 else f"1e{x:.0f}"


def trace_frame(trace) -> pd.DataFrame:
    """Tidy overview of a trace: per key and t, the median log10 norm over the valid batch items and
    whether any of them is NaN/+inf (columns row, t, log10, nonfinite)."""
    parts = []
    for k in trace.keys():
        n = trace.norm(k).numpy()
        m = trace.mask(k).numpy().astype(bool)
        with np.errstate(divide="ignore", invalid="ignore"):
            lg = np.log10(n)
        nonfin = ((np.isnan(lg) | np.isposinf(lg)) & m).any(axis=1)
        vals = np.where(m & ~np.isnan(lg), lg, np.nan)
        vals = np.where(np.isposinf(vals), np.nan, vals)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN row: no valid batch item at t
            med = np.nanmedian(vals, axis=1) if vals.shape[1] else np.full(vals.shape[0], np.nan)
        parts.append(pd.DataFrame({"row": str(k), "t": np.arange(len(med)), "log10": med, "nonfinite": nonfin}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["row", "t", "log10", "nonfinite"])


def trace_html(trace) -> str:
    """The HTML a notebook shows for a :class:`~gradflow.trace.Trace`."""
    keys = trace.keys()
    head = f"<p><b>gradflow Trace</b> (keep={esc(repr(trace.keep))}): {len(keys)} recorded state(s)"
    meta = {k: v for k, v in trace.meta.items() if isinstance(v, (str, int, float)) and len(str(v)) <= 60}
    if meta:
        head += "; " + ", ".join(f"{esc(k)}={esc(v)}" for k, v in list(meta.items())[:6])
    head += "</p>"
    if not keys:
        return f'<div class="gradflow-trace">{head}<p>Nothing recorded yet (no backward pass).</p></div>'
    fr = trace_frame(trace)
    rows = []
    for k in keys:
        T, B = trace.shape(k)
        c = trace.cell(k)
        S = c.state_sizes.get(k.state, c.hidden_size)
        sub = fr[fr["row"] == str(k)]
        lg = sub["log10"].to_numpy(float)
        rows.append((str(k), f"{c.kind} ({c.source})", f"[{T}, {B}, {S}]", _pow(lg[0]) if T else "—",
                     _pow(lg[-1]) if T else "—", int(sub["nonfinite"].sum())))
    table = _table(("state", "cell", "shape [T, B, S]", "median ‖dL/ds_t‖ at t = 0", "at t = T−1",
                    "timesteps with NaN/Inf"), rows)
    shown = fr[fr["row"].isin([str(k) for k in keys[:MAX_ROWS]])]
    return (f'<div class="gradflow-trace">{head}{table}{overview_png(shown)}'
            f'<p style="font-size:85%">{esc(CAPTION)}</p></div>')


def gradnorms_frame(g: pd.DataFrame) -> pd.DataFrame:
    """Overview rows from a ``gradnorms`` table: each run and key at its last recorded step."""
    last = g.groupby(["run", "key"], sort=False)["step"].transform("max")
    sub = g[g["step"] == last]
    return pd.DataFrame({
        "row": [f"{r} — {k} (step {s:g})" for r, k, s in zip(sub["run"], sub["key"], sub["step"])],
        "t": sub["t"].to_numpy(), "log10": sub["q50"].to_numpy(float),
        "nonfinite": (sub["frac_nonfinite"].to_numpy(float) > 0),
    })


def runset_html(rs: RunSet) -> str:
    """The HTML a notebook shows for a :class:`RunSet` (``gradflow.load(dir)``)."""
    parts = [f"<p><b>gradflow runs</b>: {len(rs.runs)} run(s)"]
    if rs.studies:
        parts[0] += " from " + ", ".join(f"study {esc(s.name)}" for s in rs.studies)
    parts[0] += "</p>"
    for s in rs.studies:
        if s.claim:
            parts.append(f"<p><i>{esc(s.name)}</i>: {esc(s.claim)}</p>")
    meta = run_rows(rs)
    keep = [meta.columns.index(c) for c in ("run", "status", "task", "model", "clipping", "final metric")]
    parts.append(_table([meta.columns[i] for i in keep], [[r[i] for i in keep] for r in meta.rows]))
    parts.append("<p><b>Verdicts</b></p>" + verdicts(rs)._repr_html_(limit=MAX_ROWS))
    if rs.has("gradnorms"):
        fr = gradnorms_frame(rs.table("gradnorms"))
        shown = fr[fr["row"].isin(list(dict.fromkeys(fr["row"]))[:MAX_ROWS])]
        parts.append(overview_png(shown) + f'<p style="font-size:85%">At each run\'s last recorded step: '
                                           f'{esc(CAPTION)}</p>')
    tables = ", ".join(esc(n) for n in rs.tables)
    parts.append(f'<p style="font-size:85%">Tables: {tables or "none"} (<code>.table(name)</code>); figures: '
                 f'<code>gradflow.report.figure(name, dirs)</code>.</p>')
    return f'<div class="gradflow-runs">{"".join(parts)}</div>'
