"""Shared plotting plumbing: figures on the Agg canvas, the report theme, log10 axes, colours.

Figures are created as ``matplotlib.figure.Figure`` objects with an Agg canvas attached, never
through ``pyplot``: the process-wide backend is neither chosen nor changed, no figure is registered
with pyplot's manager (nothing to close, nothing leaks), and a user's interactive session is left
as it was. Styling is applied with ``rc_context`` around drawing and saving only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from typing import Iterable, Mapping, Sequence

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure, SubFigure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextToPath
from matplotlib.ticker import FuncFormatter, Locator, MaxNLocator, NullLocator

from ..errors import GradflowError

PAGE_WIDTH = 8.0  # inches: fits A4 / Letter with margins
FLOAT32_SUBNORMAL_LOG10 = math.log10(float(np.finfo(np.float32).smallest_subnormal))  # ~1.4e-45
UNDERFLOW_COLOR = "#bdbdbd"
NONFINITE_COLOR = "#d62728"


def theme() -> dict:
    """The rc parameters every report figure is drawn with (seaborn 'whitegrid', paper sizes)."""
    rc = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("paper", font_scale=1.05))
    rc.update(
        {
            "axes.titlesize": 9.5,
            "axes.labelsize": 9,
            "legend.fontsize": 8,
            "legend.title_fontsize": 8,
            "xtick.labelsize": 8,
            "ytick.labelsize": 8,
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "svg.fonttype": "path",
            "pdf.fonttype": 42,
            "axes.prop_cycle": mpl.cycler(color=sns.color_palette("colorblind")),
            # labels are data: a run label, module name or token class holding "$...$" is drawn as
            # written, never parsed as mathtext; gradflow's own math labels opt in (MATH)
            "text.parse_math": False,
        }
    )
    return rc


# keyword arguments for the few texts gradflow writes as mathtext itself (fixed axis labels, never data)
MATH = {"parse_math": True}


@contextlib.contextmanager
def styled():
    with mpl.rc_context(theme()):
        yield


def new_figure(width: float, height: float, target=None):
    """A fresh constrained-layout Figure of ``width × height`` inches on the Agg canvas.

    ``target`` lets a caller supply the drawing surface instead: a callable ``(width, height) ->
    Figure | SubFigure`` (the PDF writer uses it to put a figure under a page header), or a Figure /
    SubFigure used as is.
    """
    if callable(target):
        return target(width, height)
    if target is not None:
        return target
    f = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(f)
    return f


def grid_shape(n: int, max_cols: int = 3) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


class Log10Locator(Locator):
    """Ticks for an axis holding log10 values: at integers (powers of ten) over wide ranges, at
    log10 of 1-2-5 multiples when the view spans less than about three decades."""

    def __call__(self):
        lo, hi = self.axis.get_view_interval()
        return self.tick_values(lo, hi)

    def tick_values(self, vmin, vmax):
        lo, hi = sorted((float(vmin), float(vmax)))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return np.array([])
        if hi - lo >= 2.5:
            return MaxNLocator(nbins=7, integer=True, steps=[1, 2, 5, 10]).tick_values(lo, hi)
        ticks = []
        for k in range(math.floor(lo) - 1, math.ceil(hi) + 1):
            for m in ((1, 2, 5) if hi - lo >= 0.7 else (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9)):
                v = k + math.log10(m)
                if lo - 1e-9 <= v <= hi + 1e-9:
                    ticks.append(v)
        return np.array(ticks)


def log10_axis(ax, which: str = "y") -> None:
    """An axis whose data are log10 values, ticked and labelled as the values themselves."""
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_locator(Log10Locator())
    axis.set_major_formatter(FuncFormatter(_pow10))
    axis.set_minor_locator(NullLocator())


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def pow10_text(k: int) -> str:
    """``10ᵏ`` with Unicode superscripts (plain text: no mathtext parsing, same look in SVG/PDF)."""
    return "10" + str(int(k)).translate(_SUPERSCRIPT)


def _pow10(v, _pos=None) -> str:
    """Label for a tick at log10 value ``v``."""
    if not math.isfinite(v):
        return ""
    k = int(round(v))
    if abs(v - k) > 1e-6:
        return f"{float(f'{10 ** v:.2g}'):g}"
    if -2 <= k <= 3:
        return f"{10 ** k:g}"
    return pow10_text(k)


def _value_label(x, _pos=None) -> str:
    """Label for a tick at value ``x`` on a log-scaled axis."""
    if not (math.isfinite(x) and x > 0):
        return ""
    return _pow10(math.log10(x))


def log_scale(ax, which: str = "y") -> None:
    """Log-scale an axis of positive values; ticks labelled 0.5, 1, 10, 10⁴ ... without mathtext.

    Minor ticks get labels only when the view spans less than two decades (otherwise they crowd): at
    2, 3 and 5 × 10ᵏ, and every one of them when the view spans less than half a decade (where those
    may all lie outside it, e.g. values 0.6–1.1)."""
    (ax.set_yscale if which == "y" else ax.set_xscale)("log")
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_formatter(FuncFormatter(_value_label))

    def minor(x, _pos=None):
        lo, hi = sorted(axis.get_view_interval())
        if not (lo > 0 and math.log10(hi / lo) < 2 and x > 0):
            return ""
        m = round(x / 10 ** math.floor(math.log10(x)), 6)
        return f"{x:g}" if m in (2, 3, 5) or math.log10(hi / lo) < 0.5 else ""

    axis.set_minor_formatter(FuncFormatter(minor))


# seaborn "colorblind" reordered: its vermillion (index 3) comes late, since next to the orange it is
# hard to tell apart and it resembles the red that marks NaN/Inf; brown (5), close to orange, too
_RUN_ORDER = (0, 1, 2, 4, 9, 7, 5, 3, 6, 8)


def palette(labels: Sequence[str]) -> dict[str, tuple]:
    """One colour per label, stable in the order given (colour-blind safe for up to 10)."""
    labels = list(dict.fromkeys(labels))
    if len(labels) <= 10:
        cb = sns.color_palette("colorblind", 10)
        base = [cb[i] for i in _RUN_ORDER]
    else:
        base = sns.color_palette("husl", len(labels))
    return {lab: base[i] for i, lab in enumerate(labels)}


def series_label(run: str, key: str, keys_of_run: Sequence[str]) -> str:
    """``run`` when the run has one key in the table, else ``run · key``."""
    return run if len(set(keys_of_run)) <= 1 else f"{run} · {key}"


def require(df, name: str, columns: Sequence[str] = ()) -> None:
    if df is None or len(df) == 0:
        raise GradflowError(f"{name}: no rows to plot")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise GradflowError(f"{name}: missing column(s) {', '.join(missing)}")


def ordered(values) -> list:
    """Unique values in first-seen order."""
    return list(dict.fromkeys(values))


def savefig_bytes(fig: Figure, fmt: str) -> bytes:
    buf = io.BytesIO()
    with styled():
        fig.savefig(buf, format=fmt, metadata=_metadata(fmt))
    return buf.getvalue()


def _metadata(fmt: str):
    if fmt == "svg":
        return {"Date": None}
    if fmt == "pdf":
        return {"CreationDate": None}
    if fmt == "png":
        return {"Software": None}
    return None


def span_decades(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    if v.size == 0:
        return 0.0
    return float(np.log10(v.max() / v.min()))



_T2P = TextToPath()


@functools.lru_cache(maxsize=16384)
def _measure_pt(s: str, size: float, weight: str = "normal", math_: bool = False) -> float:
    w, _, _ = _T2P.get_text_width_height_descent(s, FontProperties(size=size, weight=weight), ismath=math_)
    return w


def line_width_pt(s: str, size: float, weight: str = "normal") -> float:
    """Width in points of one line of plain text (``$`` is a character, never mathtext): the sum of its words' measured widths and of the
    spaces between them (words are measured once and cached: text measuring is the slow part of
    laying out a report)."""
    words = s.split(" ")
    space = _measure_pt("x x", size, weight) - 2 * _measure_pt("x", size, weight)
    return sum(_measure_pt(w, size, weight) for w in words if w) + space * (len(words) - 1)


def text_width_pt(s: str, size: float, weight: str = "normal") -> float:
    """Width in points of ``s`` (its widest line) at font ``size``, measured with the report's font."""
    return max(line_width_pt(line, size, weight) for line in str(s).split("\n"))


