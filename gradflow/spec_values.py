"""Type and range checks of every value of a study spec, run by :func:`gradflow.spec.parse_spec`
before anything is built, trained or written.

Each check turns a bad value into one :class:`~gradflow.errors.SpecError` line naming the file, the
table and the key (``analyses/x.toml: [train] lr must be a positive finite number, got true``).
Booleans are never numbers, NaN and ±Inf are never accepted, and sizes are bounded (``hidden`` ≤
65536, ``layers`` ≤ 1024, at most 10⁹ parameters ...; ``device`` by its form, since the run may
execute elsewhere) so that a typo cannot make parsing or the first
step hang or exhaust memory. Nothing large is built here: the model is checked from its settings
(:func:`check_run`), and the state keys an ``[analysis] keys`` list may name are read from a copy of
the model with two hidden units run on two timesteps (:func:`model_state_keys`).

The ``[analysis]`` table is :class:`gradflow.analysis.AnalysisConfig`'s; only its cross-checks
against a run (``warmup`` against the sequence length, ``keys`` against the model) live here.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

from .errors import GradflowError, SpecError

__all__ = ["MAX", "check_table", "check_train", "check_model", "check_task", "check_run", "model_state_keys"]

# upper bounds of the sizes (inclusive)
MAX = {"steps": 10**9, "batch": 2**20, "eval_batch": 2**20, "flush_every": 10**9, "seed": 2**63 - 1,
       "record_every": 10**9, "record_per_decade": 1000, "record_steps": 10**5, "hidden": 2**16, "layers": 1024,
       "params": 10**9, "task_int": 10**7}
_BOUND_NOTE = "gradflow.spec_values.MAX"


class _Bad(Exception):
    """A check's verdict: the value is not ``what``."""

    def __init__(self, what: str):
        self.what = what


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(lo: int, hi: int) -> Callable:
    what = f"an integer >= {lo}" if hi >= 2**62 else f"an integer from {lo} to {hi}"

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _Bad(what)
        return v
    return check


