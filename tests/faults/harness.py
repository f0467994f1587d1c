"""Fault injection: start a ``gradflow run`` / ``gradflow sweep`` command, send it SIGINT or SIGKILL at
a chosen moment, check what it left, re-run it, and compare the final tables with an uninterrupted
run's.

Every process of one attempt carries ``GRADFLOW_FAULT_TAG=<unique>`` in its environment (Ray's
processes inherit it too), so the processes a command left behind are found in ``/proc`` even
after they were re-parented.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .procs import alive

ROOT = Path(__file__).parents[2]
SCRIPT = "import sys\nfrom gradflow.cli.main import cli\nif __name__ == '__main__':\n    sys.exit(cli())\n"

BASE = """title = "fault injection"
claim = "A tiny study for kill tests."

[task]
name = "checksum"
T = 10

[model]
hidden = 6
init = "gaussian"

[train]
steps = {steps}
batch = 4
eval_batch = 8
record_every = 5

[analysis]
batch_limit = 4
"""

STUDY = BASE + """
[[runs]]
label = "gru"
cell = "gru"

[[runs]]
label = "lstm"
cell = "lstm"

[[runs]]
label = "tanh"
cell = "rnn_tanh"
"""

SWEEP = BASE + """
[sweep]
cell = ["gru", "rnn_tanh"]
seed = [0, 1]
"""

#: (command, engine) -> (spec text, extra arguments)
SETUPS = {
    ("run", None): (STUDY, ["--no-report"]),
    ("sweep", "local"): (SWEEP, ["--engine", "local", "--workers", "2"]),
    ("sweep", "ray"): (SWEEP, ["--engine", "ray", "--workers", "2"]),
}
TIMING = ("seconds",)


def tagged(tag: str) -> set[int]:
    """Live processes whose environment holds GRADFLOW_FAULT_TAG=tag."""
    needle = f"GRADFLOW_FAULT_TAG={tag}".encode()
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{d}/environ").read_bytes()
        except OSError:
            continue
        if needle in env.split(b"\0") and alive(int(d)):
            out.add(int(d))
    return out


@dataclass
class Attempt:
    rc: int
    stderr: str
    seconds: float  # from start to exit
    exit_after_signal: float | None  # seconds from the signal to the command's exit
    survivors: set  # tagged processes alive 5 s after the command exited
    events: list  # (time, kind, name) from GRADFLOW_EVENT_LOG
    signal_time: float | None


def command(work: Path, cmd: str, engine: str | None, steps: int) -> tuple[list[str], dict]:
    spec_text, extra = SETUPS[(cmd, engine)]
    spec = work / "spec.toml"
    if not spec.exists():
        spec.write_text(spec_text.format(steps=steps))
        (work / "gradflow").write_text(SCRIPT)
    argv = [sys.executable, str(work / "gradflow"), cmd, str(spec), "--out", "out", "-q", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return argv, env


def attempt(work: Path, cmd: str, engine: str | None, steps: int, *, sig: int | None = None,
            delay: float = 0.0, timeout: float = 300.0) -> Attempt:
    """Run the command in ``work``; with ``sig``, send it ``delay`` seconds after the start."""
    argv, env = command(work, cmd, engine, steps)
    tag = uuid.uuid4().hex
    log = work / f"events-{tag}.log"
    env.update(GRADFLOW_FAULT_TAG=tag, GRADFLOW_EVENT_LOG=str(log))
    t0 = time.monotonic()
    p = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sent = None
    if sig is not None:
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            sent = time.time()
            p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        _, err = p.communicate()
        err += f"\n[harness] killed after {timeout} s"
    exited = time.time()
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + 5.0
    left = tagged(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = tagged(tag)
    if left:  # leave nothing behind for the next attempt, but report it
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    events = []
    if log.exists():
        for ln in log.read_text().splitlines():
            t, _, kind, name = ln.split(" ", 3)
            events.append((float(t), kind, name))
        log.unlink()
    return Attempt(p.returncode, err, seconds, None if sent is None else exited - sent, left, events, sent)


# ------------------------------------------------------------------------------------ tables
def tables(out: Path) -> dict[str, object]:
    """Every table of a finished study/sweep directory, timing columns dropped, plus each run's
    status and result and the study's run list."""
    got: dict[str, object] = {}
    for f in sorted(out.rglob("*.csv")):
        rel = f.relative_to(out).as_posix()
        if any(part.startswith(".") for part in f.relative_to(out).parts):
            got[rel] = "LEFTOVER"
            continue
        got[rel] = pd.read_csv(f).drop(columns=list(TIMING), errors="ignore")
    for f in sorted(out.rglob("run.json")):
        doc = json.loads(f.read_text())
        got[f.relative_to(out).as_posix()] = {k: doc.get(k) for k in ("status", "result", "diverged_at", "error")}
    study = json.loads((out / "study.json").read_text())
    got["study.json"] = study["runs"]
    for f in sorted(out.rglob("arrays.npz")):
        with np.load(f, allow_pickle=False) as z:
            got[f.relative_to(out).as_posix()] = {k: z[k] for k in z.files}
    return got


def same_tables(a: dict, b: dict) -> list[str]:
    """What differs between two :func:`tables` results (empty when they agree)."""
    diffs = []
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            diffs.append(f"{k}: only in {'the reference' if k in a else 'the re-run'}")
            continue
        x, y = a[k], b[k]
        try:
            if isinstance(x, pd.DataFrame):
                pd.testing.assert_frame_equal(x, y, check_exact=False, rtol=1e-9, atol=1e-12)
            elif isinstance(x, dict) and x and all(isinstance(v, np.ndarray) for v in x.values()):
                assert set(x) == set(y)
                for n in x:
                    np.testing.assert_allclose(x[n], y[n], rtol=1e-9, atol=1e-12, equal_nan=True)
            else:
                assert x == y, (x, y)
        except AssertionError as exc:
            diffs.append(f"{k}: {str(exc).splitlines()[0] if str(exc) else 'differs'}")
    return diffs


def one_line(stderr: str) -> bool:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    return len(lines) == 1
