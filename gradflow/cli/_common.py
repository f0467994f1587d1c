"""Shared CLI plumbing: one-line errors, the --quiet flag, lazy imports."""

from __future__ import annotations

import functools
import sys

import click

from ..errors import GradflowError


def one_line_errors(fn):
    """Turn GradflowError / OSError into one line ``Error: ...`` on stderr and exit status 1 (the
    convention is :class:`gradflow.cli.main.OneLineGroup`'s)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GradflowError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            name = f" {exc.filename}" if getattr(exc, "filename", None) else ""
            raise click.ClickException(f"cannot access{name}: {exc.strerror or exc}") from None
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def done_ignore_sigint() -> None:
    """The command's results are written and its exit status is final: a SIGINT while the
    interpreter shuts down (torch's teardown takes seconds) must not turn it into a failure."""
    import atexit
    import signal

    atexit.register(signal.signal, signal.SIGINT, signal.SIG_IGN)


quiet_option = click.option("-q", "--quiet", is_flag=True, help="Print only the paths written (no progress bars).")


def say(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))


memory_option = click.option(
    "--memory", default=None, metavar="SIZE",
    help="Memory budget of the analysis, e.g. 2GB or 512MB (default: the spec's [analysis] memory, else 2GB). "
         "The plan printed for each unit follows it: dense or matrix-free top-k spectra, chunk of time.")


def analysis_with_memory(base, memory: str | None):
    """``base`` (an AnalysisConfig or None) with ``--memory`` applied (one-line SpecError if invalid)."""
    from ..analysis.config import AnalysisConfig, parse_memory

    cfg = AnalysisConfig.from_mapping(base)
    return cfg if memory is None else cfg.replace(memory=parse_memory(memory, "--memory"))
