"""``gradflow list``: tasks, cells and the shipped analyses (reads :mod:`gradflow.catalog` only, so
it never imports torch)."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import one_line_errors

CLAIM_WIDTH = 100


def _line(name: str, text: str, width: int = 18) -> str:
    text = text if len(text) <= CLAIM_WIDTH else text[:CLAIM_WIDTH - 1].rstrip() + "…"
    return f"  {name:{width}s} {text}"


@click.command("list")
@click.option("--analyses-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="List the specs in this directory (and its sweeps/) instead of the shipped ones.")
@one_line_errors
def command(analyses_dir: Path | None):
    """List the built-in tasks, the cells of the model zoo, and the analyses and sweeps that ship
    with gradflow (run one by name).

    \b
    Examples:
      gradflow list
      gradflow run checksum                        # a listed analysis, by name
      gradflow list --analyses-dir my_specs        # the specs in another directory
    """
    from ..catalog import CELLS, TASKS, analyses_dir as shipped_dir, shipped_specs, spec_claim

    root = analyses_dir if analyses_dir is not None else shipped_dir()
    click.echo("tasks:")
    for name, doc in TASKS.items():
        click.echo(_line(name, doc))
    click.echo("cells:")
    for name, doc in CELLS.items():
        click.echo(_line(name, doc))
    for kind, title, cmd in (("study", "analyses", "gradflow run NAME"), ("sweep", "sweeps", "gradflow sweep NAME")):
        d = root / "sweeps" if kind == "sweep" else root
        specs = shipped_specs(kind, root)
        click.echo(f"{title} ({d}; {cmd}, or --copy NAME to edit a copy):")
        if not specs:
            click.echo("  (none found)")
        for name, p in specs.items():
            click.echo(_line(name, spec_claim(p)))
