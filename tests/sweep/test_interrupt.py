"""Interrupting a sweep (issue 12 item 3): after SIGINT no queued run starts, running runs stop
and the command exits non-zero with one line; after SIGKILL of the sweep's process its workers
die within 5 s and a re-run finishes the sweep; the sweep directory is locked; sweep.csv agrees
with the exit status; Ray tasks hand their run directories back as data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from gradflow.errors import GradflowError
from gradflow.sweep import LOCK, _commit_files, _execute_remote, _lock, load_sweep

from ..faults.procs import alive, descendants, supported, wait_gone
from .conftest import BASE, sweep_text

pytestmark = pytest.mark.skipif(not supported(), reason="needs Linux /proc")

SLOW = BASE.replace("steps = 3", "steps = 40").replace("T = 8", "T = 12")
SCRIPT = "import sys\nfrom gradflow.cli.main import cli\nif __name__ == '__main__':\n    sys.exit(cli())\n"
ROOT = Path(__file__).parents[2]


def _start(tmp_path: Path, axes: dict, *args: str, base: str = SLOW) -> tuple[subprocess.Popen, Path, Path]:
    spec = tmp_path / "s.toml"
    spec.write_text(sweep_text(axes, base))
    (tmp_path / "gradflow").write_text(SCRIPT)
    log = tmp_path / "events.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADFLOW_EVENT_LOG": str(log)}
    p = subprocess.Popen([sys.executable, str(tmp_path / "gradflow"), "sweep", str(spec), "--out", "o", "-q",
                          *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, tmp_path / "o", log


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _started_runs(out: Path) -> set[str]:
    return {p.parent.name for p in out.glob("*/run.json")} if out.exists() else set()


def _events(log: Path) -> list[tuple[str, str]]:
    return [tuple(ln.split()[2:4]) for ln in log.read_text().splitlines()] if log.exists() else []


AXES8 = {"cell": ["gru", "rnn_tanh"], "seed": [0, 1, 2, 3]}
AXES4 = {"cell": ["gru"], "seed": [0, 1, 2, 3]}


@pytest.mark.slow
def test_sigint_starts_no_queued_run_stops_running_ones_and_exits_with_one_line(tmp_path):
    p, out, log = _start(tmp_path, AXES8, "--workers", "2")
    _wait_for(lambda: len(_started_runs(out)) >= 1 or p.poll() is not None, 120, "a run to start")
    kids = descendants(p.pid)
    before = _started_runs(out)
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=40)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("the sweep did not stop within 40 s of SIGINT")
    assert p.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: interrupted:"), err
    assert not wait_gone(kids, 5)
    # no run was dispatched after SIGINT; at most the two running ones started after the snapshot
    ev = _events(log)
    assert ("sigint", "-") in ev
    after_sigint = ev[ev.index(("sigint", "-")):]
    assert not [e for e in after_sigint if e[0] == "dispatch"], ev
    started = _started_runs(out)
    assert len(started - before) <= 2 and len(started) < 8, (before, started)
    # sweep.csv agrees with the exit status: some run is not finished
    t = pd.read_csv(out / "sweep.csv")
    assert len(set(t["run"])) == 8 and (~t["status"].isin(["finished", "diverged"])).any()
    assert set(t["status"]) <= {"finished", "failed", "missing"}


@pytest.mark.slow
def test_sigkill_of_the_sweep_kills_its_workers_and_a_rerun_finishes(tmp_path):
    p, out, log = _start(tmp_path, AXES4, "--workers", "2")
    _wait_for(lambda: len(_started_runs(out)) >= 1 or p.poll() is not None, 120, "a run to start")
    kids = descendants(p.pid)
    assert kids, "no worker processes"
    p.send_signal(signal.SIGKILL)
    p.wait()
    t0 = time.monotonic()
    left = wait_gone(kids, 5)
    assert not left, f"workers {sorted(left)} outlived the sweep by {time.monotonic() - t0:.1f} s"
    assert not (out / "sweep.csv").exists()  # a killed sweep leaves no table claiming anything
    q, out, _ = _start(tmp_path, AXES4, "--workers", "2")
    _, err = q.communicate(timeout=300)
    assert q.returncode == 0, err
    t = pd.read_csv(out / "sweep.csv")
    assert set(t["status"]) == {"finished"} and len(set(t["run"])) == 4


def _hold_lock(f: Path, pid_text: str, seconds: float) -> subprocess.Popen:
    code = ("import fcntl, os, sys, time\n"
            f"fd = os.open({str(f)!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            f"os.ftruncate(fd, 0); os.write(fd, {pid_text!r}.encode())\n"
            "print('locked', flush=True)\n"
            f"time.sleep({seconds})\n")
    h = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert h.stdout.readline().strip() == "locked"
    return h


def _dead_pid() -> int:
    q = subprocess.Popen([sys.executable, "-c", "pass"])
    q.wait()
    return q.pid


def test_lock_refuses_a_live_sweep_and_takes_over_a_dead_ones(tmp_path):
    f = tmp_path / LOCK
    h = _hold_lock(f, "PID", 30)
    try:
        f.write_text(f"{h.pid}\n")  # the holder is alive
        with pytest.raises(GradflowError, match=rf"another gradflow sweep \(pid {h.pid}\) is running"):
            _lock(tmp_path)
    finally:
        h.kill()
        h.wait()
    # a lock file naming a dead pid and held by nobody: taken over at once
    dead = _dead_pid()
    f.write_text(f"{dead}\n")
    t0 = time.monotonic()
    fd = _lock(tmp_path)
    assert time.monotonic() - t0 < 1 and f.read_text().split() == [str(os.getpid())]
    os.close(fd)
    # held by the orphaned workers of a dead sweep: wait until they are gone, then take it
    h = _hold_lock(f, f"{dead}\n", 1.5)
    t0 = time.monotonic()
    fd = _lock(tmp_path)
    assert 0.5 < time.monotonic() - t0 < 8
    os.close(fd)
    h.wait()


@pytest.mark.slow
def test_a_second_sweep_into_a_locked_directory_fails_with_one_line(tmp_path):
    p, out, _ = _start(tmp_path, AXES4, "--workers", "1")
    try:
        _wait_for(lambda: (out / LOCK).exists() and len(_started_runs(out)) >= 1, 120, "the first sweep")
        spec = tmp_path / "s.toml"
        r = subprocess.run([sys.executable, str(tmp_path / "gradflow"), "sweep", str(spec), "--out", "o", "-q"],
                           cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                           text=True, timeout=60)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1 and len(lines) == 1, r.stderr
        assert f"another gradflow sweep (pid {p.pid}) is running" in lines[0]
    finally:
        p.kill()
        p.wait()


def test_ray_task_returns_the_run_directory_as_data(write_sweep, tmp_path, monkeypatch):
    s = load_sweep(write_sweep({"cell": ["gru"]}))
    r = s.runs[0]
    node = tmp_path / "node"
    node.mkdir()
    monkeypatch.chdir(node)
    monkeypatch.setenv("TMPDIR", str(node))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    res = _execute_remote(r, s.study.analysis.to_dict(), s.study.source, r.dirname, None)
    assert res["status"] == "finished" and res["action"] == "trained"
    files = res["files"]
    assert {"run.json", "metrics.csv", "decay.csv", "analysis.json", "trace/trace.json"} <= set(files)
    assert all(isinstance(v, bytes) for v in files.values())
    assert not list(node.glob("gradflow-run-*"))  # nothing stays on the node
    driver = tmp_path / "driver" / r.dirname
    driver.parent.mkdir()
    _commit_files(driver, files)
    assert sorted(p.relative_to(driver).as_posix() for p in driver.rglob("*") if p.is_file()) == sorted(files)
    # re-analysis from the driver's copy: the task gets the files, reuses the training
    again = _execute_remote(r, {**s.study.analysis.to_dict(), "batch_limit": 3}, s.study.source, r.dirname, files)
    assert again["action"] == "analysed" and again["files"]["metrics.csv"] == files["metrics.csv"]
    with pytest.raises(GradflowError, match="outside the run directory"):
        _commit_files(tmp_path / "driver" / "x", {"../escape.txt": b"no"})
    assert not (tmp_path / "driver" / "escape.txt").exists()
