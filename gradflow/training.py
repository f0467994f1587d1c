"""A small training loop that records gradient flow while it trains, and clipping experiments.

``train(task, model, TrainConfig(...), run_dir=...)`` runs ``steps`` optimizer steps on fresh batches
of a :mod:`gradflow.tasks` task and writes a run directory as it goes (atomic writes; a killed run
leaves a readable directory):

* ``run.json`` — ``{"kind": "run", "schema_version": 1, "name", "label", "status": "running" |
  "finished" | "diverged" | "failed", "diverged_at": step | null, "spec": resolved settings, "task":
  Task.describe(), "model": model.describe(), "clip": {"mode", "threshold"}, "meta": {versions,
  seed, device, started, finished, git}, "result": {final evaluation}}``.
* ``metrics.csv`` — one row per step (table ``metrics`` of :mod:`gradflow.tables`): ``loss``,
  ``metric`` (on the training batch), ``grad_norm_before``/``grad_norm_after`` (global L2 norm of
  all parameter gradients, float64, before and after clipping), ``clipped`` (clipping changed the
  gradient), ``cosine`` = cos(g_raw, g_applied), the cosine between the raw gradient and the one
  handed to the optimizer (1 under norm clipping, < 1 when clipping by value bends it); extra
  columns ``update_cosine`` = cos(-g_raw, θ_new - θ_old) (the step the optimizer actually took),
  ``recorded``, ``lr``, ``seconds``.
* ``gradnorms.csv`` — at recorded steps, per state key × t: quantiles over the batch of
  log10 ||dL/ds_t|| (``gradflow.record(model, keep="norms")``). Quantiles interpolate linearly
  over the finite norms; an exact zero (float underflow) is log10 0 = -inf and a quantile whose
  lower neighbour is -inf is -inf. ``frac_zero`` counts exact zeros, ``frac_nonfinite`` NaN/Inf
  norms; both over ``n`` valid entries. ``mean_log10`` averages the finite positive norms.
  ``distance`` = T-1-t (direction 0) or t (direction 1).
* ``clip_timesteps.csv`` — at recorded steps, per key × t, ``when="before"``: log10 of the norm of
  the batch's gradient at step t, sqrt(Σ_b ||dL/ds_t,b||²); ``when="after"``: the same scaled by the
  clip factor ``grad_norm_after / grad_norm_before``. For clipping by norm that factor is exactly
  what multiplies every per-timestep contribution; clipping by value acts elementwise on the
  parameter gradient and has no per-timestep form, so "after" is the effective global factor.
* ``trace/`` — after the last step, one extra pass on a fixed evaluation batch recorded with
  ``keep="states"`` (``Trace.save``), so analyses can compute Jacobians.

A step whose loss or gradient norm is NaN/Inf marks the run ``diverged`` at that step: the row is
written, the update is not applied, the loop stops.
"""

from __future__ import annotations

import datetime as _dt
import math
import subprocess
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from . import _io
from .errors import GradflowError, SpecError
from .tables import TABLES

__all__ = [
    "Clip",
    "Schedule",
    "TrainConfig",
    "RunResult",
    "train",
    "train_task",
    "clip_gradients",
    "gradnorm_rows",
    "clip_timestep_rows",
    "ClippingComparison",
    "clipping_experiment",
]

CLIP_MODES = ("none", "norm", "value")
OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
              "rmsprop": torch.optim.RMSprop}
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# ---------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Clip:
    """Gradient clipping: ``mode`` ``"none"``, ``"norm"`` (rescale all gradients together so that
    their global L2 norm is min(‖g‖, threshold)) or ``"value"`` (clamp every element to
    [-threshold, threshold])."""

    mode: str = "none"
    threshold: float | None = None

    def __post_init__(self):
        if self.mode not in CLIP_MODES:
            raise SpecError(f"clip mode {self.mode!r} is not one of {', '.join(CLIP_MODES)}")
        if self.mode == "none":
            if self.threshold is not None:
                raise SpecError("clip mode 'none' takes no threshold")
        elif not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold > 0):
            raise SpecError(f"clip mode {self.mode!r} needs a positive threshold, got {self.threshold!r}")

    def describe(self) -> dict:
        return {"mode": self.mode, "threshold": None if self.threshold is None else float(self.threshold)}