def _num(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False, what: str = "") -> Callable:
    what = what or (f"a finite number {'>' if lo_open else '>='} {lo:g}" if hi == math.inf else
                    f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")

    def check(v):
        if not _is_num(v) or not math.isfinite(v):
            raise _Bad(what)
        if v < lo or (lo_open and v == lo) or v > hi or (hi_open and v == hi):
            raise _Bad(what)
        return v
    return check


def _choice(options: Callable[[], tuple]) -> Callable:
    def check(v):
        opts = tuple(options())
        if not isinstance(v, str) or v not in opts:
            raise _Bad("one of " + ", ".join(map(repr, opts)))
        return v
    return check


def _optimizers() -> tuple:
    from .training import OPTIMIZERS

    return tuple(OPTIMIZERS)


def _inits() -> tuple:
    from .kinds._base import INITS

    return tuple(INITS)


def _device(v):
    """The form only: whether the device exists is checked where the run executes (a sweep's runs may
    execute on other machines than the one that parses the spec, e.g. Ray workers with GPUs)."""
    if not isinstance(v, str) or not re.fullmatch(r"cpu|(cuda|mps)(:\d+)?", v):
        raise _Bad('"cpu", "cuda", "cuda:N", "mps" or "mps:N"')
    return v


def _record_steps(v):
    what = f"a list of at most {MAX['record_steps']} integers from 0 to {MAX['steps']}"
    if not isinstance(v, (list, tuple)) or len(v) > MAX["record_steps"]:
        raise _Bad(what)
    for s in v:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX["steps"]:
            raise _Bad(what)
    return v


def _table(v):
    if not isinstance(v, Mapping):
        raise _Bad("a table")
    return v


TRAIN: dict[str, Callable] = {
    "steps": _int(1, MAX["steps"]),
    "batch": _int(1, MAX["batch"]),
    "eval_batch": _int(1, MAX["eval_batch"]),
    "flush_every": _int(1, MAX["flush_every"]),
    "optimizer": _choice(_optimizers),
    "lr": _num(0, lo_open=True, what="a positive finite number"),
    "momentum": _num(0, 1, hi_open=True),
    "seed": _int(0, MAX["seed"]),
    "device": _device,
    "clip": _table,
    "record_every": _int(0, MAX["record_every"]),
    "record_per_decade": _int(0, MAX["record_per_decade"]),
    "record_steps": _record_steps,
}
CLIP: dict[str, Callable] = {
    "mode": _choice(lambda: ("none", "norm", "value")),
    "threshold": _num(0, lo_open=True, what="a positive finite number"),
}
MODEL: dict[str, Callable] = {
    "hidden": _int(1, MAX["hidden"]),
    "layers": _int(1, MAX["layers"]),
    "dropout": _num(0, 1, hi_open=True),
    "init": _choice(_inits),
    "gain": _num(0, lo_open=True, what="a positive finite number"),
}


def _is(pred: Callable[[Any], bool], what: str) -> Callable:
    def check(v):
        if not pred(v):
            raise _Bad(what)
        return v
    return check


def _kind_option_check(default) -> Callable:
    """A kind-specific model option is checked against the type of the kind's default (a number when
    the default is None or a number); the kind's own ``check_options`` then checks its range."""
    if isinstance(default, bool):
        return _is(lambda v: isinstance(v, bool), "true or false")
    if isinstance(default, str):
        return _is(lambda v: isinstance(v, str), "a string")
    return _num(-math.inf, what="a finite number")


def _model_checks() -> dict[str, Callable]:
    from . import kinds

    out = dict(MODEL)
    for k in kinds.kinds():
        for opt, default in k.options.items():
            out.setdefault(opt, _kind_option_check(default))
    return out


def check_table(d: Any, checks: Mapping[str, Callable], where: str) -> None:
    """Run ``checks[key]`` on every key of ``d`` that has one; ``where`` is ``"file: [table]"``."""
    if not isinstance(d, Mapping):
        raise SpecError(f"{where} must be a table, got {_show(d)}")
    for key, v in d.items():
        check = checks.get(key)
        if check is None:
            continue
        try:
            check(v)
        except _Bad as bad:
            raise SpecError(f"{where} {key} must be {bad.what}, got {_show(v)}") from None


def _show(v) -> str:
    """A value as the spec file would spell it (short)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, int) and abs(v) >= 10**12:
        return f"{v:.3g}"  # never a 5000-digit line
    if isinstance(v, Mapping):
        return "a table"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def check_train(d: Any, where: str) -> None:
    check_table(d, TRAIN, where)
    if "clip" in d:
        check_table(d["clip"], CLIP, f"{where[:-1]}.clip]" if where.endswith("]") else where + " clip")


def check_model(d: Any, where: str) -> None:
    check_table(d, _model_checks(), where)


def _task_checks(cls) -> dict[str, Callable]:
    """Checks from the task dataclass' field annotations (int, float, bool, str, str | None, tuple[str, ...])."""
    from dataclasses import fields

    out: dict[str, Callable] = {}
    for f in fields(cls):
        t = str(f.type).replace(" ", "")
        if t == "int":
            out[f.name] = _int(0, MAX["task_int"])
        elif t == "float":
            out[f.name] = _num(-math.inf, what="a finite number")
        elif t == "bool":
            out[f.name] = _kind_option_check(True)
        elif t == "str":
            out[f.name] = _kind_option_check("")
        elif t in ("str|None", "None|str"):
            out[f.name] = _is(lambda v: v is None or isinstance(v, str), "a string")
        elif t.startswith("tuple[str"):
            out[f.name] = _str_list
    return out


def _str_list(v):
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(s, str) and s for s in v):
        raise _Bad("a non-empty list of strings")
    return v


def check_task(d: Any, where: str, need_name: bool = True) -> None:
    from .tasks import TASKS, list_tasks

    if not isinstance(d, Mapping):
        raise SpecError(f"{where} must be a table, got {_show(d)}")
    name = d.get("name")
    if "name" in d or need_name:
        if not isinstance(name, str) or name not in TASKS:
            import difflib

            m = difflib.get_close_matches(str(name), list_tasks(), n=1, cutoff=0.4)
            raise SpecError(f"{where} name: unknown task {_show(name)}" + (f"; did you mean {m[0]!r}?" if m else "")
                            + f" (known: {', '.join(list_tasks())})")
    if isinstance(name, str) and name in TASKS:
        check_table(d, _task_checks(TASKS[name]), where)


