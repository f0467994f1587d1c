"""CLI tests with click's CliRunner: every command, good and bad inputs, nothing half-written."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from gradflow.cli.main import cli

TINY = """
name = "tiny"
title = "Tiny study"
claim = "A tiny spec used by the CLI tests."

[task]
name = "checksum"
T = 8

[model]
hidden = 6

[train]
steps = 4
batch = 4
eval_batch = 5
lr = 0.01
record_every = 2

[analysis]
warmup = 1
max_rank = 4

[[runs]]
cell = "rnn_tanh"

[[runs]]
label = "lstm clipped"
cell = "lstm"
train = { clip = { mode = "norm", threshold = 0.5 } }
"""


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return CliRunner()


def write(p: Path, text: str) -> Path:
    p.write_text(textwrap.dedent(text))
    return p


def invoke(runner, *args):
    return runner.invoke(cli, list(args), catch_exceptions=False)


def test_help_shows_examples(runner):
    r = invoke(runner, "--help")
    assert r.exit_code == 0 and "Examples" in r.output
    for cmd in ("demo", "run", "report", "inspect", "list"):
        r = invoke(runner, cmd, "--help")
        assert r.exit_code == 0, cmd
        assert "Example" in r.output, cmd


def test_list_analyses_dir(runner, tmp_path):
    (tmp_path / "mine" / "sweeps").mkdir(parents=True)
    write(tmp_path / "mine" / "x.toml", 'claim = "Gates keep gradients alive."\n')
    write(tmp_path / "mine" / "sweeps" / "y.toml", 'claim = """Horizon\n against gain."""\n')
    r = invoke(runner, "list", "--analyses-dir", "mine")
    assert r.exit_code == 0
    for word in ("checksum", "copy_memory", "agreement", "lstm", "gru", " x ", "Gates keep gradients alive.",
                 " y ", "Horizon against gain."):
        assert word in r.output
    assert "gain_cells" not in r.output  # the shipped specs are not listed with --analyses-dir


def test_run_writes_study_runs_tables_and_reports(runner, tmp_path):
    spec = write(tmp_path / "tiny.toml", TINY)
    r = invoke(runner, "run", str(spec), "--quiet")
    assert r.exit_code == 0, r.output
    lines = r.output.split()
    assert lines == ["runs/tiny", "reports/tiny/index.html", "reports/tiny/report.pdf"]
    study = json.loads((tmp_path / "runs/tiny/study.json").read_text())
    assert study["kind"] == "study" and study["runs"] == ["rnn_tanh", "lstm_clipped"]
    for run in study["runs"]:
        d = tmp_path / "runs/tiny" / run
        doc = json.loads((d / "run.json").read_text())
        assert doc["status"] == "finished"
        for table in ("metrics", "gradnorms", "distance", "decay", "spectra", "lyapunov", "summary"):
            df = pd.read_csv(d / f"{table}.csv")
            assert len(df) and set(df["run"]) == {doc["label"]}, table
    gates = pd.read_csv(tmp_path / "runs/tiny/lstm_clipped/gates.csv")
    assert set(gates["gate"]) >= {"i", "f", "o"}
    summary = pd.read_csv(tmp_path / "runs/tiny/lstm_clipped/summary.csv")
    assert summary["verdict"].str.contains("clipping by norm fired").any()
    # re-running reuses finished runs (nothing retrained) and rewrites the tables
    before = (tmp_path / "runs/tiny/rnn_tanh/metrics.csv").stat().st_mtime_ns
    r = invoke(runner, "run", str(spec), "--no-report")
    assert r.exit_code == 0 and "finished earlier" in r.output
    assert (tmp_path / "runs/tiny/rnn_tanh/metrics.csv").stat().st_mtime_ns == before
    # report from the run directories alone
    r = invoke(runner, "report", "runs/tiny", "--html", "out/r.html", "--pdf", "out/r.pdf")
    assert r.exit_code == 0 and (tmp_path / "out/r.html").stat().st_size > 10_000
    assert (tmp_path / "out/r.pdf").read_bytes()[:4] == b"%PDF"


BAD_SPECS = [
    ("unknown top key", TINY.replace('claim = "', 'clam = "x"\nclaim = "'), r"unknown key 'clam'; did you mean 'claim'"),
    ("unknown train key", TINY.replace("steps = 4", "stpes = 4"), r"\[train\] unknown key 'stpes'; did you mean 'steps'"),
    ("wrong type", TINY.replace("lr = 0.01", 'lr = "fast"'), r"\[train\] lr must be a positive finite number, got .fast."),
    ("unknown cell", TINY.replace('cell = "lstm"', 'cell = "lstn"'), r"unknown cell 'lstn'; did you mean 'lstm'"),
    ("unknown task", TINY.replace('name = "checksum"', 'name = "checksun"'), r"unknown task 'checksun'"),
    ("task option", TINY.replace("T = 8", "T = 8\nlenght = 3"), r"no option 'lenght'"),
    ("no claim", TINY.replace('claim = "A tiny spec used by the CLI tests."', ""), r"missing 'claim'"),
    ("no runs", TINY.split("[[runs]]")[0], r"needs at least one \[\[runs\]\]"),
    ("bad toml", TINY.replace("[task]", "[task"), r"not valid TOML"),
    ("bad clip", TINY.replace("threshold = 0.5", "threshold = -1"), r"train.clip\] threshold must be a positive finite number, got -1"),
    ("impossible length", TINY.replace("T = 8", "T = 0"), r"T"),
]


@pytest.mark.parametrize("name,text,pattern", BAD_SPECS, ids=[b[0] for b in BAD_SPECS])
def test_run_bad_spec_one_line_error_nothing_written(runner, tmp_path, name, text, pattern):
    import re

    spec = write(tmp_path / "bad.toml", text)
    r = runner.invoke(cli, ["run", str(spec)])
    assert r.exit_code != 0
    err = r.output.strip()
    assert err.startswith("Error: ") and "\n" not in err, err
    assert re.search(pattern, err), err
    assert "bad.toml" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_run_missing_file(runner, tmp_path):
    r = runner.invoke(cli, ["run", "nope.toml"])
    assert r.exit_code != 0 and "nope.toml: spec file not found" in r.output
    assert not (tmp_path / "runs").exists()


def test_report_errors_leave_nothing(runner, tmp_path):
    r = runner.invoke(cli, ["report", "missing_dir", "--html", "x.html"])
    assert r.exit_code != 0 and "missing_dir" in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "x.html").exists()
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "run.json").write_text('{"kind": "trace", "schema_version": 1}')
    r = runner.invoke(cli, ["report", "notarun", "--html", "x.html", "--pdf", "x.pdf"])
    assert r.exit_code != 0 and "notarun" in r.output
    assert not (tmp_path / "x.html").exists() and not (tmp_path / "x.pdf").exists()


USER_MODULE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LSTM(3, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        out, _ = self.enc(x)
        return self.head(out)

def make():
    torch.manual_seed(0)
    return Net()

def make_dict():
    torch.manual_seed(0)
    net = Net()
    return {"model": net, "inputs": lambda seed: torch.randn(2, 7, 3, generator=torch.Generator().manual_seed(seed)),
            "loss": lambda out: out[:, -1].sum()}

def make_wrong():
    return 42

def make_linear():
    return nn.Linear(3, 3)
"""