@dataclass(frozen=True)
class Schedule:
    """When to record (a pure function step -> bool): every ``every`` steps (0: never), at
    ``per_decade`` log-spaced steps per decade (step 0 and round(10^(k/per_decade)), k = 0, 1, ...),
    and at the explicit ``steps``; a step is recorded if any rule selects it."""

    every: int = 0
    per_decade: int = 0
    steps: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("every", "per_decade"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SpecError(f"schedule {name} must be an integer >= 0, got {v!r}")
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))

    @classmethod
    def every_n(cls, n: int) -> "Schedule":
        return cls(every=n)

    @classmethod
    def log_spaced(cls, per_decade: int = 4) -> "Schedule":
        return cls(per_decade=per_decade)

    @classmethod
    def never(cls) -> "Schedule":
        return cls()

    def __call__(self, step: int) -> bool:
        if step in self.steps or (self.every and step % self.every == 0):
            return True
        if self.per_decade:
            if step == 0:
                return True
            k = round(self.per_decade * math.log10(step))
            return any(k + d >= 0 and round(10 ** ((k + d) / self.per_decade)) == step for d in (-1, 0, 1))
        return False

    def describe(self) -> dict:
        return {"every": self.every, "per_decade": self.per_decade, "steps": list(self.steps)}


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. ``optimizer`` in sgd | adam | adamw | rmsprop (``momentum`` for sgd and
    rmsprop); ``eval_batch`` sequences form the fixed evaluation batch of the final recorded pass;
    ``flush_every`` steps between rewrites of ``metrics.csv``; ``final_trace`` saves ``trace/``."""

    steps: int = 1000
    batch: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    seed: int = 0
    device: str = "cpu"
    clip: Clip = field(default_factory=Clip)
    schedule: Schedule = field(default_factory=lambda: Schedule(every=100))
    eval_batch: int = 256
    flush_every: int = 25
    final_trace: bool = True

    def __post_init__(self):
        if isinstance(self.clip, Mapping):
            object.__setattr__(self, "clip", Clip(**self.clip))
        if isinstance(self.schedule, Mapping):
            object.__setattr__(self, "schedule", Schedule(**self.schedule))
        for name in ("steps", "batch", "eval_batch", "flush_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpecError(f"training {name} must be an integer >= 1, got {v!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise SpecError(f"learning rate must be a positive number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SpecError(f"seed must be an integer >= 0, got {self.seed!r}")

    def describe(self) -> dict:
        d = asdict(self)
        d["clip"], d["schedule"] = self.clip.describe(), self.schedule.describe()
        return d

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        kw: dict[str, Any] = {"lr": self.lr}
        if self.optimizer in ("sgd", "rmsprop"):
            kw["momentum"] = self.momentum
        elif self.momentum:
            raise SpecError(f"momentum applies to sgd and rmsprop, not {self.optimizer}")
        return OPTIMIZERS[self.optimizer](params, **kw)


# ---------------------------------------------------------------------------------- numerics
def _global_norm(grads: list[torch.Tensor]) -> float:
    if not grads:
        return 0.0
    return math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in grads))


def clip_gradients(params, clip: Clip) -> dict:
    """Clip the ``.grad`` of ``params`` in place. Returns ``grad_norm_before``, ``grad_norm_after``
    (global L2 norms in float64), ``clipped`` and ``cosine`` = cos(g_raw, g_clipped)."""
    grads = [p.grad for p in params if p.grad is not None]
    before = _global_norm(grads)
    clipped = False
    if clip.mode == "none" or not math.isfinite(before):
        return {"grad_norm_before": before, "grad_norm_after": before, "clipped": False,
                "cosine": 1.0 if before > 0 else float("nan")}
    raw = torch.cat([g.detach().double().reshape(-1) for g in grads])
    c = float(clip.threshold)
    if clip.mode == "norm":
        if before > c:
            scale = c / before
            for g in grads:
                g.mul_(scale)
            clipped = True
    else:
        clipped = any(bool((g.abs() > c).any()) for g in grads)
        for g in grads:
            g.clamp_(-c, c)
    new = torch.cat([g.detach().double().reshape(-1) for g in grads])
    after = float(new.norm())
    cos = float(raw @ new) / (before * after) if before > 0 and after > 0 else float("nan")
    return {"grad_norm_before": before, "grad_norm_after": after, "clipped": clipped, "cosine": cos}


def _log_quantiles(logs: np.ndarray) -> np.ndarray:
    """[T, B] log10 norms (NaN = missing/nonfinite, -inf = zero) -> [T, len(QUANTILES)] linear
    quantiles per row over the non-NaN entries; -inf where the lower neighbour is -inf."""
    s = np.sort(logs, axis=1)  # NaN last, -inf first
    m = (~np.isnan(s)).sum(axis=1)
    out = np.full((s.shape[0], len(QUANTILES)), np.nan)
    ok = m > 0
    for j, q in enumerate(QUANTILES):
        pos = q * (np.maximum(m, 1) - 1)
        lo, hi = np.floor(pos).astype(int), np.ceil(pos).astype(int)
        a = np.take_along_axis(s, lo[:, None], 1)[:, 0]
        b = np.take_along_axis(s, hi[:, None], 1)[:, 0]
        with np.errstate(invalid="ignore"):
            v = np.where(np.isneginf(a), -np.inf, a + (b - a) * (pos - lo))
        out[:, j] = np.where(ok, v, np.nan)
    return out


def gradnorm_rows(trace, run: str, step: int) -> list[dict]:
    """Rows of the ``gradnorms`` table for one recorded trace (see the module docstring)."""
    rows = []
    for key in trace.keys():
        n = trace.norm(key).numpy().astype(np.float64)
        mask = trace.mask(key).numpy()
        T = n.shape[0]
        valid = mask.sum(axis=1)
        finite = np.isfinite(n) & mask
        zero = (n == 0) & mask
        nonfinite = (~np.isfinite(n)) & mask
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(finite, np.log10(n), np.nan)
            pos = finite & (n > 0)
            mean = np.where(pos.any(axis=1), np.nansum(np.where(pos, logs, 0.0), axis=1) / pos.sum(axis=1), np.nan)
            fz, fn = zero.sum(axis=1) / valid, nonfinite.sum(axis=1) / valid
        qs = _log_quantiles(logs)
        for t in range(T):
            rows.append({
                "run": run, "step": step, "key": str(key), "module": key.module, "layer": key.layer,
                "direction": key.direction, "state": key.state, "t": t,
                "distance": T - 1 - t if key.direction == 0 else t, "n": int(valid[t]),
                **{f"q{int(round(q * 100)):02d}": float(qs[t, j]) for j, q in enumerate(QUANTILES)},
                "mean_log10": float(mean[t]), "frac_zero": float(fz[t]), "frac_nonfinite": float(fn[t]),
            })
    return rows


def clip_timestep_rows(trace, run: str, step: int, before: float, after: float) -> list[dict]:
    """Rows of the ``clip_timesteps`` table: per key × t, log10 sqrt(Σ_b ||dL/ds_t,b||²) before
    clipping and that plus log10(after/before) after it."""
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = math.log10(after / before) if before > 0 and math.isfinite(before) and after > 0 else 0.0
    rows = []
    for key in trace.keys():
        n = trace.norm(key).numpy().astype(np.float64)
        mask = trace.mask(key).numpy()
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            tot = np.log10(np.sqrt(np.where(mask, n, 0.0) ** 2 @ np.ones(n.shape[1])))
        for t in range(n.shape[0]):
            for when, v in (("before", tot[t]), ("after", tot[t] + shift)):
                rows.append({"run": run, "step": step, "key": str(key), "t": t, "when": when, "log10_norm": float(v)})
    return rows


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")


# ---------------------------------------------------------------------------------- the loop
@dataclass
class RunResult:
    """What :func:`train` returns: the run's status and tables (pandas DataFrames, as written), the
    final evaluation and its ``keep="states"`` trace (None when not made)."""

    name: str
    label: str
    status: str
    diverged_at: int | None
    run_dir: Path | None
    metrics: Any
    gradnorms: Any
    clip_timesteps: Any
    result: dict
    trace: Any = None
    model: nn.Module | None = None
    task: Any = None

    @property
    def eval_metric(self) -> float:
        return self.result.get("eval_metric", float("nan"))

    @property
    def solved(self) -> bool:
        return bool(self.result.get("solved", False))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _finite_or_none(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else (None if v is None else str(v))


class _RunWriter:
    """Owns the run directory (or nothing when ``run_dir`` is None) and the tables kept in memory."""

    def __init__(self, run_dir: Path | None, doc: dict):
        self.dir, self.doc = run_dir, doc
        self.metrics: list[dict] = []
        self.gradnorms: list[dict] = []
        self.clips: list[dict] = []
        self._dirty = set()
        if self.dir is not None:
            if self.dir.exists() and any(self.dir.iterdir()):
                raise GradflowError(f"run directory {self.dir} already exists and is not empty")
            self.dir.mkdir(parents=True, exist_ok=True)
        self.write_json()
        for t in ("metrics", "gradnorms", "clip_timesteps"):
            self._dirty.add(t)
        self.flush()

    def frame(self, table: str):
        import pandas as pd

        rows = {"metrics": self.metrics, "gradnorms": self.gradnorms, "clip_timesteps": self.clips}[table]
        cols = list(TABLES[table])
        extra = [c for c in (rows[0] if rows else {}) if c not in cols]
        return pd.DataFrame(rows, columns=cols + extra)

    def add(self, table: str, rows: list[dict]) -> None:
        {"metrics": self.metrics, "gradnorms": self.gradnorms, "clip_timesteps": self.clips}[table].extend(rows)
        self._dirty.add(table)

    def flush(self) -> None:
        if self.dir is not None:
            for t in sorted(self._dirty):
                _io.write_csv(self.dir / f"{t}.csv", self.frame(t))
        self._dirty.clear()

    def write_json(self) -> None:
        if self.dir is not None:
            _io.write_json(self.dir / "run.json", self.doc)


def train(task, model: nn.Module, config: TrainConfig | None = None, *, run_dir: str | Path | None = None,
          name: str | None = None, label: str | None = None, progress: bool = True,
          spec: Mapping[str, Any] | None = None) -> RunResult:
    """Train ``model`` on ``task`` (see the module docstring). Batches come from
    ``numpy.random.default_rng([seed, 0])``, the evaluation batch from ``[seed, 1]``, and torch's
    RNG (dropout) is seeded with ``seed`` inside a fork, so the global RNG is left alone."""
    import gradflow
    from tqdm.auto import tqdm

    cfg = config or TrainConfig()
    device = torch.device(cfg.device)
    run_dir = None if run_dir is None else Path(run_dir)
    name = name or (run_dir.name if run_dir is not None else f"{task.name}-{getattr(model, 'cell', 'model')}")
    label = label or name
    describe = getattr(model, "describe", None)
    model_doc = describe() if callable(describe) else {
        "cell": type(model).__name__, "n_params": sum(p.numel() for p in model.parameters())}
    doc = {
        "kind": "run", "schema_version": _io.SCHEMA_VERSION, "name": name, "label": label, "status": "running",
        "diverged_at": None,
        "spec": {"task": task.name, "task_options": task.options(), "cell": model_doc.get("cell"),
                 "model_options": {k: model_doc.get(k) for k in ("hidden", "layers", "dropout", "init", "gain",
                                                                  "forget_bias") if k in model_doc},
                 "train": cfg.describe(), **dict(spec or {})},
        "task": task.describe(), "model": model_doc, "clip": cfg.clip.describe(),
        "meta": {"torch": torch.__version__, "gradflow": gradflow.__version__, "numpy": np.__version__,
                 "seed": cfg.seed, "device": str(device), "started": _now(), "finished": None,
                 "git": _git_commit()},
        "result": None,
    }
    w = _RunWriter(run_dir, doc)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = cfg.make_optimizer(params)
    data = np.random.default_rng([cfg.seed, 0])
    status, diverged_at, final_trace, step = "finished", None, None, -1
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, desc=label, disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            for step in range(cfg.steps):
                batch = task.sample(cfg.batch, data).to(device)
                model.train()
                opt.zero_grad(set_to_none=True)
                recorded = cfg.schedule(step)
                if recorded:
                    with gradflow.record(model, keep="norms") as rec:
                        out = model(batch.x)
                        loss = task.loss(out, batch.y)
                        loss.backward()
                    trace = rec.trace
                else:
                    out = model(batch.x)
                    loss = task.loss(out, batch.y)
                    loss.backward()
                    trace = None
                lv = float(loss.detach())
                metric = task.metric(out.detach(), batch.y)
                old = torch.cat([p.detach().reshape(-1).double() for p in params])
                raw = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                                 .double() for p in params])
                clip = clip_gradients(params, cfg.clip)
                bad = not (math.isfinite(lv) and math.isfinite(clip["grad_norm_before"]))
                upd = float("nan")
                if not bad:
                    opt.step()
                    new = torch.cat([p.detach().reshape(-1).double() for p in params])
                    upd = _cos(-raw, new - old)
                w.add("metrics", [{"run": label, "step": step, "loss": lv, "metric": metric, **clip,
                                   "update_cosine": upd, "recorded": recorded,
                                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}])
                if trace is not None:
                    w.add("gradnorms", gradnorm_rows(trace, label, step))
                    w.add("clip_timesteps", clip_timestep_rows(trace, label, step, clip["grad_norm_before"],
                                                                clip["grad_norm_after"]))
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{lv:.4g}", metric=f"{metric:.4g}")
                if bad and trace is None:
                    # locate the first NaN/Inf: redo this step's pass (parameters not yet updated) recorded
                    model.zero_grad(set_to_none=True)
                    with gradflow.record(model, keep="norms") as rec:
                        task.loss(model(batch.x), batch.y).backward()
                    trace = rec.traces[-1] if rec.traces else None
                    if trace is not None:
                        w.add("gradnorms", gradnorm_rows(trace, label, step))
                if trace is not None and doc.get("faults") is None:
                    from .integrations.faults import first_nonfinite

                    fault = first_nonfinite(trace)
                    if fault is not None:
                        doc["faults"] = {"step": step, **{k: fault[k] for k in (
                            "key", "module", "layer", "direction", "state", "t", "b", "value") if k in fault}}
                if bad:
                    status, diverged_at = "diverged", step
                    doc.update(status=status, diverged_at=step)
                    w.flush()
                    w.write_json()
                    break
                if recorded or (step + 1) % cfg.flush_every == 0:
                    w.flush()
            w.flush()
            result = {"steps_done": step + 1}
            if cfg.final_trace:
                final_trace, ev = _final_pass(task, model, cfg, device, label, step)
                result.update(ev)
                if run_dir is not None:
                    final_trace.save(run_dir / "trace")
            result["chance"] = task.chance_metric
    except BaseException as exc:
        doc.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0])
        doc["meta"]["finished"] = _now()
        w.flush()
        w.write_json()
        raise
    finally:
        bar.close()
    doc["status"] = status
    doc["meta"]["finished"] = _now()
    doc["result"] = {k: _finite_or_none(v) for k, v in result.items()}
    w.write_json()
    return RunResult(name, label, status, diverged_at, run_dir, w.frame("metrics"), w.frame("gradnorms"),
                     w.frame("clip_timesteps"), result, final_trace, model, task)


def _final_pass(task, model, cfg: TrainConfig, device, label: str, step: int):
    """One recorded pass with keep='states' on the fixed evaluation batch; no update."""
    import gradflow

    batch = task.sample_eval(cfg.eval_batch, np.random.default_rng([cfg.seed, 1])).to(device)
    model.eval()
    model.zero_grad(set_to_none=True)
    with gradflow.record(model, keep="states") as rec:
        out = model(batch.x)
        loss = task.loss(out, batch.y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    tr = rec.trace
    tr.meta.update({"run": label, "step": step, "task": task.name, "batch": "eval", "eval_batch": cfg.eval_batch,
                    "seed": cfg.seed})
    lv, metric = float(loss.detach()), task.metric(out.detach(), batch.y)
    return tr, {"eval_loss": lv, "eval_metric": metric, "solved": task.solved(metric)}


def train_task(task: str, cell: str, *, task_options: Mapping | None = None, model_options: Mapping | None = None,
               config: TrainConfig | None = None, run_dir: str | Path | None = None, name: str | None = None,
               label: str | None = None, progress: bool = True, **overrides) -> RunResult:
    """Build ``get_task(task, **task_options)`` and ``model_for_task(task, cell, seed=seed,
    **model_options)`` and :func:`train` them; ``overrides`` replace fields of ``config``."""
    from .models import model_for_task
    from .tasks import get_task

    cfg = replace(config or TrainConfig(), **overrides) if overrides else (config or TrainConfig())
    t = get_task(task, **dict(task_options or {}))
    m = model_for_task(t, cell, seed=cfg.seed, **dict(model_options or {}))
    return train(t, m, cfg, run_dir=run_dir, name=name, label=label or cell, progress=progress)


# ---------------------------------------------------------------------------------- clipping
EXPLODING = {"init": "gaussian", "gain": 2.0, "hidden": 32}


@dataclass
class ClippingComparison:
    """The same task, model initialisation, batches and seed trained without and with clipping.
    ``runs`` maps label -> :class:`RunResult`; ``metrics`` / ``gradnorms`` / ``clip_timesteps`` are
    the runs' tables stacked (column ``run`` = label)."""

    runs: dict[str, RunResult]
    metrics: Any
    gradnorms: Any
    clip_timesteps: Any

    def summary(self):
        """One row per run: status, diverged_at, eval metric, solved, chance, fraction of steps
        clipped, largest raw gradient norm, mean loss over the last tenth of the steps."""
        import pandas as pd

        rows = []
        for label, r in self.runs.items():
            m = r.metrics
            tail = m["loss"].iloc[-max(1, len(m) // 10):]
            rows.append({"run": label, "status": r.status, "diverged_at": r.diverged_at,
                         "eval_metric": r.eval_metric, "solved": r.solved, "chance": r.task.chance_metric,
                         "frac_clipped": float(m["clipped"].mean()),
                         "max_grad_norm": float(m["grad_norm_before"].max()),
                         "final_loss": float(tail.mean())})
        return pd.DataFrame(rows)


def clipping_experiment(task: str = "checksum", cell: str = "rnn_relu", *, clip: Clip = Clip("norm", 1.0),
                        task_options: Mapping | None = None, model_options: Mapping | None = None,
                        config: TrainConfig | None = None, root: str | Path | None = None,
                        progress: bool = False, **overrides) -> ClippingComparison:
    """Train ``cell`` on ``task`` twice with the same seed — without clipping and with ``clip`` —
    side by side. Defaults are an exploding regime: a ReLU RNN whose recurrent matrix is
    N(0, gain²/H) with gain 2 (spectral radius ≈ 2), checksum with T = 30, plain SGD (lr 0.01,
    300 steps). Runs are written to ``root/noclip`` and ``root/clip`` when ``root`` is given."""
    import pandas as pd

    if clip.mode == "none":
        raise SpecError("clipping_experiment needs a clipping mode other than 'none'")
    base = TrainConfig(steps=300, batch=32, optimizer="sgd", lr=0.01, schedule=Schedule(every=25))
    cfg = replace(config or base, **overrides)
    topts = {"T": 30} if task == "checksum" and task_options is None else dict(task_options or {})
    mopts = dict(EXPLODING if model_options is None else model_options)
    runs = {}
    for sub, c, label in (("noclip", Clip(), cell), ("clip", clip, f"{cell}+clip_{clip.mode}")):
        runs[label] = train_task(task, cell, task_options=topts, model_options=mopts, config=replace(cfg, clip=c),
                                 run_dir=None if root is None else Path(root) / sub, name=sub, label=label,
                                 progress=progress)
    cat = {t: pd.concat([getattr(r, t) for r in runs.values()], ignore_index=True)
           for t in ("metrics", "gradnorms", "clip_timesteps")}
    return ClippingComparison(runs, cat["metrics"], cat["gradnorms"], cat["clip_timesteps"])
