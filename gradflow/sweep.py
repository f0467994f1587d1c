"""Sweeps: a study spec whose runs are the cartesian product of axes, run in parallel.

A sweep spec has the tables of a study spec (:mod:`gradflow.spec`: name, title, claim, task, model,
train, analysis) and, instead of ``[[runs]]``, a ``[sweep]`` table of axes, each a list of values::

    [sweep]
    cell = ["rnn_tanh", "lstm", "gru"]     # required: the cell of every run
    gain = [0.5, 1.0, 2.0]                 # a model key (hidden, layers, dropout, init, gain,
                                           #   forget_bias), also spelt "model.gain"
    "task.T" = [20, 50]                    # any option of the task
    "train.clip" = [{ mode = "none" }, { mode = "norm", threshold = 1.0 }]   # or "train.clip.threshold"
    seed = [0, 1]                          # short for "train.seed"; any "train.<key>" works

Runs are the product of the axes in the order written (the first axis varies slowest). A run's
label joins the axis values, ``"lstm gain=0.5 T=20 clip=norm@1.0 seed=0"``, and its directory is the
label made file-safe. The expanded runs are validated exactly like the ``[[runs]]`` of a study spec.

:func:`run_sweep` trains and analyses every run into ``<out>/<run dir>`` with an engine: ``"local"``
(a pool of worker processes, one per core by default, torch single-threaded in each) or ``"ray"``
(each run a Ray task; the ``ray`` extra). A run whose directory holds a finished run of the same
settings, analysed with the same analysis settings (``analysis.json``), is skipped; a run that
raises is marked ``failed`` in its ``run.json`` with the error and the sweep goes on. At the end (and
after every run) ``<out>/study.json`` lists the runs, so ``gradflow report <out>`` reads the whole
sweep, and ``<out>/sweep.csv`` holds one row per run x state key: the axis values, status,
eval_metric, chance, solved, diverged_at, decay_rate (with ci_low/ci_high), horizon, error.

Workers write run directories themselves: with a multi-node Ray cluster ``out`` must be on a
file system every node sees.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from . import _io
from .errors import GradflowError, SpecError
from .spec import CLIP_KEYS, MODEL_KEYS, TOP_KEYS, TRAIN_KEYS, RunSpec, StudySpec, build_run, parse_spec

__all__ = ["SweepSpec", "RunOutcome", "SweepResult", "expand_sweep", "load_sweep", "run_sweep", "sweep_table",
           "ENGINES"]

ENGINES = ("local", "ray")
ANALYSED = "analysis.json"
TABLE_COLUMNS = ("status", "eval_metric", "chance", "solved", "diverged_at", "key", "decay_rate", "ci_low",
                 "ci_high", "horizon", "horizon_censored", "error")


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep: the expanded study (``study.runs``), the axes ``(key, values)`` in the
    order written, and for each run its axis values (``points[i]`` belongs to ``study.runs[i]``)."""

    study: StudySpec
    axes: tuple[tuple[str, tuple], ...]
    points: tuple[Mapping[str, Any], ...]

    @property
    def name(self) -> str:
        return self.study.name

    @property
    def runs(self) -> tuple[RunSpec, ...]:
        return self.study.runs

    def resolved(self) -> dict:
        return {**self.study.resolved(), "axes": {k: list(v) for k, v in self.axes}}


# ---------------------------------------------------------------------------------- expansion
def _axis_path(key: str, task_keys: set, source: str) -> tuple[str, ...]:
    """The run-table path an axis key sets, or a SpecError naming the nearest valid key."""
    parts = tuple(key.split("."))
    if key == "cell":
        return ("cell",)
    if key == "seed":
        return ("train", "seed")
    if key in MODEL_KEYS:
        return ("model", key)
    if len(parts) == 2 and parts[0] == "model" and parts[1] in MODEL_KEYS:
        return parts
    if len(parts) == 2 and parts[0] == "train" and parts[1] in TRAIN_KEYS:
        return parts
    if len(parts) == 3 and parts[:2] == ("train", "clip") and parts[2] in CLIP_KEYS:
        return parts
    if len(parts) == 2 and parts[0] == "task" and parts[1]:
        return parts
    valid = sorted({"cell", "seed", *MODEL_KEYS, *(f"model.{k}" for k in MODEL_KEYS),
                    *(f"train.{k}" for k in TRAIN_KEYS), *(f"train.clip.{k}" for k in CLIP_KEYS),
                    *(f"task.{k}" for k in task_keys)})
    m = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {m[0]!r}?" if m else ""
    raise SpecError(f"{source}: [sweep] unknown axis {key!r}{hint} (axes are cell, seed, a model key, "
                    f"model.<key>, train.<key>, train.clip.<key> or task.<option>)")


