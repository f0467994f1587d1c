"""``gradflow run SPEC.toml``: train and analyse one study into a run directory."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import one_line_errors, quiet_option, say


@click.command("run")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Study directory to write (default: runs/<spec name>).")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Also write reports/<name>/index.html and report.pdf.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (small recurrent models train fastest on one).")
@quiet_option
@one_line_errors
def command(spec: Path, out: Path | None, report: bool, threads: int | None, quiet: bool):
    """Run the analysis spec SPEC (a TOML file, see analyses/) into a study directory.

    \b
    Examples:
      gradflow run analyses/checksum.toml
      gradflow run analyses/clipping.toml --out runs/clip-try2 --no-report

    Runs already finished in the study directory with the same settings are reused, so re-running
    after an interruption finishes only what is missing.
    """
    from ..spec import load_spec
    from ..study import run_study

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    s = load_spec(spec)
    out = out or Path("runs") / s.name
    echo = say(quiet)
    echo(f"{s.name}: {len(s.runs)} run(s) -> {out}")
    run_study(s, out, progress=not quiet, echo=echo)
    click.echo(str(out))
    if report:
        from ..report import build_report

        d = Path("reports") / s.name
        written = build_report([out], html=d / "index.html", pdf=d / "report.pdf", title=s.title)
        for p in written.values():
            click.echo(str(p))
