"""Issue 12 item 11: ``gradflow inspect`` on user code that misbehaves.

* any exception from the user's factory, model, inputs or loss is one line naming MODULE:FACTORY and
  the exception (type and message), exit 1, nothing written;
* ``--loss last`` on a model whose output is [T·B, V] (time and batch flattened) would give only one
  batch item a gradient: that is said, with what to pass instead, and no verdict is drawn;
* run.json records the loss actually used: the factory's own ("factory") or the probe ("last"/"all").
"""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from gradflow.cli.main import cli

MODELS = '''
import torch
from torch import nn

class Raising(nn.Module):
    def __init__(self, exc):
        super().__init__()
        self.rnn = nn.GRU(3, 4)
        self.exc = exc

    def forward(self, x):
        raise self.exc

class Flat(nn.Module):
    """A language-model head that flattens time and batch: output [T*B, V]."""
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 5)
        self.head = nn.Linear(5, 7)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out).reshape(-1, 7)

class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 4)

    def forward(self, x):
        return self.rnn(x)[0]

def value_error():
    return Raising(ValueError("widths do not match\\nsecond line"))

def key_error():
    return Raising(KeyError("vocab"))

def custom_error():
    class MyError(Exception):
        pass
    return Raising(MyError("custom"))

def factory_raises():
    raise ValueError("config missing")

def bad_loss():
    return {"model": Plain(), "inputs": torch.randn(4, 2, 3), "loss": lambda out: out.nope}

def bad_inputs():
    return {"model": Plain(), "inputs": lambda seed: 1 / 0}

def flat():
    torch.manual_seed(0)
    return Flat()

def plain():
    torch.manual_seed(0)
    return Plain()

def own_loss():
    torch.manual_seed(0)
    return {"model": Plain(), "inputs": torch.randn(4, 2, 3), "loss": lambda out: out[-1].sum()}
'''


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "faultymodels.py").write_text(textwrap.dedent(MODELS))
    return CliRunner()


@pytest.fixture
def no_report(monkeypatch):
    """These tests read run.json; the report (tested elsewhere) is not drawn, to keep them fast."""
    import gradflow.report

    monkeypatch.setattr(gradflow.report, "build_report", lambda *a, **k: {})


def _one_line_error(r):
    assert r.exit_code == 1, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    return lines[0]


USER_ERRORS = [
    ("value_error", "the model raised ValueError: widths do not match"),
    ("key_error", "the model raised KeyError: 'vocab'"),
    ("custom_error", "the model raised MyError: custom"),
    ("factory_raises", "raised ValueError: config missing"),
    ("bad_loss", "the loss raised AttributeError"),
    ("bad_inputs", "the inputs raised ZeroDivisionError"),
]


@pytest.mark.parametrize("factory,pattern", USER_ERRORS, ids=[f for f, _ in USER_ERRORS])
def test_user_code_exception_is_one_line_naming_the_factory(runner, tmp_path, factory, pattern):
    r = runner.invoke(cli, ["inspect", f"faultymodels:{factory}", "--shape", "4,2,3"])
    line = _one_line_error(r)
    assert f"faultymodels:{factory}" in line and pattern in line, line
    assert "Traceback" not in r.output
    assert not (tmp_path / "runs").exists() and not (tmp_path / "reports").exists()


def test_last_step_loss_on_flattened_output_is_refused_with_what_to_pass(runner, tmp_path, no_report):
    r = runner.invoke(cli, ["inspect", "faultymodels:flat", "--shape", "6,3,3", "--loss", "last"])
    line = _one_line_error(r)
    assert "faultymodels:flat" in line and "[18, 7]" in line, line
    assert "1 of the 3 batch items" in line and "--loss all" in line, line
    assert not (tmp_path / "runs").exists()  # nothing written, no verdict drawn
    r = runner.invoke(cli, ["inspect", "faultymodels:flat", "--shape", "6,3,3", "--loss", "all", "-q",
                            "--name", "flat"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "runs/flat/run.json").read_text())["spec"]["loss"] == "all"


@pytest.mark.parametrize("factory,args,loss", [
    ("plain", ["--shape", "4,2,3"], "last"),
    ("plain", ["--shape", "4,2,3", "--loss", "all"], "all"),
    ("own_loss", [], "factory"),
])
def test_run_json_records_the_loss_used(runner, tmp_path, no_report, factory, args, loss):
    r = runner.invoke(cli, ["inspect", f"faultymodels:{factory}", *args, "-q", "--name", "x"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "runs/x/run.json").read_text())["spec"]["loss"] == loss
