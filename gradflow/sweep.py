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

Local workers (:mod:`gradflow._pool`) take one run at a time, never import modules from the
current directory, and die with the sweep's process (even under SIGKILL); they write their run
directories in place. A Ray task trains in a temporary directory of its node and returns the run
directory's files, which the driver writes: a multi-node cluster needs no shared file system.
The sweep directory is locked while a sweep runs (``.gradflow-sweep.lock``); SIGINT starts no
queued run, stops the running ones and raises :class:`SweepInterrupted` after writing sweep.csv.
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
from .spec import CLIP_KEYS, MODEL_KEYS, TOP_KEYS, TRAIN_KEYS, RunSpec, StudySpec, build_run, check_run_dirs, parse_spec

__all__ = ["SweepSpec", "RunOutcome", "SweepResult", "SweepInterrupted", "expand_sweep", "load_sweep", "run_sweep",
           "sweep_table", "incomplete", "ENGINES"]

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
    check_run_dirs([r["label"] for r in runs], source)  # before anything is built
    study = parse_spec(study_doc, source, default_name=default_name, from_sweep=True)
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


def _trash(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.trash-{os.getpid()}"


def _remove_dir(run_dir: Path) -> None:
    """Remove a directory so that an interruption never leaves part of it under its own name:
    rename it aside first (one atomic step), then delete the renamed copy."""
    t = _trash(run_dir)
    if t.exists():
        shutil.rmtree(t)
    os.replace(run_dir, t)
    shutil.rmtree(t)


def _clear(run_dir: Path) -> None:
    """Remove an unfinished run directory (one holding run.json, or empty) before training again."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir() or not ((run_dir / "run.json").exists() or not any(run_dir.iterdir())):
        raise GradflowError(f"{run_dir}: exists and is not a gradflow run directory; move it or pick another --out")
    _remove_dir(run_dir)


def _sweep_leftovers(out: Path) -> None:
    """Delete what an interrupted sweep left behind in ``out``: renamed-aside directories being
    deleted and Ray results being moved in (this process holds the sweep lock, so none is in use)."""
    for p in out.iterdir():
        if p.name.startswith(".") and (".trash-" in p.name or ".incoming-" in p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


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


INTERRUPTED = "interrupted; run the sweep again to train it"
EVENT_LOG = "GRADFLOW_EVENT_LOG"


def _event(kind: str, name: str) -> None:
    """Append ``<time> <pid> <kind> <name>`` to the file named by $GRADFLOW_EVENT_LOG, if set (the
    fault-injection tests read it: "dispatch" and "sigint" from the sweep's process, "start" from
    the process that trains the run)."""
    path = os.environ.get(EVENT_LOG)
    if not path:
        return
    line = f"{time.time():.6f} {os.getpid()} {kind} {name}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass


def _execute(run: RunSpec, analysis: dict, source: str, run_dir: str) -> dict:
    """Train (unless finished) and analyse one run into ``run_dir``; never raises for a run's own
    failure, nor for an interruption (KeyboardInterrupt: the run is marked failed with
    :data:`INTERRUPTED`, so that a re-run trains it again). Runs inside a worker process (local
    pool or Ray task)."""
    import torch

    from .study import _finished, analyse_run
    from .training import train

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    d = Path(run_dir)
    action = "analysed"
    try:
        _event("start", d.name)
        if not _finished(d, run.resolved()):
            _clear(d)
            task, model, cfg = build_run(run, source)
            train(task, model, cfg, run_dir=d, name=d.name, label=run.label, progress=False,
                  spec={"run": run.resolved()})
            action = "trained"
        (d / ANALYSED).unlink(missing_ok=True)  # tables about to change: no longer "analysed with these"
        analyse_run(d, analysis, spec_run=run)
        _io.write_json(d / ANALYSED, {"kind": "analysis", "schema_version": _io.SCHEMA_VERSION,
                                      "analysis": dict(analysis)})
        status = _io.read_json(d / "run.json").get("status")
        return {"status": status, "action": action, "error": None, "seconds": time.perf_counter() - t0}
    except KeyboardInterrupt:
        status = "failed"
        try:
            if _finished(d, run.resolved()):  # only the analysis was stopped: keep the training
                status = _io.read_json(d / "run.json").get("status")
            else:
                _mark_failed(d, run, INTERRUPTED)
        except (GradflowError, OSError):
            pass
        return {"status": status, "action": "interrupted", "error": INTERRUPTED,
                "seconds": time.perf_counter() - t0}
    except Exception as exc:  # a failed run is data; the sweep goes on
        err = _error_text(exc)
        try:
            _mark_failed(d, run, err)
        except GradflowError:
            pass
        return {"status": "failed", "action": "failed", "error": err, "seconds": time.perf_counter() - t0}


def _read_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _execute_remote(run: RunSpec, analysis: dict, source: str, dirname: str,
                    files: Mapping[str, bytes] | None) -> dict:
    """:func:`_execute` in a temporary directory of the node that runs it (a Ray task), seeded with
    ``files`` (the driver's copy of the run directory, when its training can be reused); returns
    the result with the run directory's files as ``result["files"]`` ({relative path: bytes}), for
    the driver to write. Nothing stays on the node."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gradflow-run-") as tmp:
        d = Path(tmp) / dirname
        for rel, data in (files or {}).items():
            p = d / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        res = _execute(run, analysis, source, str(d))
        res["files"] = _read_files(d) if d.is_dir() else {}
        return res


def _commit_files(run_dir: Path, files: Mapping[str, bytes]) -> None:
    """Replace ``run_dir`` by a directory holding ``files``: written beside it, then renamed into
    place, so the directory is at every moment either the old one, absent, or the new one."""
    inc = run_dir.parent / f".{run_dir.name}.incoming-{os.getpid()}"
    if inc.exists():
        shutil.rmtree(inc)
    for rel, data in files.items():
        p = (inc / rel).resolve()
        if inc.resolve() not in p.parents:
            raise GradflowError(f"{run_dir}: result file {rel!r} is outside the run directory")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    inc.mkdir(exist_ok=True)
    if run_dir.exists():
        _clear(run_dir)
    os.replace(inc, run_dir)


# ---------------------------------------------------------------------------------- engines
@dataclass(frozen=True)
class RunOutcome:
    """What happened to one run: ``action`` is "reused" (skipped), "analysed" (trained earlier,
    tables rebuilt), "trained", "failed", "interrupted" (stopped by SIGINT) or "not started"
    (queued when the sweep was interrupted); ``status`` is the run.json status ("missing" when the
    run has none)."""

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


class SweepInterrupted(GradflowError):
    """SIGINT stopped the sweep: no queued run was started, running ones were stopped and marked,
    ``sweep.csv`` was written. ``result`` is the :class:`SweepResult` so far."""

    def __init__(self, message: str, result: SweepResult):
        super().__init__(message)
        self.result = result


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# BLAS/OpenMP pools read these when numpy/torch load: one thread per worker process, so that workers
# do not oversubscribe the cores (torch.set_num_threads does not reach numpy's BLAS).
SINGLE_THREAD_ENV = {v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                      "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")}
PRELOAD = ("torch", "gradflow.sweep", "gradflow.study", "gradflow.training", "gradflow.analysis")


