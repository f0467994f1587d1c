"""Render a report plan as one self-contained HTML page (Jinja2 template shipped with the package).

Figures are embedded as base64 SVG ``data:`` images (vector, and each SVG keeps its own id space), the
stylesheet is inlined, and the page holds no script and no reference to the network: it opens the
same offline, from a mail attachment or from a web server. Links to the raw CSV tables are relative
to the HTML file, so they work as long as the report stays beside the run directories.
"""

from __future__ import annotations

import base64
import os
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import jinja2

from .._version import __version__
from ._style import savefig_bytes
from .load import RunSet
from .sections import Omitted, Section, run_rows

__all__ = ["render_html", "relative_href", "flagged_lines"]


def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gradflow.report", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("report.html")


def _css() -> str:
    return resources.files("gradflow.report").joinpath("templates", "report.css").read_text(encoding="utf-8")


def relative_href(target: Path, html_dir: Path) -> str:
    """URL-quoted relative path from the directory of the HTML file to ``target``."""
    rel = os.path.relpath(Path(target).resolve(), Path(html_dir).resolve())
    return quote(Path(rel).as_posix())


def flagged_lines(rs: RunSet) -> list[str]:
    """``label: status [at step N] (path)`` for every run that did not finish normally."""
    out = []
    for r in rs.runs:
        if r.flagged:
            at = f" at step {r.diverged_at}" if r.diverged_at is not None else ""
            out.append(f"{r.label}: {r.status}{at} ({r.path})")
    return out


def render_html(rs: RunSet, sections: list[Section], omitted: list[Omitted], title: str, html_path: Path) -> str:
    """The report page as a string. Draws each section's figure (SVG) once."""
    html_dir = Path(html_path).resolve().parent
    items = []
    for s in sections:
        img = width = height = None
        if s.draw is not None:
            fig = s.draw()
            w, h = fig.get_size_inches()
            img = base64.b64encode(savefig_bytes(fig, "svg")).decode("ascii")
            width, height = int(round(w * 100)), int(round(h * 100))
        links = [
            {"href": relative_href(r.path / f"{name}.csv", html_dir), "text": f"{r.label}/{name}.csv"}
            for name in s.sources for r in rs.runs if name in r.tables
        ]
        items.append(dict(id=s.id, title=s.title, explanation=s.explanation, notes=list(s.notes), img=img,
                          width=width, height=height, alt=s.alt, table=s.table, table_caption=s.table_caption,
                          links=links))
    raw = []
    for r in rs.runs:
        links = [{"href": relative_href(r.path / "run.json", html_dir), "text": "run.json"}]
        links += [{"href": relative_href(r.path / f"{n}.csv", html_dir), "text": f"{n}.csv"} for n in r.tables]
        raw.append(dict(label=r.label, path=Path(os.path.relpath(r.path.resolve(), html_dir)).as_posix(), links=links))
    studies = [dict(name=st.name, claim=st.claim, runs=list(st.runs)) for st in rs.studies]
    return _template().render(
        title=title, version=__version__, css=_css(), runs=run_rows(rs), studies=studies,
        flagged=flagged_lines(rs), sections=items, omitted=omitted, raw=raw,
    )
