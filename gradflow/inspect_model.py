"""Record and analyse a user's own model: the engine behind ``gradflow inspect``."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import _io
from .errors import GradflowError, SpecError

__all__ = ["inspect_model"]


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "data") and isinstance(getattr(out, "data"), torch.Tensor):  # PackedSequence
        return out.data
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        for o in out.values():
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _probe_loss(kind: str, batch_first: bool):
    def loss(out):
        y = _first_tensor(out)
        if y is None or not y.is_floating_point():
            raise SpecError("inspect: the model's output has no floating-point tensor to build a probe loss from; "
                            "return a dict with a 'loss' callable from the factory")
        if kind == "last" and y.dim() >= 2:
            y = y[:, -1] if batch_first else y[-1]
        return y.pow(2).mean()

    return loss


def _user_error(source: str, what: str, exc: BaseException, extra: str = "") -> SpecError:
    """One line for an exception raised by the user's code: which factory, which part of it (the
    factory, its inputs, the model, the loss, the backward pass), the exception type and the first
    line of its message."""
    msg = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return SpecError(f"inspect {source}: {what} raised {type(exc).__name__}" + (f": {msg}" if msg else "") + extra)


def _call(source: str, what: str, fn, *args, extra=lambda: ""):
    try:
        return fn(*args)
    except GradflowError:
        raise
    except Exception as exc:  # user code: any exception is one line, never a traceback
        raise _user_error(source, what, exc, extra()) from None


def _check_probe_reach(trace, source: str, loss: str, y) -> None:
    """A probe loss must reach every batch item. With ``--loss last`` on an output whose time and
    batch axes were flattened ([T·B, V]) the "last step" is one row, i.e. one batch item: then no
    verdict about the model could be drawn from the trace, so say what happened and what to pass."""
    for key in trace.keys():
        n = trace.norm(key)
        T, B = n.shape
        if B < 2:
            return
        reached = int(((n > 0) & torch.isfinite(n)).any(dim=0).sum())
        if reached >= B:
            return
    shape = list(y.shape) if y is not None else "?"
    why = (" (time and batch flattened into one axis, so its last row is one batch item's last step)"
           if y is not None and y.dim() == 2 and y.shape[0] == T * B else "")
    fix = "pass --loss all, or return a 'loss' callable from the factory" if loss == "last" else \
        "return a 'loss' callable from the factory that uses every batch item"
    raise SpecError(f"inspect {source}: with --loss {loss} the probe loss reaches only {reached} of the {B} batch "
                    f"items: the model's output has shape {shape}{why}; {fix}; nothing was written")


def inspect_model(factory: Callable[[], Any], *, run_dir: Path, label: str, shape=None, tokens=None,
                  batch_first=False, loss="last", passes=1, seed=0, source="", echo=lambda s: None,
                  analysis=None) -> Path:
    """Record ``passes`` backward passes of the factory's model and analyse the last one into ``run_dir``
    (``analysis``: an AnalysisConfig or mapping; its plan is made, printed through ``echo`` and checked
    against the memory budget before anything is written)."""
    from . import record
    from .analysis.config import AnalysisConfig
    from .analysis.pipeline import analyze_trace, plan_trace
    from .training import gradnorm_rows

    made = _call(source, "the factory", factory)
    inputs = loss_fn = None
    if isinstance(made, nn.Module):
        model = made
    elif isinstance(made, dict) and isinstance(made.get("model"), nn.Module):
        model, inputs, loss_fn = made["model"], made.get("inputs"), made.get("loss")
        unknown = set(made) - {"model", "inputs", "loss"}
        if unknown:
            raise SpecError(f"inspect: factory returned unknown key(s) {sorted(unknown)}; expected model, inputs, loss")
    else:
        raise SpecError(f"inspect: factory {source} must return an nn.Module or a dict with 'model', got "
                        f"{type(made).__name__}")
    if inputs is None and shape is None:
        raise SpecError("inspect: the factory returned no inputs; give --shape T,B,F")
    loss_used = "factory" if loss_fn is not None else loss  # what run.json records
    probe = loss_fn is None
    loss_fn = loss_fn or _probe_loss(loss, batch_first)

    def make_inputs(i: int):
        if inputs is not None:
            v = _call(source, "the inputs", inputs, seed + i) if callable(inputs) else inputs
            return v if isinstance(v, tuple) else (v,)
        T, B, F = shape
        g = torch.Generator().manual_seed(seed + i)
        if tokens:
            x = torch.randint(0, tokens, (T, B), generator=g)
        else:
            x = torch.randn(T, B, F, generator=g)
        return (x.transpose(0, 1) if batch_first else x,)

    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    rows = []
    trace = None
    with record(model, keep="states") as rec:
        for i in range(passes):
            model.zero_grad(set_to_none=True)
            args = tuple(a.to(dev) if isinstance(a, torch.Tensor) else a for a in make_inputs(i))
            shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
            out = _call(source, "the model", model, *args, extra=lambda: f" (inputs of shape {shapes})")
            value = _call(source, "the loss", loss_fn, out)
            if not (isinstance(value, torch.Tensor) and value.numel() == 1):
                raise SpecError(f"inspect {source}: the loss must return a scalar tensor, got "
                                f"{type(value).__name__}{list(value.shape) if isinstance(value, torch.Tensor) else ''}")
            _call(source, "the backward pass", value.backward)
            if not rec.traces or len(rec.traces) <= i:
                raise SpecError("inspect: the backward pass reached no recurrent state (does the loss depend on "
                                "the recurrent modules?)")
            if probe:
                _check_probe_reach(rec.trace, source, loss, _first_tensor(out))
            rows.extend(gradnorm_rows(rec.trace, label, i))
    model.zero_grad(set_to_none=True)
    trace = rec.trace
    trace.meta["device"] = str(dev)
    cfg = AnalysisConfig.from_mapping(analysis, where="inspect: analysis")
    if cfg.per_step_loss is None:
        cfg = cfg.replace(per_step_loss=False)  # the probe's δ_t, as recorded
    plans = plan_trace(trace, cfg)  # an over-budget unit stops here, before anything is written
    for p in plans.values():
        echo(f"plan {p.describe()}")
    run_dir = Path(run_dir)
    import pandas as pd

    doc = {"kind": "run", "schema_version": _io.SCHEMA_VERSION, "name": run_dir.name, "label": label,
           "status": "finished", "diverged_at": None,
           "spec": {"inspect": source, "shape": list(shape) if shape else None, "tokens": tokens, "loss": loss_used,
                    "passes": passes, "seed": seed, "batch_first": batch_first},
           "task": {"name": "inspect", "T": trace.shape(trace.keys()[0])[0]},
           "model": {"cell": type(model).__name__, "n_params": sum(p.numel() for p in model.parameters()),
                     "recurrent": sorted({k.module or "<root>" for k in trace.keys()})},
           "clip": {"mode": "none", "threshold": None},
           "meta": {"torch": torch.__version__, "seed": seed, "device": str(dev),
                    "started": _dt.datetime.now().isoformat(timespec="seconds")}}
    trace.save(run_dir / "trace")
    _io.write_csv(run_dir / "gradnorms.csv", pd.DataFrame(rows))
    tables = analyze_trace(trace, cfg, plans=plans)
    doc["analysis"] = {"config": cfg.to_dict(), "plans": [p.to_json() for p in plans.values()]}
    for name, df in tables.items():
        df = df.copy()
        df.insert(0, "run", label)
        _io.write_csv(run_dir / f"{name}.csv", df)
    doc["meta"]["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    _io.write_json(run_dir / "run.json", doc)
    echo(f"recorded {len(trace.keys())} state(s) over {passes} pass(es): " + ", ".join(map(str, trace.keys())))
    return run_dir