def _flatten(d: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        k = f"{prefix}{k}"
        if isinstance(v, Mapping):  # `task.T = [...]` written unquoted inside [sweep]
            out.extend(_flatten(v, k + "."))
        else:
            out.append((k, v))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, Mapping):
        if set(v) <= {"mode", "threshold"} and "mode" in v:
            return str(v["mode"]) + (f"@{_fmt(v['threshold'])}" if v.get("threshold") is not None else "")
        return "+".join(f"{k}:{_fmt(x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return "+".join(_fmt(x) for x in v)
    return repr(v) if isinstance(v, float) else str(v)


def _set(run: dict, path: tuple[str, ...], value: Any) -> None:
    d = run
    for p in path[:-1]:
        d = d.setdefault(p, {})
    d[path[-1]] = value


def expand_sweep(doc: Mapping[str, Any], source: str = "<sweep>", default_name: str = "sweep") -> SweepSpec:
    """Validate a parsed sweep TOML document and expand its axes into runs (see the module
    docstring). Raises a one-line SpecError naming ``source`` and the offending key."""
    from .models import list_cells

    if not isinstance(doc, Mapping):
        raise SpecError(f"{source}: expected a TOML table")
    allowed = (TOP_KEYS - {"runs"}) | {"sweep"}
    if "runs" in doc:
        raise SpecError(f"{source}: a sweep spec takes its runs from [sweep] axes, not [[runs]] "
                        f"(write e.g. cell = [\"lstm\", \"gru\"] under [sweep])")
    for k in doc:
        if k not in allowed:
            m = difflib.get_close_matches(str(k), sorted(allowed), n=1, cutoff=0.5)
            raise SpecError(f"{source}: unknown key {k!r}" + (f"; did you mean {m[0]!r}?" if m else "")
                            + f" (valid: {', '.join(sorted(allowed))})")
    table = doc.get("sweep")
    if not isinstance(table, Mapping) or not table:
        raise SpecError(f"{source}: missing [sweep] table of axes (e.g. cell = [\"rnn_tanh\", \"lstm\"])")
    task_keys = set(doc.get("task", {}) if isinstance(doc.get("task"), Mapping) else {})
    axes, paths = [], []
    for key, values in _flatten(table):
        path = _axis_path(key, task_keys, source)
        for other, op in zip(axes, paths):
            if path[:len(op)] == op or op[:len(path)] == path:
                raise SpecError(f"{source}: [sweep] axes {other[0]!r} and {key!r} set the same setting")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{source}: [sweep] {key} must be a non-empty list of values, got {values!r}")
        seen = set()
        for v in values:
            j = json.dumps(v, sort_keys=True, default=str)
            if j in seen:
                raise SpecError(f"{source}: [sweep] {key} lists {v!r} twice")
            seen.add(j)
        if path == ("cell",):
            for c in values:
                if not isinstance(c, str) or c not in list_cells():
                    m = difflib.get_close_matches(str(c), list_cells(), n=1, cutoff=0.4)
                    raise SpecError(f"{source}: [sweep] cell: unknown cell {c!r}"
                                    + (f"; did you mean {m[0]!r}?" if m else "")
                                    + f" (known: {', '.join(list_cells())})")
        axes.append((key, tuple(values)))
        paths.append(path)
    if ("cell",) not in paths:
        raise SpecError(f"{source}: [sweep] needs a cell axis, e.g. cell = [\"lstm\"] "
                        f"(known: {', '.join(list_cells())})")
    shorts = [p[-1] for p in paths]
    names = [k if shorts.count(s) > 1 else s for (k, _), s in zip(axes, shorts)]
    runs, points = [], []
    for combo in itertools.product(*(v for _, v in axes)):
        run: dict = {}
        parts = []
        for (key, _), path, name, v in zip(axes, paths, names, combo):
            _set(run, path, v)
            parts.append(_fmt(v) if path == ("cell",) else f"{name}={_fmt(v)}")
        run["label"] = " ".join(parts)
        runs.append(run)
        points.append(dict(zip((k for k, _ in axes), combo)))
    study_doc = {k: v for k, v in doc.items() if k != "sweep"}
    study_doc["runs"] = runs
    study = parse_spec(study_doc, source, default_name=default_name)
    dirs: dict[str, str] = {}
    for r in study.runs:
        if r.dirname in dirs:
            raise SpecError(f"{source}: runs {dirs[r.dirname]!r} and {r.label!r} would share the directory "
                            f"{r.dirname!r}; make the axis values differ in letters or digits")
        dirs[r.dirname] = r.label
    return SweepSpec(study, tuple(axes), tuple(points))


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and expand a sweep spec file (TOML)."""
    from .spec import read_toml

    path = Path(path)
    return expand_sweep(read_toml(path), str(path), default_name=path.stem)


# ---------------------------------------------------------------------------------- one run
def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _done(run_dir: Path, run: RunSpec, analysis: Mapping) -> bool:
    """Trained with the same settings and analysed with the same analysis settings."""
    from .study import _finished

    if not _finished(run_dir, run.resolved()):
        return False
    try:
        doc = _io.read_json(run_dir / ANALYSED)
    except GradflowError:
        return False
    return isinstance(doc, dict) and _same(doc.get("analysis"), dict(analysis))


def _clear(run_dir: Path) -> None:
    """Remove an unfinished run directory (one holding run.json, or empty) before training again."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir() or not ((run_dir / "run.json").exists() or not any(run_dir.iterdir())):
        raise GradflowError(f"{run_dir}: exists and is not a gradflow run directory; move it or pick another --out")
    shutil.rmtree(run_dir)


def _error_text(exc: BaseException) -> str:
    text = str(exc) if isinstance(exc, GradflowError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def _mark_failed(run_dir: Path, run: RunSpec, error: str) -> None:
    """Record ``status: failed`` with ``error`` in the run's run.json (creating a minimal one)."""
    f = run_dir / "run.json"
    doc = None
    if f.exists():
        try:
            doc = _io.read_json(f)
        except GradflowError:
            doc = None
    elif run_dir.exists() and any(run_dir.iterdir()):
        return  # not ours: leave it alone
    if not isinstance(doc, dict) or doc.get("kind") != "run":
        doc = {"kind": "run", "schema_version": _io.SCHEMA_VERSION, "name": run_dir.name, "label": run.label,
               "diverged_at": None, "spec": {"run": run.resolved()}, "result": None}
    doc.update(status="failed", error=error)
    _io.write_json(f, doc)


def _execute(run: RunSpec, analysis: dict, source: str, run_dir: str) -> dict:
    """Train (unless finished) and analyse one run into ``run_dir``; never raises for a run's own
    failure. Runs inside a worker process (local pool or Ray task)."""
    import torch

    from .study import _finished, analyse_run
    from .training import train

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    d = Path(run_dir)
    action = "analysed"
    try:
        if not _finished(d, run.resolved()):
            _clear(d)
            task, model, cfg = build_run(run, source)
            train(task, model, cfg, run_dir=d, name=d.name, label=run.label, progress=False,
                  spec={"run": run.resolved()})
            action = "trained"
        analyse_run(d, analysis, spec_run=run)
        _io.write_json(d / ANALYSED, {"kind": "analysis", "schema_version": _io.SCHEMA_VERSION,
                                      "analysis": dict(analysis)})
        status = _io.read_json(d / "run.json").get("status")
        return {"status": status, "action": action, "error": None, "seconds": time.perf_counter() - t0}
    except Exception as exc:  # a failed run is data; the sweep goes on
        err = _error_text(exc)
        try:
            _mark_failed(d, run, err)
        except GradflowError:
            pass
        return {"status": "failed", "action": "failed", "error": err, "seconds": time.perf_counter() - t0}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------- engines
@dataclass(frozen=True)
class RunOutcome:
    """What happened to one run: ``action`` is "reused" (skipped), "analysed" (trained earlier,
    tables rebuilt), "trained" or "failed"; ``status`` is the run.json status."""

    label: str
    dir: str
    status: str
    action: str
    error: str | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class SweepResult:
    out: Path
    outcomes: tuple[RunOutcome, ...]
    table: Any  # pandas DataFrame, as written to sweep.csv

    @property
    def failed(self) -> tuple[RunOutcome, ...]:
        return tuple(o for o in self.outcomes if o.status == "failed")


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# BLAS/OpenMP pools read these when numpy/torch load: one thread per worker process, so that workers
# do not oversubscribe the cores (torch.set_num_threads does not reach numpy's BLAS).
SINGLE_THREAD_ENV = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                      "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")}


