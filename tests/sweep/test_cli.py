"""``gradflow sweep`` through click's CliRunner: outputs, one-line errors, exit codes."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from gradflow.cli.main import cli


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def _one_line_error(r):
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


def test_dry_run_lists_runs(runner, write_sweep):
    spec = write_sweep({"cell": ["lstm", "gru"], "seed": [0, 1]})
    r = runner.invoke(cli, ["sweep", str(spec), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["lstm_seed_0\tlstm seed=0", "lstm_seed_1\tlstm seed=1",
                                     "gru_seed_0\tgru seed=0", "gru_seed_1\tgru seed=1"]


@pytest.mark.parametrize("axes, args, match", [
    ({"cell": ["lstm"], "gian": [1.0]}, [], "did you mean 'gain'"),
    ({"cell": ["lstm"]}, ["--address", "x:1"], "--address applies to --engine ray"),
    ({"cell": ["lstm"]}, ["--workers", "0"], "Invalid value for '--workers'"),
    ({"cell": ["lstm"]}, ["--engine", "dask"], "Invalid value for '--engine'"),
])
def test_bad_input_is_one_line_and_writes_nothing(runner, write_sweep, tmp_path, axes, args, match):
    spec = write_sweep(axes)
    r = runner.invoke(cli, ["sweep", str(spec), "--out", "o", *args])
    if "Invalid value" in match:
        assert r.exit_code == 2 and match in r.output
    else:
        assert match in _one_line_error(r)
    assert not (tmp_path / "o").exists()


def test_missing_spec(runner):
    assert "spec file not found" in _one_line_error(runner.invoke(cli, ["sweep", "nope.toml"]))


def test_ray_engine_without_ray_is_one_line(runner, write_sweep, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    spec = write_sweep({"cell": ["gru"]})
    line = _one_line_error(runner.invoke(cli, ["sweep", str(spec), "--engine", "ray", "--out", "o"]))
    assert "pip install 'gradflow[ray]'" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_failed_run_exits_non_zero_after_the_others_finish(runner, write_sweep, tmp_path):
    spec = write_sweep({"cell": ["gru"], "train.device": ["cpu", "cuda:99"]})
    r = runner.invoke(cli, ["sweep", str(spec), "--out", "o", "--workers", "2", "-q"])
    line = r.stderr.strip()
    assert r.exit_code == 1 and "\n" not in line
    assert line.startswith("Error: 1 of 2 runs failed: 'gru device=cuda:99'") and "sweep.csv" in line
    assert r.stdout.splitlines() == ["o", "o/sweep.csv"]
    t = pd.read_csv(tmp_path / "o" / "sweep.csv")
    assert dict(zip(t["train.device"], t["status"])) == {"cpu": "finished", "cuda:99": "failed"}
    study = json.loads((tmp_path / "o" / "study.json").read_text())
    assert study["runs"] == ["gru_device_cpu", "gru_device_cuda_99"]
    # the report reader takes the whole sweep, failed run included
    from gradflow.report.load import load_runs

    rs = load_runs([tmp_path / "o"])
    assert [x.status for x in rs.runs] == ["finished", "failed"]
