"""A PyTorch Lightning callback that records gradient flow on a schedule and writes a run directory.

Needs the ``lightning`` extra (``pip install gradflow[lightning]``)::

    from gradflow.integrations.lightning import GradflowCallback
    trainer = lightning.Trainer(callbacks=[GradflowCallback("runs/mine", schedule=Schedule(every=50))])

At a training step the schedule selects (``step = trainer.global_step``, the number of optimizer
steps already taken), ``gradflow.record(pl_module, keep=...)`` is entered in
``on_train_batch_start`` and left in ``on_train_batch_end``; it is also left on an exception, at the
end of training and at teardown, so no hook or patched ``forward`` outlives a step. With gradient
accumulation only the first micro-batch of a selected step is recorded.

The run directory follows :mod:`gradflow.training` (all files written atomically via
``gradflow._io``):

* ``run.json``: ``kind="run"``, ``schema_version=1``, ``name``, ``label``, ``status`` (``running`` →
  ``finished`` | ``diverged`` | ``failed``), ``diverged_at`` (first step whose loss or gradient norm is
  NaN/Inf), ``spec`` (``source="lightning"``, ``keep``, ``schedule``), ``model``, ``clip`` (the
  trainer's ``gradient_clip_algorithm``/``gradient_clip_val``), ``meta`` (versions, start/finish),
  ``result`` (``steps_done``), ``faults`` (per recorded step with a NaN/Inf: the first one, see
  :func:`gradflow.integrations.faults.first_nonfinite`), ``error`` when it failed.
* ``metrics.csv``: one row per optimizer step: ``loss`` (from ``training_step``'s output; NaN if
  none), ``metric`` (NaN), ``grad_norm_before`` (global L2 norm in ``on_before_optimizer_step``,
  before Lightning clips), ``grad_norm_after`` (at batch end, after clipping), ``clipped``,
  ``cosine`` = cos(g_raw, g_applied) (a copy of the raw gradient is kept for the step), ``recorded``.
* ``gradnorms.csv`` and ``clip_timesteps.csv`` at recorded steps
  (:func:`gradflow.training.gradnorm_rows` / :func:`~gradflow.training.clip_timestep_rows`).
* ``traces/step_NNNNNNN/`` (``Trace.save``) when ``save_traces=True``.
* with ``analysis=`` (an :class:`~gradflow.analysis.AnalysisConfig` or mapping; needs
  ``keep="states"``): when training ends, the analysis tables of the last recorded step
  (:func:`gradflow.analysis.analyze_trace`: distance, decay, spectra, ..., summary) and, in
  ``run.json``, ``analysis`` (the config and each unit's plan).

Under a multi-process strategy only global rank 0 records and writes; its tables cover its own
shard of the batch.
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from .. import _io
from ..errors import GradflowError
from ..tables import TABLES
from ..training import Schedule, clip_timestep_rows, gradnorm_rows
from . import require
from .faults import first_nonfinite

_L = require("lightning", "lightning")
pl = require("lightning.pytorch", "lightning")

__all__ = ["GradflowCallback"]

_TABLES = ("metrics", "gradnorms", "clip_timesteps")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _loss_of(outputs) -> float:
    v = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v.detach())
    return float(v) if isinstance(v, (int, float)) else math.nan


def _grads(module) -> list[torch.Tensor]:
    return [p.grad for p in module.parameters() if p.grad is not None]


def _norm(grads) -> float:
    return math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads)) if grads else 0.0


class GradflowCallback(pl.Callback):
    """Record ``gradflow.record(pl_module, keep=keep, modules=modules)`` at the steps ``schedule``
    selects and write a run directory at ``run_dir`` (see the module docstring). ``run_dir`` must
    not exist or be empty. ``flush_every``: steps between rewrites of ``metrics.csv``."""

    def __init__(self, run_dir: str | Path, schedule: Schedule = Schedule(every=100), keep: str = "norms",
                 modules: Iterable[str] | str | None = None, *, name: str | None = None, label: str | None = None,
                 save_traces: bool = False, flush_every: int = 25, analysis=None):
        if keep not in ("norms", "full", "states"):
            raise GradflowError(f"GradflowCallback(keep={keep!r}): keep must be one of norms, full, states")
        if not callable(schedule):
            raise GradflowError(f"GradflowCallback(schedule=...): expected a Schedule, got {type(schedule).__name__}")
        self.analysis = None
        if analysis is not None:
            from ..analysis.config import AnalysisConfig

            self.analysis = AnalysisConfig.from_mapping(analysis, where="GradflowCallback(analysis=...)")
            if keep != "states":
                raise GradflowError(f"GradflowCallback(analysis=..., keep={keep!r}): the analysis needs keep='states'")
        self._last_trace = None
        self.run_dir = Path(run_dir)
        self.schedule, self.keep, self.modules = schedule, keep, modules
        self.name = name or self.run_dir.name
        self.label = label or self.name
        self.save_traces, self.flush_every = save_traces, int(flush_every)
        self._rec = None
        self._traces: list = []
        self._rec_step: int | None = None
        self._last_recorded: int | None = None
        self._before: float | None = None
        self._raw: torch.Tensor | None = None
        self._rows: dict[str, list[dict]] = {t: [] for t in _TABLES}
        self._dirty: set[str] = set()
        self._doc: dict | None = None

    # ------------------------------------------------------------------ files
    def _active(self, trainer) -> bool:
        return bool(trainer.is_global_zero)

    def _frame(self, table: str):
        import pandas as pd

        rows = self._rows[table]
        cols = list(TABLES[table])
        extra = [c for c in (rows[0] if rows else {}) if c not in cols]
        return pd.DataFrame(rows, columns=cols + extra)

    def _flush(self) -> None:
        for t in sorted(self._dirty):
            _io.write_csv(self.run_dir / f"{t}.csv", self._frame(t))
        self._dirty.clear()

    def _write_json(self) -> None:
        _io.write_json(self.run_dir / "run.json", self._doc)

    # ------------------------------------------------------------------ recording
    def _exit(self) -> None:
        rec, self._rec = self._rec, None
        if rec is not None:
            rec.__exit__(None, None, None)

    def on_fit_start(self, trainer, pl_module) -> None:
        from ..recording import find_recurrent

        if not self._active(trainer):
            return
        if not find_recurrent(pl_module):
            raise GradflowError(
                f"GradflowCallback: {type(pl_module).__name__} has no recurrent module gradflow can record"
            )
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise GradflowError(f"run directory {self.run_dir} already exists and is not empty")
        import gradflow

        clip_val = trainer.gradient_clip_val
        self._doc = {
            "kind": "run", "schema_version": _io.SCHEMA_VERSION, "name": self.name, "label": self.label,
            "status": "running", "diverged_at": None,
            "spec": {"source": "lightning", "keep": self.keep, "schedule": getattr(self.schedule, "describe", dict)(),
                     "modules": None if self.modules is None else list([self.modules] if isinstance(self.modules, str)
                                                                       else self.modules)},
            "task": {},
            "model": {"cell": type(pl_module).__name__, "n_params": sum(p.numel() for p in pl_module.parameters())},
            "clip": {"mode": "none" if not clip_val else (trainer.gradient_clip_algorithm or "norm"),
                     "threshold": float(clip_val) if clip_val else None},
            "meta": {"torch": torch.__version__, "lightning": _L.__version__, "gradflow": gradflow.__version__,
                     "numpy": np.__version__, "started": _now(), "finished": None},
            "result": None, "faults": [],
        }
        self._write_json()
        self._dirty.update(_TABLES)
        self._flush()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self._active(trainer) or self._doc is None:
            return
        self._before, self._raw = None, None
        step = int(trainer.global_step)
        if self._rec is None and step != self._last_recorded and self.schedule(step):
            import gradflow

            self._traces = []
            rec = gradflow.record(pl_module, keep=self.keep, modules=self.modules, callback=self._traces.append,
                                  keep_traces=False)
            rec.__enter__()
            self._rec, self._rec_step, self._last_recorded = rec, step, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._active(trainer) or self._doc is None:
            return
        grads = _grads(pl_module)
        self._before = _norm(grads)
        self._raw = torch.cat([g.detach().reshape(-1) for g in grads]).clone() if grads else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._active(trainer) or self._doc is None:
            return
        recorded = self._rec is not None
        try:
            self._exit()
        finally:
            self._end_step(trainer, pl_module, outputs, recorded)

    def _end_step(self, trainer, pl_module, outputs, recorded: bool) -> None:
        if self._before is None and not recorded:
            return  # an accumulation micro-batch: no optimizer step, nothing recorded
        step = int(trainer.global_step) - (1 if self._before is not None else 0)
        loss = _loss_of(outputs)
        before = self._before if self._before is not None else math.nan
        grads = _grads(pl_module)
        after = _norm(grads) if self._before is not None else math.nan
        cos = math.nan
        if self._raw is not None and grads:
            new = torch.cat([g.detach().reshape(-1) for g in grads]).double()
            raw = self._raw.double()
            na, nb = float(raw.norm()), float(new.norm())
            cos = float(raw @ new) / (na * nb) if na > 0 and nb > 0 else math.nan
        if self._before is not None:
            self._rows["metrics"].append({
                "run": self.label, "step": step, "loss": loss, "metric": math.nan, "grad_norm_before": before,
                "grad_norm_after": after, "clipped": bool(after < before * (1 - 1e-9)), "cosine": cos,
                "recorded": recorded})
            self._dirty.add("metrics")
            if (not math.isfinite(loss) or not math.isfinite(before)) and self._doc["diverged_at"] is None:
                self._doc["diverged_at"] = step
                self._write_json()
        if recorded:
            rstep = self._rec_step
            for i, tr in enumerate(self._traces):
                tr.meta.update({"run": self.label, "step": rstep})
                if self.analysis is not None:
                    self._last_trace = tr
                self._rows["gradnorms"].extend(gradnorm_rows(tr, self.label, rstep))
                if self._before is not None:
                    self._rows["clip_timesteps"].extend(clip_timestep_rows(tr, self.label, rstep, before, after))
                if self.save_traces:
                    tr.save(self.run_dir / "traces" / (f"step_{rstep:07d}" + (f"_{i}" if i else "")))
                fault = first_nonfinite(tr, order=pl_module)
                if fault is not None:
                    self._doc["faults"].append(fault)
                    self._write_json()
            self._traces = []
            self._dirty.update(("gradnorms", "clip_timesteps"))
        if recorded or len(self._rows["metrics"]) % self.flush_every == 0:
            self._flush()

    # ------------------------------------------------------------------ endings
    def _finish(self, trainer, status: str, error: str | None = None) -> None:
        self._exit()
        if not self._active(trainer) or self._doc is None or self._doc["status"] != "running":
            return
        if status == "finished" and self._doc["diverged_at"] is not None:
            status = "diverged"
        self._doc["status"] = status
        if error is not None:
            self._doc["error"] = error
        self._doc["meta"]["finished"] = _now()
        self._doc["result"] = {"steps_done": int(trainer.global_step)}
        self._dirty.update(_TABLES)
        self._flush()
        if status in ("finished", "diverged") and self._last_trace is not None:
            self._analyse(self._last_trace)
        self._write_json()

    def _analyse(self, trace) -> None:
        """The analysis tables of ``trace`` (the last recorded step) and its plans into the run directory."""
        from ..analysis.pipeline import analyze_trace, plan_trace

        cfg = self.analysis if self.analysis.per_step_loss is not None else self.analysis.replace(per_step_loss=False)
        plans = plan_trace(trace, cfg)
        for name, df in analyze_trace(trace, cfg, plans=plans).items():
            df = df.copy()
            df.insert(0, "run", self.label)
            _io.write_csv(self.run_dir / f"{name}.csv", df)
        self._doc["analysis"] = {"config": cfg.to_dict(), "step": trace.meta.get("step"),
                                 "plans": [p.to_json() for p in plans.values()]}

    def on_train_end(self, trainer, pl_module) -> None:
        self._finish(trainer, "finished")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._finish(trainer, "failed", f"{type(exception).__name__}: {exception}".splitlines()[0])

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._exit()
