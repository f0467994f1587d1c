"""Render a report plan as a multi-page PDF with matplotlib alone (no external program).

Pages are A4 portrait (taller when a figure needs it): a title page with the contents, flagged runs,
studies and run metadata; one page per section with its title, how to read it and notes above the
vector figure (the figure is drawn into a subfigure of the page), then its table; a last page lists
the sections without data and the raw tables. Text is wrapped by measuring it with the same font.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from .._version import __version__
from ._style import line_width_pt, styled
from .html import flagged_lines
from .load import RunSet
from .sections import Omitted, Section, Table, run_rows

__all__ = ["render_pdf"]

PAGE_W, PAGE_H = 8.27, 11.69  # A4, inches
MARGIN = 0.6
TEXT_W = PAGE_W - 2 * MARGIN


def _esc(s: str) -> str:
    """Text from data is never mathtext: drawn under :func:`styled` (``text.parse_math`` off), so
    ``$`` needs no escaping and is shown as written."""
    return str(s)


def _width_in(s: str, size: float, weight: str = "normal") -> float:
    return line_width_pt(s, size, weight) / 72.0


def wrap(text: str, width_in: float, size: float, weight: str = "normal") -> list[str]:
    """Greedy word wrap by measured width; a single over-long word is broken by characters."""
    lines: list[str] = []
    for para in str(text).split("\n"):
        cur = ""
        for word in para.split(" "):
            cand = word if not cur else f"{cur} {word}"
            if _width_in(cand, size, weight) <= width_in:
                cur = cand
                continue
            if cur:
                lines.append(cur)
            cur = word
            while _width_in(cur, size, weight) > width_in and len(cur) > 1:
                k = len(cur)
                while k > 1 and _width_in(cur[:k], size, weight) > width_in:
                    k -= 1
                lines.append(cur[:k])
                cur = cur[k:]
        lines.append(cur)
    return lines


def _new_page(height: float = PAGE_H, layout: str | None = None) -> Figure:
    f = Figure(figsize=(PAGE_W, height), layout=layout)
    FigureCanvasAgg(f)
    return f


class Flow:
    """Text and tables flowing down A4 pages (positions in inches from the top-left corner)."""

    def __init__(self, pages: list[Figure]):
        self.pages = pages
        self.fig: Figure | None = None
        self.y = 0.0

    @property
    def height(self) -> float:
        return self.fig.get_size_inches()[1] if self.fig is not None else PAGE_H

    def new_page(self) -> None:
        self.fig = _new_page()
        self.pages.append(self.fig)
        self.y = MARGIN

    def adopt(self, fig: Figure, y: float) -> None:
        """Continue on an existing page from ``y`` inches."""
        self.fig, self.y = fig, y

    def ensure(self, h: float) -> None:
        if self.fig is None or self.y + h > self.height - MARGIN:
            self.new_page()

    def _put(self, x: float, s: str, size: float, **kw) -> None:
        H = self.height
        self.fig.text(x / PAGE_W, 1 - self.y / H, _esc(s), fontsize=size, va="top", ha="left", **kw)

    def text(self, s: str, size: float = 9.5, weight: str = "normal", color: str = "black", indent: float = 0.0,
             after: float = 0.08) -> None:
        lh = size * 1.4 / 72
        for line in wrap(s, TEXT_W - indent, size, weight):
            self.ensure(lh)
            self._put(MARGIN + indent, line, size, weight=weight, color=color)
            self.y += lh
        self.y += after

    def heading(self, s: str, size: float = 14) -> None:
        self.ensure(size * 3 / 72)
        self.y += 0.05
        self.text(s, size=size, weight="bold", after=0.1)

    def table(self, t: Table, size: float = 7.5, caption: str = "") -> None:
        if caption:
            self.text(caption, size=8.5, weight="bold", after=0.03)
        lay = TableLayout(t, size)

        def draw(row_cells, weight, color="black"):
            x = MARGIN
            H = self.height
            for i, lines in enumerate(row_cells):
                for j, line in enumerate(lines):
                    self.fig.text((x + lay.pad) / PAGE_W, 1 - (self.y + 0.03 + j * lay.lh) / H, _esc(line),
                                  fontsize=size, va="top", ha="left", weight=weight, color=color)
                x += lay.widths[i]
            self.y += lay.row_height(row_cells)
            self.fig.add_artist(_hline(self.y, H))

        self.ensure(lay.row_height(lay.head) + 2 * lay.lh)
        draw(lay.head, "bold")
        for k, rc in enumerate(lay.cells):
            if self.y + lay.row_height(rc) > self.height - MARGIN:
                self.new_page()
                draw(lay.head, "bold")
            cls = t.row_classes[k] if t.row_classes else ""
            draw(rc, "normal", color="#b42318" if "flagged" in cls else "black")
        self.y += 0.15


class TableLayout:
    """Column widths (auto layout: no column narrower than its longest word when space allows,
    spare width shared in proportion to how much each column would use) and wrapped cells."""

    pad = 0.05

    def __init__(self, t: Table, size: float):
        self.size, self.lh = size, size * 1.3 / 72
        rows = [tuple(t.columns)] + [tuple(r) for r in t.rows]
        n = len(t.columns)
        lo, hi = [0.0] * n, [0.0] * n
        for r_i, row in enumerate(rows):
            weight = "bold" if r_i == 0 else "normal"
            for i, c in enumerate(row):
                c = str(c)
                lo[i] = max(lo[i], max((_width_in(w, size, weight) for w in c.split()), default=0) + 2 * self.pad)
                hi[i] = max(hi[i], _width_in(c, size, weight) + 2 * self.pad)
        if sum(hi) <= TEXT_W:
            widths = [h * TEXT_W / sum(hi) for h in hi]
        elif sum(lo) <= TEXT_W:
            spare, want = TEXT_W - sum(lo), [h - l for h, l in zip(hi, lo)]
            widths = [l + spare * w / (sum(want) or 1) for l, w in zip(lo, want)]
        else:
            widths = [l * TEXT_W / sum(lo) for l in lo]
        self.widths = widths
        self.head = self._wrap(t.columns, "bold")
        self.cells = [self._wrap(r, "normal") for r in t.rows]

    def _wrap(self, row, weight):
        return [wrap(str(c), self.widths[i] - 2 * self.pad, self.size, weight) for i, c in enumerate(row)]

    def row_height(self, row_cells) -> float:
        return max(len(c) for c in row_cells) * self.lh + 0.06

    @property
    def height(self) -> float:
        return self.row_height(self.head) + sum(self.row_height(r) for r in self.cells) + 0.15


def _hline(y: float, H: float):
    from matplotlib.lines import Line2D

    return Line2D([MARGIN / PAGE_W, 1 - MARGIN / PAGE_W], [1 - y / H] * 2, lw=0.4, color="0.75")


def _section_pages(s: Section, number: int, pages: list[Figure]) -> None:
    """Header text and the figure on one page (taller than A4 if the figure needs it); table after."""
    flow = Flow(pages)
    head_lines: list[tuple[str, float, str, str]] = [(f"{number}. {s.title}", 14, "bold", "black")]
    for line in wrap(s.explanation, TEXT_W, 9):
        head_lines.append((line, 9, "normal", "black"))
    for n in s.notes:
        color = "#b42318" if n.startswith("⚠") else "#57606a"
        for line in wrap(n, TEXT_W, 8.5):
            head_lines.append((line, 8.5, "normal", color))
    head_h = MARGIN + sum(sz * 1.4 / 72 for _, sz, _, _ in head_lines) + 0.25

    if s.draw is None:
        flow.new_page()
        for text, size, weight, color in head_lines:
            flow.text(text, size=size, weight=weight, color=color, after=0.0)
        flow.y += 0.2
    else:
        holder: dict = {}

        table_h = 0.0
        if s.table is not None and len(s.table.rows) <= 20:
            table_h = TableLayout(s.table, 7.5).height + (0.3 if s.table_caption else 0.0) + 0.2

        def target(w: float, h: float):
            total = max(PAGE_H, head_h + h + table_h + MARGIN)
            page = _new_page(total, layout="constrained")
            page.get_layout_engine().set(w_pad=0.25, h_pad=0.05)
            subs = page.subfigures(3, 1, height_ratios=[head_h, h, max(total - head_h - h, 1e-3)])
            holder.update(page=page, y=head_h + h)
            y = MARGIN
            for text, size, weight, color in head_lines:
                page.text(MARGIN / PAGE_W, 1 - y / total, _esc(text), fontsize=size, weight=weight, color=color,
                          va="top", ha="left")
                y += size * 1.4 / 72
            return subs[1]

        s.draw(target=target)
        pages.append(holder["page"])
        flow.adopt(holder["page"], holder["y"] + 0.2)
    if s.table is not None:
        flow.table(s.table, caption=s.table_caption)


def _title_pages(rs: RunSet, title: str, toc: list[tuple[str, int]], pages: list[Figure]) -> None:
    flow = Flow(pages)
    flow.new_page()
    flow.text(title, size=20, weight="bold", after=0.1)
    flow.text(f"gradflow {__version__} report of {len(rs.runs)} run(s). Rebuild it from the run directories "
              "with `gradflow report`.", size=9, color="#57606a", after=0.2)
    flagged = flagged_lines(rs)
    if flagged:
        flow.text("Runs that did not finish normally", size=10.5, weight="bold", color="#b42318", after=0.03)
        for f in flagged:
            flow.text("⚠ " + f, size=9, color="#b42318", indent=0.15, after=0.0)
        flow.y += 0.15
    flow.heading("Contents", 12)
    for name, page in toc:
        flow.ensure(0.2)
        flow._put(MARGIN + 0.15, name, 9.5)
        flow.fig.text(1 - MARGIN / PAGE_W, 1 - flow.y / flow.height, f"page {page}", fontsize=9.5, va="top",
                      ha="right")
        flow.y += 9.5 * 1.5 / 72
    flow.y += 0.15
    for st in rs.studies:
        flow.heading(f"Study {st.name}", 12)
        if st.claim:
            flow.text(f"Claim tested: {st.claim}", size=9.5)
        flow.text("Runs: " + ", ".join(st.runs), size=8.5, color="#57606a")
    flow.heading("Runs", 12)
    flow.table(run_rows(rs), size=6.8)


def _last_pages(rs: RunSet, omitted: list[Omitted], pdf_path: Path, pages: list[Figure]) -> None:
    flow = Flow(pages)
    flow.new_page()
    if omitted:
        flow.heading("Sections without data", 14)
        for o in omitted:
            flow.text(f"{o.title}: {o.note}", size=9, indent=0.1)
        flow.y += 0.2
    flow.heading("Raw tables", 14)
    flow.text("The CSV tables the figures were drawn from (paths relative to this PDF).", size=9)
    base = Path(pdf_path).resolve().parent
    for r in rs.runs:
        rel = os.path.relpath(r.path.resolve(), base)
        flow.text(f"{r.label} ({rel}): " + ", ".join(["run.json"] + [f"{n}.csv" for n in r.tables]), size=8.5,
                  indent=0.1, after=0.04)


def render_pdf(rs: RunSet, sections: list[Section], omitted: list[Omitted], title: str, pdf_path: Path) -> bytes:
    """The whole PDF as bytes (written atomically by the caller)."""
    with styled():
        body: list[Figure] = []
        starts = []
        for i, s in enumerate(sections, 1):
            starts.append(len(body))
            _section_pages(s, i, body)
        tail: list[Figure] = []
        _last_pages(rs, omitted, pdf_path, tail)

        def toc_for(n_title: int) -> list[tuple[str, int]]:
            toc = [(f"{i}. {s.title}", n_title + starts[i - 1] + 1) for i, s in enumerate(sections, 1)]
            extra = "Sections without data, raw tables" if omitted else "Raw tables"
            return toc + [(extra, n_title + len(body) + 1)]

        probe: list[Figure] = []
        _title_pages(rs, title, toc_for(1), probe)
        front: list[Figure] = []
        _title_pages(rs, title, toc_for(len(probe)), front)

        pages = front + body + tail
        buf = io.BytesIO()
        with PdfPages(buf, metadata={"Title": title, "Creator": f"gradflow {__version__}", "CreationDate": None}) as pdf:
            for k, page in enumerate(pages, 1):
                page.text(0.5, 0.2 / page.get_size_inches()[1], f"{_esc(title)} — page {k} of {len(pages)}",
                          ha="center", va="bottom", fontsize=7.5, color="#57606a")
                pdf.savefig(page)
        return buf.getvalue()
