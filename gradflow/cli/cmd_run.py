"""``gradflow run SPEC``: train and analyse one study into a run directory."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import analysis_with_memory, done_ignore_sigint, memory_option, one_line_errors, quiet_option, say


@click.command("run")
@click.argument("spec")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Study directory to write (default: runs/<spec name>).")
@click.option("--report/--no-report", default=True, show_default=True,
              help="Also write reports/<name>/index.html and report.pdf.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Train every run for this many steps instead of the spec's (a quick look).")
@click.option("--copy", "copy_only", is_flag=True,
              help="Only copy the spec into the current directory, for editing; run nothing.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (small recurrent models train fastest on one).")
@memory_option
@quiet_option
@one_line_errors
def command(spec: str, out: Path | None, report: bool, steps: int | None, copy_only: bool, threads: int | None,
            memory: str | None, quiet: bool):
    """Run the analysis SPEC into a study directory. SPEC is a TOML file or the name of a shipped
    analysis (gradflow list shows them).

    \b
    Examples:
      gradflow run checksum                        # a shipped analysis, by name
      gradflow run checksum --steps 5              # a quick look: 5 training steps per run
      gradflow run --copy checksum                 # writes ./checksum.toml to edit ...
      gradflow run checksum.toml                   # ... and runs the edited copy
      gradflow run analyses/clipping.toml --out runs/clip-try2 --no-report

    Runs already finished in the study directory with the same settings are reused, so re-running
    after an interruption finishes only what is missing.
    """
    from ..catalog import resolve_spec

    path = resolve_spec(spec, "study")
    if copy_only:
        from ._specs import copy_spec

        click.echo(str(copy_spec(path)))
        return
    from ..spec import load_spec, parse_spec, read_toml
    from ..study import run_study

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if steps is None:
        s = load_spec(path)
    else:
        from ._specs import with_steps

        s = parse_spec(with_steps(read_toml(path), steps), str(path), default_name=path.stem)
    if memory is not None:
        import dataclasses

        s = dataclasses.replace(s, analysis=analysis_with_memory(s.analysis, memory))
    out = out or Path("runs") / s.name
    echo = say(quiet)
    echo(f"{s.name}: {len(s.runs)} run(s) from {path} -> {out}")
    run_study(s, out, progress=not quiet, echo=echo)
    click.echo(str(out))
    if report:
        from ..report import build_report

        d = Path("reports") / s.name
        written = build_report([out], html=d / "index.html", pdf=d / "report.pdf", title=s.title)
        for p in written.values():
            click.echo(str(p))
    done_ignore_sigint()
