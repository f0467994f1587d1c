"""--memory and the analysis plan through the CLI: printed, stored in run.json, shown in the report;
an over-budget unit is one line, exit non-zero, nothing written."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from gradflow.cli.main import cli

from .test_cli import TINY, USER_MODULE, write


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def test_inspect_prints_and_stores_the_plan(runner, tmp_path):
    write(tmp_path / "usermodels.py", USER_MODULE)
    r = runner.invoke(cli, ["inspect", "usermodels:make", "--shape", "6,3,3", "--batch-first", "--memory", "512MB"])
    assert r.exit_code == 0, r.output
    assert "plan enc/l0/d0/h: all 10 singular values at all 6 steps, dense" in r.output
    doc = json.loads((tmp_path / "runs/inspect-make/run.json").read_text())
    assert doc["analysis"]["config"]["memory"] == 512 * 10**6
    plans = doc["analysis"]["plans"]
    assert [p["unit"] for p in plans] == ["enc/l0/d0/h", "enc/l1/d0/h"]
    assert all(p["spectra"] == "dense" and p["S"] == 10 and p["T"] == 6 and p["B"] == 3 for p in plans)
    html = (tmp_path / "reports/inspect-make/index.html").read_text()
    assert "Analysis plan of inspect-make: enc/l0/d0/h: all 10 singular values at all 6 steps, dense" in html


@pytest.mark.parametrize("memory,pattern", [
    ("2KB", r"enc/l0/d0/h: the analysis needs about .* even one timestep at a time \(S=10, T=6, B=3\), over the "
            r"memory budget of 2 KB; raise it \(--memory / memory= / \[analysis\] memory\)"),
    ("lots", r"--memory must be a size like '2GB', '512MB' or '1.5GiB', got 'lots'"),
])
def test_over_budget_and_bad_memory_are_one_line_and_write_nothing(runner, tmp_path, memory, pattern):
    import re

    write(tmp_path / "usermodels.py", USER_MODULE)
    r = runner.invoke(cli, ["inspect", "usermodels:make", "--shape", "6,3,3", "--batch-first", "--memory", memory])
    assert r.exit_code != 0
    assert r.exception is None or isinstance(r.exception, SystemExit)  # no traceback
    lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_run_memory_reaches_run_json(runner, tmp_path):
    spec = write(tmp_path / "tiny.toml", TINY.replace("max_rank = 4", "max_rank = 4\nk = 4"))
    r = runner.invoke(cli, ["run", str(spec), "--no-report", "--memory", "1GB", "--steps", "2"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "runs/tiny/rnn_tanh/run.json").read_text())
    assert f"rnn_tanh: plan {doc['analysis']['plans'][0]['text']}" in r.output  # printed as well as stored
    assert doc["analysis"]["config"]["memory"] == 10**9 and doc["analysis"]["config"]["k"] == 4
    assert doc["analysis"]["plans"][0]["text"].endswith("of 1 GB")
