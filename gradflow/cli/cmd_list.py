"""``gradflow list``: tasks, cells and analyses."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click

from ._common import one_line_errors


@click.command("list")
@click.option("--analyses-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("analyses"),
              show_default=True, help="Where to look for analysis specs.")
@one_line_errors
def command(analyses_dir: Path):
    """List the built-in tasks, the cells of the model zoo and the analysis specs.

    \b
    Example:
      gradflow list --analyses-dir analyses
    """
    from ..models import list_cells
    from ..tasks import TASKS

    click.echo("tasks:")
    for name, cls in TASKS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        click.echo(f"  {name:16s} {doc}")
    click.echo("cells:")
    click.echo("  " + ", ".join(list_cells()))
    click.echo(f"analyses ({analyses_dir}):")
    specs = sorted(analyses_dir.glob("*.toml")) if analyses_dir.is_dir() else []
    if not specs:
        click.echo("  (none found)")
    for p in specs:
        try:
            claim = tomllib.loads(p.read_text(encoding="utf-8")).get("claim", "")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            claim = "(unreadable spec)"
        click.echo(f"  {p.name:28s} {' '.join(str(claim).split())[:100]}")