# ------------------------------------------------------------------------ one run, all together
def check_run(r, source: str, analysis=None) -> list[str] | None:
    """Check a run (a :class:`gradflow.spec.RunSpec` with merged settings) as a whole, building
    nothing large: the task (cheap), the TrainConfig, the model settings against the task (sizes,
    parameter count, the kind's options) and the analysis against the run (``warmup`` below the
    sequence length, ``keys`` among the model's state keys). One-line SpecError naming the file and
    the run otherwise. Returns the run's state keys when ``analysis.keys`` names some, else None."""
    from . import kinds
    from .models.zoo import _validate, expected_param_count
    from .spec import train_config
    from .tasks import get_task

    where = f"{source}: run {r.label!r}:"
    check_task(r.task, f"{source}: run {r.label!r} [task]")
    check_train(r.train, f"{source}: run {r.label!r} [train]")
    check_model(r.model, f"{source}: run {r.label!r} [model]")
    t = dict(r.train)
    opt = t.get("optimizer", "adam")
    if t.get("momentum") and opt not in ("sgd", "rmsprop"):
        raise SpecError(f"{where} [train] momentum = {t['momentum']} applies to optimizer 'sgd' or 'rmsprop', "
                        f"not {opt!r}")
    steps = t.get("steps", 1000)
    late = [s for s in t.get("record_steps", ()) if s >= steps]
    if late:
        raise SpecError(f"{where} [train] record_steps {late[:3]} lie past the last step ({steps - 1}; steps = {steps})")
    clip = t.get("clip")
    if isinstance(clip, Mapping):
        mode = clip.get("mode", "none")
        if mode != "none" and "threshold" not in clip:
            raise SpecError(f"{where} [train.clip] mode {mode!r} needs threshold = a positive number")
        if mode == "none" and "threshold" in clip:
            raise SpecError(f"{where} [train.clip] mode 'none' takes no threshold")
    try:
        opts = dict(r.task)
        task = get_task(opts.pop("name"), **opts)
        cfg = train_config(r.train)
    except (GradflowError, TypeError) as exc:
        raise SpecError(f"{where} {exc}") from None
    m = dict(r.model)
    try:
        entry = kinds.zoo_cell(r.cell)
        builder = entry.load_builder()
        init = m.pop("init", None)
        init = (entry.init or "default") if init is None else init
        fb = m.pop("forget_bias", None)
        hidden, layers = m.pop("hidden", 64), m.pop("layers", 1)
        dropout, gain = m.pop("dropout", 0.0), m.pop("gain", 1.0)
        if fb is not None:
            m["forget_bias"] = fb
        _validate(entry, builder, task.n_features, task.output_size, task.readout, hidden, layers, dropout, init,
                  gain, m)
        n = expected_param_count(r.cell, task.n_features, hidden, layers, task.output_size)
    except GradflowError as exc:
        raise SpecError(f"{where} {exc}") from None
    if n > MAX["params"]:
        raise SpecError(f"{where} [model] hidden = {hidden}, layers = {layers} give {n:.3g} parameters, "
                        f"over the {MAX['params']:.0e} a spec may ask for ({_BOUND_NOTE})")
    if analysis is None:
        return None
    T = task.length
    most = max(T - 2, 0)  # of the T - 1 steps' Jacobians at least one is averaged
    if analysis.warmup > most:
        raise SpecError(f"{where} [analysis] warmup = {analysis.warmup} leaves no step of the task's {T} "
                        f"to average the Lyapunov exponents over; use warmup <= {most}")
    if analysis.keys != "all":
        have = model_state_keys(task, r.cell, dict(r.model), seed=cfg.seed)
        if not set(analysis.keys) & set(have):
            raise SpecError(f"{where} [analysis] keys {list(analysis.keys)!r} match none of this run's state keys "
                            f"({', '.join(have)})")
        return have
    return None


def model_state_keys(task, cell: str, model: Mapping, seed: int = 0) -> list[str]:
    """The state keys (``str(StateKey)``) a run's model records, read from the same model with two
    hidden units, recorded on one sequence of two steps (cheap at any spec size)."""
    import torch

    from .models import model_for_task
    from .recording import record

    small = {**dict(model), "hidden": 2}
    small.pop("dropout", None)
    net = model_for_task(task, cell, seed=seed, **small)
    if task.input_kind == "tokens":
        x = torch.zeros(2, 1, dtype=torch.long)
    else:
        x = torch.zeros(2, 1, task.n_features)
    with record(net, keep="norms") as rec:
        net(x).sum().backward()
    return [str(k) for k in rec.trace.keys()]