def test_inspect_user_model(runner, tmp_path):
    write(tmp_path / "usermodels.py", USER_MODULE)
    r = invoke(runner, "inspect", "usermodels:make", "--shape", "6,3,3", "--batch-first", "--passes", "2", "-q")
    assert r.exit_code == 0, r.output
    run_dir = tmp_path / "runs/inspect-make"
    assert r.output.split()[0] == "runs/inspect-make"
    keys = set(pd.read_csv(run_dir / "distance.csv")["key"])
    assert keys == {f"enc/l{l}/d0/{s}" for l in (0, 1) for s in ("h", "c", "hc")}
    g = pd.read_csv(run_dir / "gradnorms.csv")
    assert sorted(set(g["step"])) == [0, 1]
    assert (tmp_path / "reports/inspect-make/index.html").exists()
    r = invoke(runner, "inspect", "usermodels:make_dict", "-q", "--name", "d")
    assert r.exit_code == 0, r.output
    assert pd.read_csv(tmp_path / "runs/d/distance.csv")["distance"].max() == 6


INSPECT_ERRORS = [
    (["nomodule:make", "--shape", "2,2,3"], "cannot import module 'nomodule'"),
    (["usermodels", "--shape", "2,2,3"], "expected MODULE:FACTORY"),
    (["usermodels:nothere", "--shape", "2,2,3"], "has no attribute 'nothere'"),
    (["usermodels:make_wrong", "--shape", "2,2,3"], "must return an nn.Module"),
    (["usermodels:make_linear", "--shape", "2,2,3"], "no recurrent module"),
    (["usermodels:make"], "give --shape"),
    (["usermodels:make", "--shape", "2,2"], "--shape must be T,B,F"),
    (["usermodels:make", "--shape", "4,2,5", "--batch-first"], "input feature size 5 != input_size 3"),
]


