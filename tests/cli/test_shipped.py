"""``gradflow run NAME`` / ``--copy`` / ``--steps`` and ``gradflow sweep NAME`` with CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from gradflow import catalog
from gradflow.cli._specs import with_steps
from gradflow.cli.main import cli
from gradflow.errors import SpecError

from .test_cli import TINY

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """A stand-in for the shipped analyses: tiny.toml (a study) and sweeps/tinysweep.toml."""
    d = tmp_path / "shipped"
    (d / "sweeps").mkdir(parents=True)
    (d / "tiny.toml").write_text(TINY)
    (d / "sweeps" / "tinysweep.toml").write_text(TINY.split("[[runs]]")[0].replace('name = "tiny"', 'name = "ts"')
                                                 + '[sweep]\ncell = ["rnn_tanh", "gru"]\n')
    monkeypatch.setattr(catalog, "analyses_dir", lambda: d)
    return d


def _one_line_error(r) -> str:
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    return lines[0]


def test_run_by_name_with_steps(runner, shipped, tmp_path):
    r = runner.invoke(cli, ["run", "tiny", "--steps", "3", "--no-report"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert f"from {shipped / 'tiny.toml'}" in r.output and r.output.splitlines()[-1] == "runs/tiny"
    for run in ("rnn_tanh", "lstm_clipped"):
        metrics = pd.read_csv(tmp_path / "runs/tiny" / run / "metrics.csv")
        assert sorted(metrics["step"]) == [0, 1, 2]  # 3 steps, not the spec's 4
        assert json.loads((tmp_path / "runs/tiny" / run / "run.json").read_text())["status"] == "finished"
    assert not (tmp_path / "reports").exists()


def test_copy_then_run_the_copy(runner, shipped, tmp_path):
    r = runner.invoke(cli, ["run", "--copy", "tiny"])
    assert r.exit_code == 0 and r.output.strip() == "tiny.toml"
    assert (tmp_path / "tiny.toml").read_bytes() == (shipped / "tiny.toml").read_bytes()
    assert not (tmp_path / "runs").exists()  # --copy runs nothing
    # a second copy would overwrite the (maybe edited) file: refused in one line
    (tmp_path / "tiny.toml").write_text(TINY.replace('name = "tiny"', 'name = "mine"'))
    assert "tiny.toml: already exists" in _one_line_error(runner.invoke(cli, ["run", "--copy", "tiny"]))
    assert 'name = "mine"' in (tmp_path / "tiny.toml").read_text()
    assert "is the spec itself" in _one_line_error(runner.invoke(cli, ["run", "--copy", "tiny.toml"]))
    r = runner.invoke(cli, ["run", "tiny.toml", "--steps", "1", "--no-report", "-q"])
    assert r.exit_code == 0 and r.output.split() == ["runs/mine"]


def test_unknown_names_are_one_line_errors(runner, shipped, tmp_path):
    line = _one_line_error(runner.invoke(cli, ["run", "tinny"]))
    assert "tinny: no such spec file and no shipped study spec" in line and "did you mean 'tiny'" in line
    assert "use gradflow sweep tinysweep" in _one_line_error(runner.invoke(cli, ["run", "tinysweep"]))
    assert "use gradflow run tiny" in _one_line_error(runner.invoke(cli, ["sweep", "tiny"]))
    assert "nope.toml: spec file not found" in _one_line_error(runner.invoke(cli, ["run", "nope.toml"]))
    assert not (tmp_path / "runs").exists()


def test_sweep_by_name_and_copy(runner, shipped, tmp_path):
    r = runner.invoke(cli, ["sweep", "tinysweep", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert [ln.split("\t")[0] for ln in r.output.splitlines()] == ["rnn_tanh", "gru"]
    r = runner.invoke(cli, ["sweep", "--copy", "tinysweep"])
    assert r.exit_code == 0 and (tmp_path / "tinysweep.toml").is_file()


def test_shipped_sweeps_resolve_by_name(runner, tmp_path):
    r = runner.invoke(cli, ["sweep", "length", "--dry-run"])
    assert r.exit_code == 0 and len(r.output.splitlines()) > 3, r.output


def test_with_steps_replaces_every_schedule():
    doc = {"train": {"steps": 400, "record_per_decade": 4},
           "runs": [{"cell": "lstm", "train": {"steps": 900, "record_steps": [5, 800]}}, {"cell": "gru"}]}
    out = with_steps(doc, 7)
    for t in (out["train"], out["runs"][0]["train"], out["runs"][1]["train"]):
        assert t == {"steps": 7, "record_every": 2}
    assert doc["runs"][0]["train"]["steps"] == 900  # the input is not changed
    assert with_steps({"runs": "x"}, 1) == {"runs": "x", "train": {"steps": 1, "record_every": 1}}


def test_copy_of_a_missing_file(tmp_path):
    from gradflow.cli._specs import copy_spec

    with pytest.raises(SpecError, match="spec file not found"):
        copy_spec(tmp_path / "nope.toml", tmp_path / "out")
