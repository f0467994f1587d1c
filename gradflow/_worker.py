"""The worker side of :mod:`gradflow._pool`: a process that runs one job at a time.

Started by the boot code of :func:`gradflow._pool.boot_code` with a ``sys.path`` that holds neither
``''`` nor the current directory. It dies with the process that started it: on Linux the kernel
sends it SIGKILL when that process exits (``prctl(PR_SET_PDEATHSIG)``), and on every platform a
watchdog thread exits as soon as the "alive" pipe, whose write end only the parent holds, reads
end-of-file. SIGINT and SIGTERM interrupt the running job (:class:`KeyboardInterrupt` inside it) and
make the worker exit after reporting it; between jobs they only make it exit.

Protocol (pickled objects over two pipes): the parent sends ``(function, args)`` and the worker
answers with the function's return value; ``None`` or end-of-file ends the worker.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent exits (Linux; a no-op elsewhere), and exit now if the
    parent is already gone (it may have died before the request was made)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:
        os._exit(1)


def _watch(fd: int, parent: int) -> None:
    """Exit the process when the parent's end of the alive pipe closes, i.e. when the parent dies."""
    while True:
        try:
            data = os.read(fd, 1)
        except InterruptedError:
            continue
        except OSError:
            data = b""
        if not data:
            os._exit(1)


def main(cfg: dict) -> None:
    from multiprocessing.connection import Connection

    die_with_parent(cfg["parent"])
    threading.Thread(target=_watch, args=(cfg["alive"], cfg["parent"]), daemon=True,
                     name="gradflow-parent-watch").start()
    jobs = Connection(cfg["jobs"], writable=False)
    results = Connection(cfg["results"], readable=False)
    state = {"running": False, "stop": False}

    def on_signal(signum, frame):
        state["stop"] = True
        if state["running"]:
            state["running"] = False  # one interrupt per job: its clean-up is not interrupted again
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for name in cfg.get("preload", ()):
        __import__(name)
    while not state["stop"]:
        try:
            msg = jobs.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        fn, args = msg
        out = None
        try:
            state["running"] = True
            out = fn(*args)
        except KeyboardInterrupt:
            out = {"status": "interrupted", "action": "interrupted", "error": "interrupted", "seconds": 0.0}
        finally:
            state["running"] = False
        try:
            results.send(out)
        except (BrokenPipeError, OSError):
            break
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)  # skip interpreter teardown (torch's thread pools), nothing is left to flush