class _Stop:
    """SIGINT while a sweep runs: the first one stops dispatching and interrupts the running runs
    (the handler only counts; the engines act on it), a second one kills the running runs."""

    def __init__(self):
        self.count = 0
        self._old = None

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        self.count += 1
        if self.count == 1:
            _event("sigint", "-")

    def __exit__(self, *exc):
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


GRACE = 30.0  # seconds an interrupted run gets to stop before it is killed


def _local(jobs, workers: int, done: Callable[[int, dict], None], stop: _Stop, lock_fd: int | None) -> None:
    from collections import deque

    from ._pool import WorkerPool

    pool = WorkerPool(workers, keep_fds=() if lock_fd is None else (lock_fd,), env=SINGLE_THREAD_ENV,
                      preload=PRELOAD)
    pending = deque(jobs)
    names = {i: Path(args[3]).name for i, args in jobs}
    interrupted_at = None
    killed = False
    try:
        while pool.busy() or (pending and not stop.count):
            if stop.count and interrupted_at is None:
                interrupted_at = time.monotonic()
                pool.interrupt()
            if stop.count > 1 or (interrupted_at is not None and time.monotonic() - interrupted_at > GRACE):
                if not killed:
                    pool.kill_busy()
                    killed = True
            if not stop.count:
                for w in pool.idle():
                    if not pending:
                        break
                    i, args = pending.popleft()
                    _event("dispatch", names[i])
                    pool.submit(w, _execute, args, i)
            for _, i, res, err in pool.wait(0.2):
                if err is not None:
                    res = ({"status": "failed", "action": "interrupted", "error": INTERRUPTED, "killed": True}
                           if stop.count else {"status": "failed", "action": "failed", "error": f"worker died: {err}"})
                done(i, res)
    finally:
        pool.close(kill=bool(stop.count))


def _require_ray():
    try:
        import ray
    except ImportError:
        raise GradflowError("engine 'ray' needs the ray package: pip install 'gradflow[ray]'") from None
    return ray


