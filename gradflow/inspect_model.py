"""Record and analyse a user's own model: the engine behind ``gradflow inspect``."""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import _io
from .errors import SpecError

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


def inspect_model(factory: Callable[[], Any], *, run_dir: Path, label: str, shape=None, tokens=None,
                  batch_first=False, loss="last", passes=1, seed=0, source="", echo=lambda s: None) -> Path:
    from . import record
    from .study import analyse_trace
    from .training import gradnorm_rows

    made = factory()
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
    loss_fn = loss_fn or _probe_loss(loss, batch_first)

    def make_inputs(i: int):
        if inputs is not None:
            v = inputs(seed + i) if callable(inputs) else inputs
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
            try:
                out = model(*args)
            except (RuntimeError, TypeError) as exc:
                shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
                raise SpecError(f"inspect: the model failed on inputs of shape {shapes}: "
                                f"{str(exc).splitlines()[0]}") from None
            loss_fn(out).backward()
            if not rec.traces or len(rec.traces) <= i:
                raise SpecError("inspect: the backward pass reached no recurrent state (does the loss depend on "
                                "the recurrent modules?)")
            rows.extend(gradnorm_rows(rec.trace, label, i))
    model.zero_grad(set_to_none=True)
    trace = rec.trace
    run_dir = Path(run_dir)
    import pandas as pd

    doc = {"kind": "run", "schema_version": _io.SCHEMA_VERSION, "name": run_dir.name, "label": label,
           "status": "finished", "diverged_at": None,
           "spec": {"inspect": source, "shape": list(shape) if shape else None, "tokens": tokens, "loss": loss,
                    "passes": passes, "seed": seed, "batch_first": batch_first},
           "task": {"name": "inspect", "T": trace.shape(trace.keys()[0])[0]},
           "model": {"cell": type(model).__name__, "n_params": sum(p.numel() for p in model.parameters()),
                     "recurrent": sorted({k.module or "<root>" for k in trace.keys()})},
           "clip": {"mode": "none", "threshold": None},
           "meta": {"torch": torch.__version__, "seed": seed, "device": str(dev),
                    "started": _dt.datetime.now().isoformat(timespec="seconds")}}
    trace.save(run_dir / "trace")
    _io.write_csv(run_dir / "gradnorms.csv", pd.DataFrame(rows))
    from .spec import ANALYSIS_DEFAULTS

    tables = analyse_trace(trace, dict(ANALYSIS_DEFAULTS))
    for name, df in tables.items():
        df = df.copy()
        df.insert(0, "run", label)
        _io.write_csv(run_dir / f"{name}.csv", df)
    doc["meta"]["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    _io.write_json(run_dir / "run.json", doc)
    echo(f"recorded {len(trace.keys())} state(s) over {passes} pass(es): " + ", ".join(map(str, trace.keys())))
    return run_dir
