"""``gradflow report RUN_DIR...``: rebuild an HTML/PDF report from run or study directories."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import one_line_errors


@click.command("report")
@click.argument("dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--html", "html", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="HTML file to write.")
@click.option("--pdf", "pdf", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PDF file to write.")
@click.option("--title", default=None, help="Report title (default: from the study).")
@one_line_errors
def command(dirs, html, pdf, title):
    """Build one report from run and/or study directories DIRS (several are compared side by side).

    \b
    Examples:
      gradflow report runs/checksum --html reports/checksum.html
      gradflow report runs/checksum runs/clipping --html both.html --pdf both.pdf

    Without --html/--pdf, writes reports/<first dir name>/index.html and report.pdf.
    """
    from ..report import build_report

    if html is None and pdf is None:
        d = Path("reports") / Path(dirs[0]).resolve().name
        html, pdf = d / "index.html", d / "report.pdf"
    written = build_report(list(dirs), html=html, pdf=pdf, title=title)
    for p in written.values():
        click.echo(str(p))
