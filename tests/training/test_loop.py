"""The training loop: run directory, determinism, clipping in the loop, divergence, failure, kill."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gradflow.errors import GradflowError
from gradflow.tables import check_columns
from gradflow.tasks import get_task
from gradflow.trace import Trace
from gradflow.training import Clip, Schedule, TrainConfig, train, train_task

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(task_options=dict(T=8), model_options=dict(hidden=8), steps=12, batch=4, eval_batch=6,
             schedule=Schedule(every=5), progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cell", ["gru", "lstm", "mgu"])
def test_run_directory(tmp_path, cell):
    d = tmp_path / "run"
    r = train_task("checksum", cell, run_dir=d, **SMALL)
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files == ["clip_timesteps.csv", "gradnorms.csv", "metrics.csv", "run.json",
                     "trace/arrays.npz", "trace/norms.csv", "trace/trace.json"]
    doc = json.loads((d / "run.json").read_text())
    assert doc["kind"] == "run" and doc["schema_version"] == 1
    assert doc["status"] == "finished" and doc["diverged_at"] is None
    assert doc["name"] == "run" and doc["label"] == cell
    assert doc["task"]["name"] == "checksum" and doc["task"]["T"] == 8 and doc["task"]["chance"] == 0.25
    assert doc["task"]["loss"] == "cross_entropy" and doc["task"]["solved"] == "accuracy >= 0.99"
    assert doc["model"]["cell"] == cell and doc["model"]["hidden"] == 8
    assert doc["model"]["n_params"] == sum(p.numel() for p in r.model.parameters())
    assert doc["clip"] == {"mode": "none", "threshold": None}
    meta = doc["meta"]
    assert meta["torch"] == torch.__version__ and meta["seed"] == 0 and meta["device"] == "cpu"
    assert meta["started"] <= meta["finished"]
    assert doc["spec"]["train"]["steps"] == 12 and doc["spec"]["task_options"]["T"] == 8
    assert doc["result"]["steps_done"] == 12 and 0 <= doc["result"]["eval_metric"] <= 1

    m = pd.read_csv(d / "metrics.csv")
    check_columns("metrics", m.columns)
    assert m["step"].tolist() == list(range(12)) and (m["run"] == cell).all()
    assert m.loc[m["recorded"], "step"].tolist() == [0, 5, 10]
    pd.testing.assert_frame_equal(m, r.metrics, check_dtype=False)
    g = pd.read_csv(d / "gradnorms.csv")
    check_columns("gradnorms", g.columns)
    keys = {"gru": ["rnn/l0/d0/h"], "lstm": ["rnn/l0/d0/c", "rnn/l0/d0/h"], "mgu": ["rnn.cells.0/l0/d0/h"]}[cell]
    assert sorted(g["key"].unique()) == keys
    assert sorted(g["step"].unique()) == [0, 5, 10] and (g["n"] == 4).all()
    assert len(g) == 3 * len(keys) * 8 and (g["distance"] == 7 - g["t"]).all()
    c = pd.read_csv(d / "clip_timesteps.csv")
    check_columns("clip_timesteps", c.columns)
    assert len(c) == 2 * len(g) and set(c["when"]) == {"before", "after"}

    tr = Trace.load(d / "trace")
    assert tr.keep == "states" and sorted(str(k) for k in tr.keys()) == keys
    k = tr.keys(state="h")[0]
    assert tuple(tr.states(k).shape) == (8, 6, 8) and tuple(tr.inputs(k).shape) == (8, 6, 9)
    assert tr.meta["step"] == 11 and tr.meta["batch"] == "eval"
    torch.testing.assert_close(tr.norm(k), r.trace.norm(k))


def test_same_seed_same_run_and_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = train_task("checksum", "gru", **SMALL)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_task("checksum", "gru", **SMALL)
    c = train_task("checksum", "gru", **{**SMALL, "seed": 1})
    assert a.metrics["loss"].tolist() == b.metrics["loss"].tolist()
    assert a.metrics["loss"].tolist() != c.metrics["loss"].tolist()
    assert a.gradnorms["q50"].tolist() == b.gradnorms["q50"].tolist()


@pytest.mark.parametrize("clip", [Clip("norm", 0.05), Clip("value", 0.01), Clip()])
def test_clipping_in_the_loop(clip):
    r = train_task("checksum", "rnn_tanh", clip=clip, optimizer="sgd", lr=0.1, **SMALL)
    m = r.metrics
    before, after = m["grad_norm_before"].to_numpy(), m["grad_norm_after"].to_numpy()
    if clip.mode == "norm":
        np.testing.assert_allclose(after, np.minimum(before, 0.05), rtol=1e-6)
        assert (m["clipped"] == (before > 0.05)).all() and m["clipped"].any()
        np.testing.assert_allclose(m["cosine"], 1.0, atol=1e-6)
    elif clip.mode == "value":
        assert (after <= before + 1e-12).all() and m["clipped"].all()
        assert (m["cosine"] < 1 - 1e-6).any() and (m["cosine"] > 0).all()
    else:
        np.testing.assert_array_equal(after, before)
        assert not m["clipped"].any()
    # plain SGD steps along the applied gradient: update direction = -g_applied
    np.testing.assert_allclose(m["update_cosine"], m["cosine"], atol=1e-5)
    # per-timestep norms after clipping = before scaled by the global factor
    ct = r.clip_timesteps.pivot_table(index=["step", "key", "t"], columns="when", values="log10_norm")
    factor = np.log10(after / before)[ct.index.get_level_values("step")]
    np.testing.assert_allclose(ct["after"] - ct["before"], factor, atol=1e-9)


class _Poison(torch.nn.Module):
    """Wraps a model: makes the loss NaN (``what="loss"``) or one gradient Inf (``"grad"``) on the
    forward call number ``at`` (0-based)."""

    def __init__(self, inner, what, at):
        super().__init__()
        self.inner, self.what, self.at, self.calls = inner, what, at, 0

    def forward(self, x):
        out = self.inner(x)
        hit = self.calls == self.at
        self.calls += 1
        if hit and self.what == "loss":
            return out * float("nan")
        if hit and self.what == "grad":
            out.register_hook(lambda g: g * float("inf"))
        return out


@pytest.mark.parametrize("what,at", [("loss", 3), ("grad", 4), ("loss", 0)])
def test_divergence_stops_cleanly(tmp_path, what, at):
    from gradflow.models import model_for_task

    task = get_task("checksum", T=6)
    cfg = TrainConfig(steps=20, batch=4, eval_batch=4, schedule=Schedule(every=2), lr=0.01)
    model = _Poison(model_for_task(task, "gru", hidden=5, seed=0), what, at)
    r = train(task, model, cfg, run_dir=tmp_path / "d", progress=False)
    assert r.status == "diverged" and r.diverged_at == at
    doc = json.loads((tmp_path / "d" / "run.json").read_text())
    assert doc["status"] == "diverged" and doc["diverged_at"] == at and doc["meta"]["finished"]
    m = pd.read_csv(tmp_path / "d" / "metrics.csv")
    assert m["step"].tolist() == list(range(at + 1))
    last = m.iloc[-1]
    assert not math.isfinite(last["grad_norm_before"])
    assert math.isfinite(last["loss"]) == (what == "grad")
    assert np.isfinite(m["loss"].iloc[:-1]).all()
    # the update of the diverged step was not applied: parameters equal those after `at` good steps
    if at:
        ref = train(task, model_for_task(task, "gru", hidden=5, seed=0), TrainConfig(
            **{**cfg.__dict__, "steps": at, "final_trace": False}), progress=False)
        for p, q in zip(model.inner.parameters(), ref.model.parameters()):
            assert torch.equal(p, q)
    if what == "grad" and at % 2 == 0:  # recorded step: the non-finite gradients are in the table
        g = pd.read_csv(tmp_path / "d" / "gradnorms.csv")
        assert (g.loc[g["step"] == at, "frac_nonfinite"] > 0).all()
    assert (tmp_path / "d" / "trace" / "trace.json").exists()


class _Failing:
    """A task whose sampler raises on the n-th batch."""

    def __init__(self, task, n):
        self.task, self.n, self.calls = task, n, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def sample(self, batch, seed=None):
        self.calls += 1
        if self.calls > self.n:
            raise RuntimeError("disk on fire\nsecond line")
        return self.task.sample(batch, seed)


def test_failure_marks_the_run_failed(tmp_path):
    from gradflow.models import model_for_task

    task = get_task("checksum", T=6)
    cfg = TrainConfig(steps=50, batch=4, flush_every=2, schedule=Schedule(every=4))
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(_Failing(task, 7), model_for_task(task, "gru", hidden=5), cfg, run_dir=tmp_path / "d", progress=False)
    doc = json.loads((tmp_path / "d" / "run.json").read_text())
    assert doc["status"] == "failed" and doc["error"] == "RuntimeError: disk on fire"
    assert pd.read_csv(tmp_path / "d" / "metrics.csv")["step"].tolist() == list(range(7))


def test_refuses_a_non_empty_run_directory(tmp_path):
    (tmp_path / "x").write_text("keep me")
    with pytest.raises(GradflowError, match="already exists and is not empty"):
        train_task("checksum", "gru", run_dir=tmp_path, **SMALL)
    assert (tmp_path / "x").read_text() == "keep me"


def test_progress_bar_can_be_disabled(capfd):
    train_task("checksum", "gru", **{**SMALL, "progress": True})
    assert "/12 [" in capfd.readouterr().err
    train_task("checksum", "gru", **SMALL)
    assert capfd.readouterr().err == ""


@pytest.mark.slow
def test_killed_run_leaves_a_readable_directory(tmp_path):
    d = tmp_path / "killed"
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from gradflow.training import train_task, Schedule\n"
        f"train_task('checksum', 'gru', task_options=dict(T=10), model_options=dict(hidden=8), steps=10**6, "
        f"batch=4, flush_every=5, schedule=Schedule(every=7), run_dir={str(d)!r}, progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    try:
        deadline = time.time() + 180  # generous: a loaded 2-core machine imports torch slowly

        def progressed():
            try:
                return (d / "gradnorms.csv").exists() and len(pd.read_csv(d / "metrics.csv")) >= 15
            except (FileNotFoundError, pd.errors.EmptyDataError):
                return False

        while time.time() < deadline:
            if progressed():
                break
            if proc.poll() is not None:
                pytest.fail(f"the training subprocess exited early with code {proc.returncode}")
            time.sleep(0.2)
        else:
            pytest.fail("the training subprocess wrote no metrics within 180 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    doc = json.loads((d / "run.json").read_text())
    assert doc["status"] == "running" and doc["meta"]["finished"] is None
    m = pd.read_csv(d / "metrics.csv")
    check_columns("metrics", m.columns)
    assert m["step"].tolist() == list(range(len(m))) and len(m) >= 15
    g = pd.read_csv(d / "gradnorms.csv")
    assert set(g["step"]) <= set(range(0, len(m) + 7, 7))
    assert all(p.name in {"run.json", "metrics.csv", "gradnorms.csv", "clip_timesteps.csv"} or p.name.startswith(".")
               for p in d.iterdir())