@pytest.mark.parametrize("args,pattern", INSPECT_ERRORS, ids=[a[1] for a in INSPECT_ERRORS])
def test_inspect_errors(runner, tmp_path, args, pattern):
    write(tmp_path / "usermodels.py", USER_MODULE)
    r = runner.invoke(cli, ["inspect", *args])
    assert r.exit_code != 0
    assert pattern in r.output and r.output.strip().count("\n") == 0, r.output
    assert not (tmp_path / "reports").exists()


def test_demo_quick(runner, tmp_path):
    r = invoke(runner, "demo", "--steps", "3", "--quiet")
    assert r.exit_code == 0, r.output
    assert r.output.split() == ["reports/demo/index.html", "reports/demo/report.pdf"]
    study = json.loads((tmp_path / "runs/demo/study.json").read_text())
    assert len(study["runs"]) == 5


def test_run_resumes_an_interrupted_run(runner, tmp_path):
    spec = write(tmp_path / "tiny.toml", TINY)
    assert invoke(runner, "run", str(spec), "-q", "--no-report").exit_code == 0
    doc_path = tmp_path / "runs/tiny/lstm_clipped/run.json"
    doc = json.loads(doc_path.read_text())
    doc["status"] = "running"  # as a killed run leaves it
    doc_path.write_text(json.dumps(doc))
    before = (tmp_path / "runs/tiny/rnn_tanh/metrics.csv").stat().st_mtime_ns
    r = invoke(runner, "run", str(spec), "--no-report")
    assert r.exit_code == 0, r.output
    assert json.loads(doc_path.read_text())["status"] == "finished"
    assert (tmp_path / "runs/tiny/rnn_tanh/metrics.csv").stat().st_mtime_ns == before
    (tmp_path / "runs/tiny/rnn_tanh").mkdir(exist_ok=True)
    stray = tmp_path / "runs/tiny/stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    from gradflow.study import _clear_unfinished
    from gradflow.errors import GradflowError

    with pytest.raises(GradflowError, match="not a gradflow run directory"):
        _clear_unfinished(stray)
    assert (stray / "notes.txt").exists()


PER_STEP = """
claim = "With a loss at every step the distance profile comes from G[s, t], not the summed loss."
[task]
name = "copy_memory"
T = 4
n_copy = 2
[model]
hidden = 6
[train]
steps = 2
batch = 3
eval_batch = 4
record_every = 1
[[runs]]
cell = "lstm"
"""


def test_per_step_loss_profile_uses_the_gradient_matrix(runner, tmp_path):
    import torch

    from gradflow import analysis as A
    from gradflow.trace import Trace

    spec = write(tmp_path / "ps.toml", PER_STEP)
    assert invoke(runner, "run", str(spec), "-q", "--no-report").exit_code == 0
    d = tmp_path / "runs/ps/lstm"
    decay = pd.read_csv(d / "decay.csv")
    assert decay["key"].tolist() == ["rnn/l0/d0/h"]  # one profile for the joint state
    dist = pd.read_csv(d / "distance.csv")
    tr = Trace.load(d / "trace").subset(slice(0, 16))
    expected = A.distance_profile(A.gradient_matrix(tr, "rnn/l0/d0/h")).table
    assert dist["q50"].to_numpy() == pytest.approx(expected["q50"].to_numpy(), rel=1e-9)
    assert torch.isfinite(torch.tensor(dist["q50"].to_numpy())).all()


def test_lstm_joint_profile_is_the_norm_of_the_concatenated_state_gradient(tmp_path):
    """The '/hc' distance table is built from sqrt(||δh||² + ||δc||²); check it against the norm of
    the concatenated recorded gradients [δh; δc] (an independent route through trace.grad)."""
    import numpy as np
    import torch
    from torch import nn

    import gradflow
    from gradflow.analysis import analyze_trace

    torch.manual_seed(0)
    m = nn.LSTM(3, 5).double()
    with gradflow.record(m, keep="states") as rec:
        out, _ = m(torch.randn(12, 6, 3, dtype=torch.float64))
        out[-1].pow(2).sum().backward()
    tabs = analyze_trace(rec.trace, {"warmup": 0, "horizon_fraction": 1e-3, "max_rank": 4, "batch_limit": 6})
    joint = tabs["distance"][tabs["distance"]["key"] == "<root>/l0/d0/hc"].sort_values("distance")
    g = torch.cat([rec.trace.grad("<root>/l0/d0/h"), rec.trace.grad("<root>/l0/d0/c")], -1)
    logn = torch.log10(torch.linalg.vector_norm(g, dim=-1)).numpy()  # [T, B]
    expected = np.median(logn[::-1], axis=1)  # distance d = T-1-t
    np.testing.assert_allclose(joint["q50"].to_numpy(), expected, rtol=1e-10)
    assert tabs["summary"]["key"].tolist() == ["<root>/l0/d0/hc"]