def _ray(jobs, workers: int | None, address: str | None, done: Callable[[int, dict], None], stop: _Stop) -> None:
    """One Ray task per run, at most as many in flight as the cluster has CPUs (nothing waits in
    Ray's queue, so an interrupted sweep starts nothing new). Each task returns the run
    directory's files; :func:`run_sweep`'s ``done`` writes them (no shared filesystem needed)."""
    from collections import deque

    import tempfile

    ray = _require_ray()
    started = False
    empty = None
    if not ray.is_initialized():
        # Ray puts the driver's current directory first on its workers' sys.path unless the job has a
        # working_dir: give it an empty one, so workers import nothing from here (gradflow itself is
        # shipped along when only the current directory holds it)
        empty = tempfile.mkdtemp(prefix="gradflow-ray-")
        runtime_env: dict = {"working_dir": empty}
        import gradflow

        pkg = Path(gradflow.__file__).resolve().parent
        from ._pool import safe_sys_path

        if str(pkg.parent) not in {os.path.realpath(p) for p in safe_sys_path()}:
            runtime_env["py_modules"] = [str(pkg)]
        import logging

        # Ray's INFO/WARNING start-up lines would surround the command's own one-line messages
        kw: dict = {"include_dashboard": False, "log_to_driver": False, "runtime_env": runtime_env,
                    "logging_level": logging.ERROR}
        try:
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(num_cpus=workers, **kw)
        except BaseException:
            shutil.rmtree(empty, ignore_errors=True)
            raise
        started = True
    try:
        task = ray.remote(num_cpus=1, max_retries=0, runtime_env={"env_vars": SINGLE_THREAD_ENV})(_execute_remote)
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)))
        if workers:
            slots = min(slots, workers)
        pending = deque(jobs)
        names = {i: args[3] for i, args in jobs}
        refs: dict = {}
        cancelled = False
        interrupted_at = None
        while refs or (pending and not stop.count):
            if stop.count and not cancelled:
                interrupted_at = time.monotonic()
                for ref in refs:
                    ray.cancel(ref)
                cancelled = True
            if stop.count > 1 or (interrupted_at is not None and time.monotonic() - interrupted_at > GRACE):
                for ref in refs:
                    ray.cancel(ref, force=True)
            while pending and len(refs) < slots and not stop.count:
                i, args = pending.popleft()
                _event("dispatch", names[i])
                refs[task.remote(*args)] = i
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.2)
            for ref in ready:
                i = refs.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as exc:  # cancelled, or the task's worker died
                    res = ({"status": "failed", "action": "interrupted", "error": INTERRUPTED}
                           if stop.count else
                           {"status": "failed", "action": "failed", "error": f"ray task failed: {_error_text(exc)}"})
                done(i, res)
    finally:
        if started:
            ray.shutdown()
        if empty is not None:
            shutil.rmtree(empty, ignore_errors=True)