@contextlib.contextmanager
def _single_threaded_env():
    """Set :data:`SINGLE_THREAD_ENV` while worker processes (and the fork server) start."""
    old = {k: os.environ.get(k) for k in SINGLE_THREAD_ENV}
    os.environ.update(SINGLE_THREAD_ENV)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _mp_context():
    """A fork server that imported gradflow (and torch) once, so workers start without importing
    them again and without inheriting this process's torch thread pools; spawn where there is none."""
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["gradflow.sweep", "gradflow.study", "gradflow.training", "gradflow.analysis",
                                    "gradflow.tasks", "gradflow.models", "tqdm.auto"])
        return ctx
    return multiprocessing.get_context("spawn")


def _local(jobs, workers: int, done: Callable[[int, dict], None]) -> None:
    from concurrent.futures import ProcessPoolExecutor, as_completed

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(), initializer=_init_worker)
    try:
        with _single_threaded_env():  # workers start on submit
            futs = {pool.submit(_execute, *args): i for i, args in jobs}
        for f in as_completed(futs):
            try:
                res = f.result()
            except Exception as exc:  # the worker process died (killed, out of memory)
                res = {"status": "failed", "action": "failed", "error": f"worker died: {_error_text(exc)}"}
            done(futs[f], res)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _require_ray():
    try:
        import ray
    except ImportError:
        raise GradflowError("engine 'ray' needs the ray package: pip install 'gradflow[ray]'") from None
    return ray


