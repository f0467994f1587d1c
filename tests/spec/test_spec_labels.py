"""Run labels map to distinct directories inside the study directory (issue 12 item 1): labels
that sanitise to one name, to "." / "..", or to a name gradflow itself uses there are rejected at
parse time with one line naming the file and the labels; nothing is trained or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradflow.errors import SpecError
from gradflow.spec import check_run_dirs, parse_spec

BASE = {"claim": "labels map to distinct directories", "task": {"name": "adding", "T": 4},
        "train": {"steps": 1, "batch": 2, "eval_batch": 2, "record_every": 1}}

CLASHES = [  # labels, a word the message must contain
    (["a b", "a_b"], "share"),
    (["x/y", "x y"], "share"),
    (["LSTM", "lstm"], "share"),          # one directory on a case-insensitive file system
    (["."], "."),
    ([".."], ".."),
    (["../.."], ".."),                    # sanitises to ".._.." : hidden name, refused
    (["..hidden"], "hidden"),
    ([".x.trash-1"], "hidden"),           # would be swept away as a leftover of an interrupted run
    (["study.json"], "study.json"),
    (["sweep.csv"], "sweep.csv"),
]


def _doc(labels):
    return {**BASE, "runs": [{"cell": "rnn_tanh", "label": lab} for lab in labels]}


@pytest.mark.parametrize("labels,word", CLASHES, ids=lambda v: repr(v))
def test_clashing_labels_are_refused_at_parse_time(labels, word, tmp_path):
    with pytest.raises(SpecError) as e:
        parse_spec(_doc(labels), source="x.toml")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("x.toml:")
    assert word in msg
    assert repr(labels[-1]) in msg


@pytest.mark.parametrize("labels", [["a", "b"], ["lstm", "lstm 2"], ["tanh RNN", "LSTM"], ["", "x"]])
def test_distinct_labels_pass(labels):
    spec = parse_spec(_doc(labels), source="x.toml")
    assert len({r.dirname for r in spec.runs}) == len(labels)


def test_check_run_dirs_is_what_sweep_uses():
    import gradflow.sweep as sweep

    assert sweep.check_run_dirs is check_run_dirs


def test_cli_run_refuses_and_writes_nothing(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from gradflow.cli.main import cli

    monkeypatch.chdir(tmp_path)
    Path("s.toml").write_text('claim = "labels map to distinct directories"\n[task]\nname = "adding"\nT = 4\n'
                              '[[runs]]\ncell = "rnn_tanh"\nlabel = "."\n')
    res = CliRunner().invoke(cli, ["run", "s.toml", "--out", "out", "--no-report", "--steps", "1"])
    assert res.exit_code == 1
    assert len(res.output.strip().splitlines()) == 1 and "s.toml" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]
