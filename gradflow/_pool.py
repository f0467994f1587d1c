"""A small process pool for the local sweep engine: one job per worker at a time, nothing queued
inside a worker, workers that die with the parent and never import from the current directory.

Why not :mod:`concurrent.futures`: its workers prefetch queued calls (so an interrupted pool still
starts them), outlive a parent killed with SIGKILL, and start through ``python -c`` with ``''`` (the
current directory) first on ``sys.path`` (a ``selectors.py`` there runs in every worker).

Each worker is ``python -P -c <boot>`` (``-P``: no unsafe path entry, Python >= 3.11; the boot code
also replaces ``sys.path`` before any import) with ``PYTHONPATH`` and ``sys.path`` stripped of ``''``,
``.`` and the current directory; gradflow itself is imported from where this process imported it.
See :mod:`gradflow._worker` for the worker's side and how it dies with its parent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

__all__ = ["WorkerPool", "safe_sys_path", "boot_code"]


def _is_cwd(entry: str, cwd: str) -> bool:
    if entry in ("", "."):
        return True
    try:
        return os.path.realpath(entry) == cwd
    except (OSError, ValueError):
        return False


def safe_sys_path(path: Iterable[str] | None = None, cwd: str | None = None) -> list[str]:
    """``path`` (default ``sys.path``) without ``''``, ``'.'`` and entries naming the current directory."""
    cwd = os.path.realpath(cwd or os.getcwd())
    return [p for p in (sys.path if path is None else path) if isinstance(p, str) and not _is_cwd(p, cwd)]


def boot_code(cfg: dict) -> str:
    """The ``-c`` program of a worker: set a safe ``sys.path`` first, find ``gradflow`` where the
    parent found it, then run :func:`gradflow._worker.main`."""
    import gradflow

    root = str(Path(gradflow.__file__).resolve().parent.parent)
    return (
        "import sys\n"
        f"sys.path[:] = {safe_sys_path()!r}\n"
        "sys.argv[:] = ['gradflow-worker']\n"
        "import importlib.machinery as _m\n"
        "class _GradflowFinder:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        f"        return _m.PathFinder.find_spec(name, [{root!r}]) if name == 'gradflow' else None\n"
        "sys.meta_path.insert(0, _GradflowFinder)\n"
        "from gradflow._worker import main\n"
        f"main({cfg!r})\n")


def _worker_env(extra: dict | None) -> dict:
    env = dict(os.environ)
    cwd = os.path.realpath(os.getcwd())
    pp = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not _is_cwd(p, cwd)]
    if pp:
        env["PYTHONPATH"] = os.pathsep.join(pp)
    else:
        env.pop("PYTHONPATH", None)
    env["PYTHONSAFEPATH"] = "1"
    env.update(extra or {})
    return env


@dataclass(eq=False)
class Worker:
    proc: subprocess.Popen
    jobs: Any  # multiprocessing.connection.Connection (write end)
    results: Any  # Connection (read end)
    job: Any = None  # what the caller attached to the running job, None when idle
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid


class WorkerPool:
    """``n`` worker processes. ``submit(worker, fn, args, tag)`` hands one job to an idle worker;
    ``wait(timeout)`` returns ``[(worker, tag, result, error)]`` for the jobs that ended (``error``
    is a one-line reason when the worker died). ``keep_fds`` are inherited by every worker (a lock
    held while any of them lives)."""

    def __init__(self, n: int, *, keep_fds: tuple[int, ...] = (), env: dict | None = None,
                 preload: tuple[str, ...] = ()):
        self._alive_r, self._alive_w = os.pipe()  # workers watch alive_r; only this process writes
        self._keep = tuple(keep_fds)
        self._env = _worker_env(env)
        self._preload = tuple(preload)
        self.workers: list[Worker] = []
        try:
            for _ in range(n):
                self.workers.append(self._start())
        except BaseException:
            self.close(kill=True)
            raise

    def _start(self) -> Worker:
        from multiprocessing.connection import Connection

        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        cfg = {"parent": os.getpid(), "alive": self._alive_r, "jobs": job_r, "results": res_w,
               "preload": list(self._preload)}
        flags = ["-P"] if sys.version_info >= (3, 11) else []
        try:
            proc = subprocess.Popen([sys.executable, *flags, "-c", boot_code(cfg)], stdin=subprocess.DEVNULL,
                                    pass_fds=(job_r, res_w, self._alive_r, *self._keep), env=self._env,
                                    start_new_session=True)
        finally:
            os.close(job_r)
            os.close(res_w)
        return Worker(proc, Connection(job_w, readable=False), Connection(res_r, writable=False))

    def idle(self) -> list[Worker]:
        return [w for w in self.workers if w.job is None]

    def busy(self) -> list[Worker]:
        return [w for w in self.workers if w.job is not None]

    def submit(self, worker: Worker, fn, args: tuple, tag: Any) -> None:
        worker.job = tag
        worker.jobs.send((fn, args))

    def wait(self, timeout: float) -> list[tuple[Worker, Any, Any, str | None]]:
        from multiprocessing.connection import wait

        busy = self.busy()
        if not busy:
            time.sleep(min(timeout, 0.05))
            return []
        ready = wait([w.results for w in busy], timeout)
        out = []
        for w in busy:
            if w.results not in ready:
                continue
            tag, w.job = w.job, None
            try:
                out.append((w, tag, w.results.recv(), None))
            except (EOFError, OSError):
                out.append((w, tag, None, self._death(w)))
                self._replace(w)
        return out

    def _death(self, w: Worker) -> str:
        try:
            rc = w.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            w.proc.kill()
            rc = w.proc.wait()
        if rc < 0:
            try:
                return f"worker process {w.pid} killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"worker process {w.pid} killed by signal {-rc}"
        return f"worker process {w.pid} exited with status {rc}"

    def _replace(self, w: Worker) -> None:
        i = self.workers.index(w)
        self._close_worker(w)
        self.workers[i] = self._start()

    def interrupt(self) -> None:
        """SIGINT to every worker running a job (it stops the job cleanly and exits)."""
        for w in self.busy():
            try:
                os.kill(w.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def kill_busy(self) -> None:
        for w in self.busy():
            try:
                os.kill(w.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _close_worker(self, w: Worker) -> None:
        for c in (w.jobs, w.results):
            try:
                c.close()
            except OSError:
                pass

    def close(self, *, kill: bool = False, grace: float = 5.0) -> None:
        """End every worker: idle ones read end-of-file and exit; after ``grace`` seconds (at once
        with ``kill``) the rest are killed. Returns when all have exited."""
        for w in self.workers:
            self._close_worker(w)
        deadline = time.monotonic() + (0 if kill else grace)
        for w in self.workers:
            try:
                w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
        for fd in (self._alive_r, self._alive_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._alive_r = self._alive_w = -1