def _ray(jobs, workers: int | None, address: str | None, done: Callable[[int, dict], None]) -> None:
    ray = _require_ray()
    started = False
    if not ray.is_initialized():
        kw: dict = {"include_dashboard": False, "log_to_driver": False}
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=workers, **kw)
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=0, runtime_env={"env_vars": SINGLE_THREAD_ENV})(_execute)
        refs = {task.remote(*args): i for i, args in jobs}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    res = ray.get(ref)
                except Exception as exc:  # the task's worker died
                    res = {"status": "failed", "action": "failed", "error": f"ray task failed: {_error_text(exc)}"}
                done(refs[ref], res)
    finally:
        if started:
            ray.shutdown()


def run_sweep(sweep: SweepSpec, out: str | Path, *, engine: str = "local", workers: int | None = None,
              address: str | None = None, echo: Callable[[str], None] | None = None) -> SweepResult:
    """Run every run of ``sweep`` into ``out`` with ``engine`` ("local": ``workers`` processes,
    default one per core; "ray": Ray tasks, on the cluster at ``address``, on the one already
    initialised, or on a new local one with ``workers`` CPUs). Returns a :class:`SweepResult`;
    failed runs are in ``result.failed`` (nothing is raised for them)."""
    if engine not in ENGINES:
        raise GradflowError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise GradflowError(f"workers must be an integer >= 1, got {workers!r}")
    if engine == "ray":
        _require_ray()
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise GradflowError(f"{out}: exists and is not a directory")
    if (out / "study.json").exists() and _io.read_json(out / "study.json").get("kind") != "study":
        raise GradflowError(f"{out / 'study.json'}: not a gradflow study file")
    out.mkdir(parents=True, exist_ok=True)
    say = echo or (lambda s: None)
    analysis = sweep.study.analysis.to_dict()
    runs = sweep.runs
    outcomes: list[RunOutcome | None] = [None] * len(runs)
    jobs = []
    for i, r in enumerate(runs):
        if _done(out / r.dirname, r, analysis):
            status = _io.read_json(out / r.dirname / "run.json").get("status")
            outcomes[i] = RunOutcome(r.label, r.dirname, status, "reused")
        else:
            jobs.append((i, (r, analysis, sweep.study.source, str(out / r.dirname))))
    say(f"{sweep.name}: {len(runs)} run(s), {len(runs) - len(jobs)} finished earlier, {len(jobs)} to run "
        f"with engine {engine} -> {out}")
    _write_study(sweep, out)
    count = [0]

    def done(i: int, res: dict) -> None:
        r = runs[i]
        if res.get("action") == "failed" and res.get("error", "").startswith(("worker died", "ray task failed")):
            _mark_failed(out / r.dirname, r, res["error"])
        outcomes[i] = RunOutcome(r.label, r.dirname, res["status"], res["action"], res.get("error"),
                                 float(res.get("seconds", 0.0)))
        count[0] += 1
        say(f"[{count[0]}/{len(jobs)}] {r.label}: {res['action']}"
            + (f" ({res['status']})" if res["status"] not in ("failed", "finished") else "")
            + (f": {res['error']}" if res.get("error") else "") + f" in {res.get('seconds', 0.0):.1f}s")
        _write_study(sweep, out)

    if jobs:
        n = min(workers or _cpus(), len(jobs))
        if engine == "local":
            _local(jobs, n, done)
        else:
            _ray(jobs, workers, address, done)
    table = sweep_table(sweep, out)
    _io.write_csv(out / "sweep.csv", table)
    _write_study(sweep, out)
    return SweepResult(out, tuple(o for o in outcomes if o is not None), table)