LOCK = ".gradflow-sweep.lock"
LOCK_WAIT = 10.0  # seconds to wait for the processes of a dead sweep to release its lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is dead
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _lock(out: Path) -> int | None:
    """Lock the sweep directory for this process (and the worker processes it starts, which
    inherit the lock): an exclusive ``flock`` on ``<out>/.gradflow-sweep.lock``, which the kernel
    drops when the last holder dies, so a lock left by a killed sweep is taken over as soon as its
    processes are gone. Raises a one-line GradflowError while a live sweep holds it."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock
        return None
    f = out / LOCK
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = None
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            try:
                pid = int(os.pread(fd, 32, 0).split()[0])
            except (ValueError, IndexError, OSError):
                pid = None
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise GradflowError(f"{out}: another gradflow sweep (pid {pid}) is running in this directory; "
                                    f"wait for it to end or stop it")
            deadline = deadline or time.monotonic() + LOCK_WAIT
            if time.monotonic() > deadline:
                raise GradflowError(f"{f}: still locked by the processes of a sweep (pid {pid}) that has ended; "
                                    f"stop them and run again")
            time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise


def run_sweep(sweep: SweepSpec, out: str | Path, *, engine: str = "local", workers: int | None = None,
              address: str | None = None, echo: Callable[[str], None] | None = None,
              sigint: "_Stop | None" = None) -> SweepResult:
    """Run every run of ``sweep`` into ``out`` with ``engine`` ("local": ``workers`` processes,
    default one per core; "ray": Ray tasks, on the cluster at ``address``, on the one already
    initialised, or on a new local one with ``workers`` CPUs). Returns a :class:`SweepResult`;
    failed runs are in ``result.failed`` (nothing is raised for them).

    The directory is locked while the sweep runs (a second sweep into it fails at once with one
    line). SIGINT (Ctrl-C) stops the sweep: no queued run starts, running runs are interrupted and
    marked failed (:data:`INTERRUPTED`), ``sweep.csv`` is written, and :class:`SweepInterrupted`
    is raised. The previous ``sweep.csv`` is removed when a sweep starts, so a sweep that is killed
    leaves none.

    ``sigint``: a :class:`_Stop` the caller has already entered and keeps entered after this returns
    (the CLI does, so that a SIGINT arriving just after sweep.csv is written is counted, not raised
    as KeyboardInterrupt between the sweep and its exit status)."""
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
    lock_fd = _lock(out)
    try:
        if sigint is not None:
            return _run_locked(sweep, out, engine, workers, address, echo, sigint, lock_fd)
        with _Stop() as stop:
            return _run_locked(sweep, out, engine, workers, address, echo, stop, lock_fd)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _run_locked(sweep, out, engine, workers, address, echo, stop, lock_fd) -> SweepResult:
    (out / "sweep.csv").unlink(missing_ok=True)  # from now on it would describe a sweep that is not this one
    _sweep_leftovers(out)
    say = echo or (lambda s: None)
    analysis = sweep.study.analysis.to_dict()
    runs = sweep.runs
    outcomes: list[RunOutcome | None] = [None] * len(runs)
    jobs = []
    for i, r in enumerate(runs):
        if _done(out / r.dirname, r, analysis):
            status = _io.read_json(out / r.dirname / "run.json").get("status")
            outcomes[i] = RunOutcome(r.label, r.dirname, status, "reused")
        elif engine == "ray":
            d = out / r.dirname
            from .study import _finished

            files = _read_files(d) if _finished(d, r.resolved()) else None
            jobs.append((i, (r, analysis, sweep.study.source, r.dirname, files)))
        else:
            jobs.append((i, (r, analysis, sweep.study.source, str(out / r.dirname))))
    say(f"{sweep.name}: {len(runs)} run(s), {len(runs) - len(jobs)} finished earlier, {len(jobs)} to run "
        f"with engine {engine} -> {out}")
    _write_study(sweep, out)
    count = [0]

    def done(i: int, res: dict) -> None:
        r = runs[i]
        d = out / r.dirname
        files = res.pop("files", None)
        act, err = res.get("action"), res.get("error") or ""
        if engine == "ray":  # the driver owns the directory; an interrupted task leaves it as it was
            if files and act != "interrupted":
                _commit_files(d, files)
            elif act == "failed":
                _mark_failed(d, r, err)
        elif act == "failed" and err.startswith("worker died"):
            _mark_failed(d, r, err)
        elif act == "interrupted" and res.get("killed") and d.exists():
            from .study import _finished

            if not _finished(d, r.resolved()):
                _mark_failed(d, r, INTERRUPTED)
        status = res["status"]
        if act == "interrupted" and not (d / "run.json").exists():
            status = "missing"
        outcomes[i] = RunOutcome(r.label, r.dirname, status, res["action"], res.get("error"),
                                 float(res.get("seconds", 0.0)))
        count[0] += 1
        say(f"[{count[0]}/{len(jobs)}] {r.label}: {res['action']}"
            + (f" ({res['status']})" if res["status"] not in ("failed", "finished") else "")
            + (f": {res['error']}" if res.get("error") else "") + f" in {res.get('seconds', 0.0):.1f}s")
        _write_study(sweep, out)

    if jobs:
        n = min(workers or _cpus(), len(jobs))
        if engine == "local":
            _local(jobs, n, done, stop, lock_fd)
        else:
            _ray(jobs, workers, address, done, stop)
    for i, r in enumerate(runs):
        if outcomes[i] is None:  # queued when the sweep was interrupted
            st = "missing"
            if (out / r.dirname / "run.json").exists():
                try:
                    st = _io.read_json(out / r.dirname / "run.json").get("status", "missing")
                except GradflowError:
                    pass
            outcomes[i] = RunOutcome(r.label, r.dirname, st, "not started")
    table = sweep_table(sweep, out)
    _io.write_csv(out / "sweep.csv", table)
    _write_study(sweep, out)
    result = SweepResult(out, tuple(o for o in outcomes if o is not None), table)
    if stop.count and incomplete(table):
        acts = [o.action for o in result.outcomes]
        ok = sum(a in ("reused", "analysed", "trained") for a in acts)
        raise SweepInterrupted(
            f"interrupted: {ok} of {len(acts)} runs done, {acts.count('interrupted')} stopped, "
            f"{acts.count('not started')} not started; run the same command again to finish "
            f"(see {out / 'sweep.csv'})", result)
    return result


DONE_STATUSES = ("finished", "diverged")


def incomplete(table) -> list[str]:
    """The runs of a sweep table (:func:`sweep_table`) whose status is not finished or diverged:
    failed (an error or an interruption), missing (never started) or running (killed)."""
    bad = table.loc[~table["status"].isin(DONE_STATUSES), "run"]
    return list(dict.fromkeys(bad))


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
