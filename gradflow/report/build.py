"""build_report: run/study directories -> one HTML page and/or one PDF, written atomically.

Everything is rendered in memory first (HTML text, PDF bytes); then both files are written completely
beside their targets, and only then renamed over them (:func:`gradflow._io.write_files`). A failure at
any point (a directory that cannot be made, a full disk, a failed rename) leaves the previous report,
HTML and PDF, as it was, and never a partial or half-matching pair.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import _io
from ..errors import GradflowError
from .html import render_html
from .load import RunSet, load_runs
from .pdf import render_pdf
from .sections import plan

__all__ = ["build_report", "default_title", "figure", "FIGURES"]

# section ids that draw a figure, in report order (gradflow.report.sections.plan)
FIGURES = ("sweep", "gradnorms", "distance", "spectra", "products", "gates", "clipping")


def default_title(rs: RunSet) -> str:
    if len(rs.studies) == 1 and len(rs.runs) == len(rs.studies[0].runs):
        return f"gradflow report: {rs.studies[0].name}"
    names = ", ".join(r.label for r in rs.runs[:4]) + (", …" if len(rs.runs) > 4 else "")
    return f"gradflow report: {names}"


def build_report(paths, html: str | os.PathLike | None = None, pdf: str | os.PathLike | None = None,
                 title: str | None = None) -> dict[str, Path]:
    """Read run and/or study directories and write the report.

    ``paths``: run or study directories (one path or a list). ``html``/``pdf``: where to write the
    page and the PDF (at least one). Returns ``{"html": Path, "pdf": Path}`` for what was written.
    Raises GradflowError (one line) for bad inputs or when a file cannot be written; then no report
    file from this call is left behind and a previous report at the same paths is untouched.
    """
    if html is None and pdf is None:
        raise GradflowError("build_report: give html=PATH and/or pdf=PATH (nothing to write)")
    rs = paths if isinstance(paths, RunSet) else load_runs(paths)
    title = title or default_title(rs)
    sections, omitted = plan(rs)
    outputs: list[tuple[str, Path, bytes]] = []
    if html is not None:
        html = Path(html)
        _check_target(html)
        outputs.append(("html", html, render_html(rs, sections, omitted, title, html).encode("utf-8")))
    if pdf is not None:
        pdf = Path(pdf)
        _check_target(pdf)
        outputs.append(("pdf", pdf, render_pdf(rs, sections, omitted, title, pdf)))
    _io.write_files([(path, data) for _, path, data in outputs])
    return {kind: path for kind, path, _ in outputs}


def _check_target(path: Path) -> None:
    if path.exists() and path.is_dir():
        raise GradflowError(f"{path}: is a directory; give a file name for the report")


def figure(name: str, dirs):
    """The figure the report draws for section ``name`` (one of :data:`FIGURES`), from run, study or
    sweep directories ``dirs`` (one path, a list, or a loaded RunSet).

    It is the report's own drawing (the same section plan and figure function), so it matches the
    HTML and PDF: a ``matplotlib.figure.Figure`` on the Agg canvas (pyplot untouched); a notebook
    shows it inline. A section without data raises a one-line GradflowError saying why it is left out.
    """
    if name not in FIGURES:
        raise GradflowError(f"unknown figure {name!r}; figures: {', '.join(FIGURES)}")
    rs = dirs if isinstance(dirs, RunSet) else load_runs(dirs)
    sections, omitted = plan(rs)
    for s in sections:
        if s.id == name:
            if s.draw is None:
                why = " ".join(s.notes) or "nothing to draw"
                raise GradflowError(f"figure {name!r}: {why}")
            from .notebook import displayable

            return displayable(s.draw())
    for o in omitted:
        if o.id == name:
            raise GradflowError(f"figure {name!r}: {o.note}")
    raise GradflowError(f"figure {name!r}: no loaded directory is a sweep (no sweep.csv)")