def _write_study(sweep: SweepSpec, out: Path) -> None:
    """study.json listing the runs that have a run.json (so `gradflow report` reads a partial sweep)."""
    s = sweep.study
    rel = [r.dirname for r in s.runs if (out / r.dirname / "run.json").exists()]
    _io.write_json(out / "study.json", {"kind": "study", "schema_version": _io.SCHEMA_VERSION, "name": s.name,
                                        "title": s.title, "claim": s.claim, "spec": sweep.resolved(),
                                        "sweep": {"axes": [k for k, _ in sweep.axes]}, "runs": rel})


# ---------------------------------------------------------------------------------- the table
def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def sweep_table(sweep: SweepSpec, out: str | Path):
    """The comparison table of a sweep directory: one row per run x state key (one row with an
    empty key for a run without decay.csv): ``run``, ``dir``, the axis values (columns named as
    the axes; tables such as a clip setting as text like ``norm@1.0``), then
    :data:`TABLE_COLUMNS`."""
    import pandas as pd

    out = Path(out)
    rows = []
    for r, point in zip(sweep.runs, sweep.points):
        d = out / r.dirname
        base = {"run": r.label, "dir": r.dirname}
        base.update({k: (_fmt(v) if isinstance(v, (Mapping, list)) else v) for k, v in point.items()})
        doc: dict = {}
        if (d / "run.json").exists():
            try:
                doc = _io.read_json(d / "run.json")
            except GradflowError:
                doc = {}
        res = doc.get("result") or {}
        solved = res.get("solved")
        base.update(status=doc.get("status", "missing"), eval_metric=_num(res.get("eval_metric")),
                    chance=_num(res.get("chance")), solved=None if solved is None else bool(solved),
                    diverged_at=doc.get("diverged_at"), error=doc.get("error"))
        decay = None
        if doc.get("status") != "failed" and (d / "decay.csv").exists():
            decay = pd.read_csv(d / "decay.csv")
        if decay is None or not len(decay):
            rows.append({**base, "key": None})
            continue
        for _, row in decay.iterrows():
            rows.append({**base, "key": row["key"], **{c: row[c] for c in ("decay_rate", "ci_low", "ci_high",
                                                                              "horizon", "horizon_censored")}})
    cols = ["run", "dir", *(k for k, _ in sweep.axes), *TABLE_COLUMNS]
    return pd.DataFrame(rows, columns=cols)
