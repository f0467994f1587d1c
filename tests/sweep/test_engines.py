"""Sweeps end to end: local pool and Ray give the same tables; re-running finishes only what is
missing; a failing run is recorded and the others complete."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gradflow.sweep import load_sweep, run_sweep

from .conftest import AXES24

TIMING = ["seconds"]


def _tables(out, runs, name):
    return {r.dirname: pd.read_csv(out / r.dirname / f"{name}.csv").drop(columns=TIMING, errors="ignore")
            for r in runs}


@pytest.mark.slow
def test_local_and_ray_sweeps_of_24_runs_give_identical_tables(write_sweep, tmp_path):
    ray = pytest.importorskip("ray")
    s = load_sweep(write_sweep(AXES24))
    assert len(s.runs) == 24
    local = run_sweep(s, tmp_path / "local", engine="local", workers=2)
    assert not local.failed and {o.action for o in local.outcomes} == {"trained"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(s, tmp_path / "ray", engine="ray")
    finally:
        ray.shutdown()
    assert not remote.failed and len(remote.outcomes) == 24
    a, b = pd.read_csv(tmp_path / "local" / "sweep.csv"), pd.read_csv(tmp_path / "ray" / "sweep.csv")
    assert set(a["run"]) == {r.label for r in s.runs} and set(a["status"]) == {"finished"}  # a row per run x key
    assert list(a.columns[:6]) == ["run", "dir", "cell", "gain", "task.T", "seed"]
    assert np.isfinite(a["decay_rate"]).all()
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9)
    for name in ("metrics", "decay", "gradnorms"):
        ta, tb = _tables(tmp_path / "local", s.runs, name), _tables(tmp_path / "ray", s.runs, name)
        for d in ta:
            pd.testing.assert_frame_equal(ta[d], tb[d], check_exact=False, rtol=1e-9)
    study = json.loads((tmp_path / "local" / "study.json").read_text())
    assert study["kind"] == "study" and study["runs"] == [r.dirname for r in s.runs]

    from gradflow.report.load import load_runs

    rs = load_runs([tmp_path / "local"])
    assert len(rs.runs) == 24 and len(rs.table("decay")) == len(a)


@pytest.mark.slow
def test_rerun_finishes_only_missing_runs_and_failed_runs_are_reported(write_sweep, tmp_path):
    axes = {"cell": ["rnn_tanh", "gru"], "seed": [0, 1], "train.device": ["cpu", "cuda:99"]}
    spec = write_sweep(axes)
    s = load_sweep(spec)
    out = tmp_path / "sw"
    first = run_sweep(s, out, workers=2)
    failed = {o.label for o in first.failed}
    assert failed == {r.label for r in s.runs if r.train["device"] == "cuda:99"}
    assert all(o.error for o in first.failed) and len(first.outcomes) == 8
    for r in s.runs:
        doc = json.loads((out / r.dirname / "run.json").read_text())
        assert doc["status"] == ("failed" if r.label in failed else "finished")
        if r.label in failed:
            assert "cuda" in doc["error"].lower() or "device" in doc["error"].lower()
    table = pd.read_csv(out / "sweep.csv")
    assert set(table.loc[table["train.device"] == "cuda:99", "status"]) == {"failed"}
    assert table.loc[table["train.device"] == "cuda:99", "error"].notna().all()

    # simulate a killed sweep: one run directory gone, one left "running" mid-way
    ok = [r for r in s.runs if r.label not in failed]
    gone, running, kept = ok[0], ok[1], ok[2:]
    import shutil

    shutil.rmtree(out / gone.dirname)
    f = out / running.dirname / "run.json"
    doc = json.loads(f.read_text())
    doc["status"] = "running"
    f.write_text(json.dumps(doc))
    before = {r.dirname: (out / r.dirname / "run.json").stat().st_mtime_ns for r in kept}
    trained = {r.dirname: (out / r.dirname / "metrics.csv").stat().st_mtime_ns for r in kept}
    second = run_sweep(s, out, workers=2)
    acts = {o.label: o.action for o in second.outcomes}
    assert acts[gone.label] == acts[running.label] == "trained"
    assert all(acts[r.label] == "reused" for r in kept)
    assert all(acts[lab] == "failed" for lab in failed)  # failed runs are retried, and fail again
    assert {r.dirname: (out / r.dirname / "run.json").stat().st_mtime_ns for r in kept} == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "sweep.csv"), table, check_exact=False, rtol=1e-9)

    # changed analysis settings: tables rebuilt, nothing trained again
    spec.write_text(spec.read_text().replace("batch_limit = 4", "batch_limit = 3"))
    third = run_sweep(load_sweep(spec), out, workers=2)
    acts = {o.label: o.action for o in third.outcomes}
    assert all(acts[r.label] == "analysed" for r in ok)
    # the training files are not rewritten (run.json is: the analysis records its config there)
    assert {r.dirname: (out / r.dirname / "metrics.csv").stat().st_mtime_ns for r in kept} == trained
