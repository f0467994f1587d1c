"""``gradflow demo``: the embedded default study, end to end."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

import click

from ._common import one_line_errors, quiet_option, say
from ._specs import with_steps


@click.command("demo")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Study directory for the demo's runs.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("reports/demo"),
              show_default=True, help="Directory for index.html and report.pdf.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Training steps per run (default: the demo's 150; fewer for a quick look).")
@click.option("--threads", type=click.IntRange(min=1), default=1,
              help="torch CPU threads (small recurrent models train fastest on one).")
@quiet_option
@one_line_errors
def command(runs_dir: Path, out: Path, steps: int | None, threads: int | None, quiet: bool):
    """Compare a tanh RNN, an LSTM and a GRU on the checksum task (the first token decides the
    label read out at the end), plus an exploding ReLU RNN trained with and without gradient
    clipping; write an HTML page and a PDF report and print their paths.

    \b
    Example:
      gradflow demo && chromium reports/demo/index.html
    """
    import tomllib

    import torch

    from ..report import build_report
    from ..spec import parse_spec
    from ..study import run_study

    text = resources.files("gradflow.specs").joinpath("demo.toml").read_text(encoding="utf-8")
    doc = tomllib.loads(text)
    if steps is not None:  # every run's training steps, and a recording schedule that fits them
        doc = with_steps(doc, steps)
    spec = parse_spec(doc, source="gradflow/specs/demo.toml", default_name="demo")
    torch.set_num_threads(threads)
    echo = say(quiet)
    t0 = time.perf_counter()
    echo(f"demo: {len(spec.runs)} runs -> {runs_dir}")
    run_study(spec, runs_dir, progress=not quiet, echo=echo)
    written = build_report([runs_dir], html=out / "index.html", pdf=out / "report.pdf", title=spec.title)
    echo(f"demo finished in {time.perf_counter() - t0:.0f} s")
    for p in written.values():
        click.echo(str(p))