def wrap_text(s: str, width_pt: float, size: float) -> str:
    """Greedy wrap of ``s`` at spaces so every line is at most ``width_pt`` wide (a single word longer
    than that stays on its own line); existing line breaks are kept."""
    lines = []
    for para in str(s).split("\n"):
        cur = ""
        for word in para.split(" "):
            cand = word if not cur else f"{cur} {word}"
            if cur and text_width_pt(cand, size) > width_pt:
                lines.append(cur)
                cur = word
            else:
                cur = cand
        lines.append(cur)
    return "\n".join(lines)


def _font_pt(size) -> float:
    return FontProperties(size=size).get_size_in_points()


def legend_below(fig, handles, labels, *, max_cols: int = 4, title: str | None = None, **kw):
    """A figure legend under the axes (constrained layout 'outside lower center') that fits the
    figure's width: as many columns as fit (at most ``max_cols``), labels wider than the figure
    wrapped at spaces. ``fig`` is a Figure or SubFigure; widths are measured with the legend font."""
    rc = mpl.rcParams
    fs = _font_pt(kw.get("fontsize", rc["legend.fontsize"]))
    width_pt = fig.bbox.width / fig.figure.dpi * 72
    # room for the legend box: its border padding, the layout's outer padding and a safety margin
    avail = 0.94 * width_pt - 2 * (rc["legend.borderpad"] + rc["legend.borderaxespad"]) * fs - 8
    handle = (rc["legend.handlelength"] + rc["legend.handletextpad"]) * fs
    gap = rc["legend.columnspacing"] * fs
    labels = [wrap_text(lab, avail - handle, fs) for lab in labels]
    widths = [handle + text_width_pt(lab, fs) for lab in labels]
    n = len(labels)
    ncol = 1
    for c in range(max(1, min(max_cols, n)), 0, -1):
        cols = [w for w in np.array_split(np.asarray(widths, dtype=float), c) if w.size]
        if sum(float(w.max()) for w in cols) + gap * (len(cols) - 1) <= avail:
            ncol = c
            break
    if title:
        title = wrap_text(title, avail, _font_pt(rc["legend.title_fontsize"] or fs))
    kw.setdefault("frameon", False)
    return fig.legend(handles, labels, loc="outside lower center", ncol=ncol, title=title, **kw)


def wrap_title(text: str, width_in: float, size: float | None = None, sep: str = " — ") -> str:
    """``text`` on one line if it fits ``width_in``, else broken after ``sep`` (then at spaces)."""
    size = _font_pt(size or mpl.rcParams["axes.titlesize"])
    if text_width_pt(text, size) <= width_in * 72:
        return text
    if sep in text:
        text = text.replace(sep, sep.strip().strip("—–-") + "\n", 1)
    return wrap_text(text, width_in * 72, size)
