"""``gradflow inspect MODULE:FACTORY``: record and analyse the user's own model.

This is the one command that imports user code, by design: ``MODULE`` is imported (the current
directory is on the import path) and ``FACTORY()`` is called. Everything else gradflow reads —
specs, run directories, traces — is data and is never executed.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import click

from ._common import analysis_with_memory, memory_option, one_line_errors, quiet_option, say


def _load_factory(ref: str):
    from ..errors import SpecError

    if ":" not in ref:
        raise SpecError(f"inspect: expected MODULE:FACTORY (e.g. mypkg.models:make_model), got {ref!r}")
    mod_name, attr = ref.split(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise SpecError(f"inspect: cannot import module {mod_name!r}: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise SpecError(f"inspect: importing {mod_name!r} raised {type(exc).__name__}: {msg}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SpecError(f"inspect: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"inspect: {ref} is not callable")
    return obj


def _parse_shape(shape: str) -> tuple[int, int, int]:
    from ..errors import SpecError

    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", shape or "")
    if not m or min(int(g) for g in m.groups()) < 1:
        raise SpecError(f"--shape must be T,B,F with positive integers (e.g. 50,16,8), got {shape!r}")
    return tuple(int(g) for g in m.groups())


@click.command("inspect")
@click.argument("factory")
@click.option("--shape", default=None, help="Random N(0,1) input of shape T,B,F (time-major) when the factory "
              "returns only a model.")
@click.option("--tokens", type=int, default=None, help="With --shape T,B,1: random integer tokens in [0, TOKENS) "
              "instead of floats, shaped [T, B].")
@click.option("--batch-first", is_flag=True, help="Feed the random input as [B, T, ...].")
@click.option("--loss", "loss_kind", type=click.Choice(["last", "all"]), default="last", show_default=True,
              help="Probe loss when the factory gives none: squared output at the last step, or at every step.")
@click.option("--passes", type=int, default=1, show_default=True, help="Backward passes to record (fresh inputs).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", default=None, help="Run name (default: inspect-<factory>).")
@click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Report directory (default: reports/<name>).")
@memory_option
@quiet_option
@one_line_errors
def command(factory, shape, tokens, batch_first, loss_kind, passes, seed, name, runs_dir, out, memory, quiet):
    """Attach to the model built by FACTORY (``MODULE:FUNCTION``), record dL/dh_t on a few backward
    passes, analyse the recurrent Jacobians and write a report.

    FACTORY() returns either an nn.Module (then give --shape) or a dict with "model", "inputs"
    (a tensor, a tuple of positional inputs, or a callable seed -> inputs) and optionally "loss"
    (a callable output -> scalar).

    \b
    Examples:
      gradflow inspect mymodels:make_lstm --shape 100,16,8
      gradflow inspect mymodels:make_lm --shape 64,8,1 --tokens 50 --loss all

    Note: this command imports and runs MODULE, i.e. your code.
    """
    from ..inspect_model import inspect_model

    if passes < 1:
        from ..errors import SpecError

        raise SpecError(f"--passes must be >= 1, got {passes}")
    cfg = analysis_with_memory(None, memory)  # checked before any user code runs
    fn = _load_factory(factory)
    name = name or "inspect-" + re.sub(r"[^A-Za-z0-9._-]+", "_", factory.split(":")[-1])
    dims = _parse_shape(shape) if shape else None
    run_dir = inspect_model(fn, run_dir=runs_dir / name, label=name, shape=dims, tokens=tokens, analysis=cfg,
                            batch_first=batch_first, loss=loss_kind, passes=passes, seed=seed,
                            source=factory, echo=say(quiet))
    click.echo(str(run_dir))
    from ..report import build_report

    d = out or Path("reports") / name
    written = build_report([run_dir], html=d / "index.html", pdf=d / "report.pdf", title=f"gradflow inspect: {factory}")
    for p in written.values():
        click.echo(str(p))
