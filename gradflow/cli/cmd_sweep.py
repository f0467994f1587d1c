"""``gradflow sweep SPEC``: expand a sweep spec's axes into runs and run them in parallel."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ._common import done_ignore_sigint, one_line_errors, quiet_option, say


@click.command("sweep")
@click.argument("spec")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Sweep directory to write (default: runs/<spec name>).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: one Ray task per run (pip install 'gradflow[ray]').")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Parallel runs (default: one per core; for ray, the CPUs of a new local cluster).")
@click.option("--address", default=None,
              help="Ray cluster address (default: start a local cluster). Each task sends its run directory "
                   "back to this process, which writes it: the nodes need no shared file system.")
@click.option("--dry-run", is_flag=True, help="Validate and list the runs, run nothing.")
@click.option("--copy", "copy_only", is_flag=True,
              help="Only copy the spec into the current directory, for editing; run nothing.")
@click.option("--report/--no-report", default=False, show_default=True,
              help="Also write reports/<name>/index.html and report.pdf comparing every run.")
@quiet_option
@one_line_errors
def command(spec: str, out: Path | None, engine: str, workers: int | None, address: str | None, dry_run: bool,
            copy_only: bool, report: bool, quiet: bool):
    """Run every combination of the axes in the [sweep] table of SPEC (a TOML file, or the name of
    a shipped sweep in analyses/sweeps/) into a sweep directory, and write its comparison table
    sweep.csv.

    \b
    Examples:
      gradflow sweep gain_cells --workers 2        # a shipped sweep, by name
      gradflow sweep --copy gain_cells             # writes ./gain_cells.toml to edit
      gradflow sweep analyses/sweeps/length.toml --engine ray
      gradflow report runs/gain_cells            # one report comparing every run

    Finished runs with the same settings are skipped, so re-running after an interruption finishes
    only what is missing. A failing run is recorded as failed and the others go on; the command
    then exits non-zero naming the failed runs. Ctrl-C (SIGINT) starts no further run, stops the
    running ones, writes sweep.csv and exits with status 130. The sweep directory is locked while
    a sweep runs in it; worker processes never outlive the command.
    """
    from ..catalog import resolve_spec
    from ..errors import GradflowError

    path = resolve_spec(spec, "sweep")
    if copy_only:
        from ._specs import copy_spec

        click.echo(str(copy_spec(path)))
        return
    from ..sweep import SweepInterrupted, _Stop, incomplete, load_sweep, run_sweep

    if address and engine != "ray":
        raise GradflowError("--address applies to --engine ray")
    s = load_sweep(path)
    out = out or Path("runs") / s.name
    echo = say(quiet)
    if dry_run:
        for r in s.runs:
            click.echo(f"{r.dirname}\t{r.label}")
        return
    # The sweep's SIGINT handler stays in place until the paths are printed: a SIGINT that lands
    # after sweep.csv is written only counts, so the exit status is the one sweep.csv gives.
    with _Stop() as stop:
        try:
            res = run_sweep(s, out, engine=engine, workers=workers, address=address, echo=echo, sigint=stop)
        except SweepInterrupted as exc:  # sweep.csv is written and lists the unfinished runs
            click.echo(f"Error: {exc}", err=True)
            sys.exit(130)
        click.echo(str(out))
        click.echo(str(out / "sweep.csv"))
    if report:  # Ctrl-C here stops the report (written atomically: the previous one stays)
        from ..report import build_report

        d = Path("reports") / s.name
        written = build_report([out], html=d / "index.html", pdf=d / "report.pdf", title=s.study.title)
        for p in written.values():
            click.echo(str(p))
    done_ignore_sigint()
    bad = incomplete(res.table)  # the exit status says what sweep.csv says
    if bad:
        first = next((o for o in res.outcomes if o.label == bad[0]), None)
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        why = f" ({first.error})" if first is not None and first.error else ""
        raise GradflowError(f"{len(bad)} of {len(res.outcomes)} runs failed: {bad[0]!r}{why}{more}; "
                            f"see {out / 'sweep.csv'}")
