"""Expansion of [sweep] axes into runs, and validation, as data."""

from __future__ import annotations

import tomllib

import pytest

from gradflow.errors import SpecError
from gradflow.sweep import expand_sweep, load_sweep

from .conftest import AXES24, BASE, sweep_text


def doc(axes, base=BASE):
    return tomllib.loads(sweep_text(axes, base))


def test_product_order_labels_and_settings():
    s = expand_sweep(doc(AXES24), "t.toml", "t")
    assert len(s.runs) == 24 and s.name == "t"
    assert [r.label for r in s.runs[:3]] == ["rnn_tanh gain=0.5 T=6 seed=0", "rnn_tanh gain=0.5 T=6 seed=1",
                                             "rnn_tanh gain=0.5 T=8 seed=0"]
    assert s.runs[-1].label == "gru gain=1.0 T=8 seed=1"
    assert s.runs[0].dirname == "rnn_tanh_gain_0.5_T_6_seed_0"
    r = s.runs[11]
    assert s.points[11] == {"cell": "lstm", "gain": 0.5, "task.T": 8, "seed": 1}
    assert (r.cell, r.model["gain"], r.model["hidden"], r.task["T"], r.task["name"], r.train["seed"],
            r.train["steps"]) == ("lstm", 0.5, 6, 8, "checksum", 1, 3)
    assert expand_sweep(doc(AXES24), "t.toml", "t") == s  # deterministic


@pytest.mark.parametrize("axes, label, check", [
    ({"cell": ["lstm"], "model.forget_bias": [1.0, 5.0]}, "lstm forget_bias=5.0",
     lambda r: r.model["forget_bias"] == 5.0),
    ({"cell": ["rnn_relu"], "train.clip": [{"mode": "none"}, {"mode": "norm", "threshold": 1.0}]},
     "rnn_relu clip=norm@1.0", lambda r: r.train["clip"] == {"mode": "norm", "threshold": 1.0}),
    ({"cell": ["gru"], "train.clip.threshold": [0.5, 2.0], "train.clip.mode": ["value"]},
     "gru threshold=2.0 mode=value", lambda r: r.train["clip"] == {"mode": "value", "threshold": 2.0}),
    ({"cell": ["gru"], "train.lr": [0.01, 0.1], "train.optimizer": ["sgd"]}, "gru lr=0.1 optimizer=sgd",
     lambda r: r.train["lr"] == 0.1 and r.train["optimizer"] == "sgd"),
    ({"cell": ["gru"], "task.name": ["checksum", "adding"]}, "gru name=adding",
     lambda r: r.task["name"] == "adding"),
])
def test_axis_kinds(axes, label, check):
    s = expand_sweep(doc(axes), "t.toml")
    r = {r.label: r for r in s.runs}[label]
    assert check(r)


def test_unquoted_dotted_keys_are_axes():
    text = BASE + "\n[sweep]\ncell = [\"gru\"]\ntask.T = [5, 7]\n"
    s = expand_sweep(tomllib.loads(text), "t.toml")
    assert [r.task["T"] for r in s.runs] == [5, 7]


@pytest.mark.parametrize("axes, base, match", [
    ({"cell": ["lstm"], "gian": [1.0]}, BASE, r"t.toml: \[sweep\] unknown axis 'gian'; did you mean 'gain'\?"),
    ({"cell": ["lstm"], "task.TT": [1]}, BASE, r"unknown|TT"),
    ({"cell": ["lstm"], "train.step": [1]}, BASE, r"unknown axis 'train.step'; did you mean 'train.steps'\?"),
    ({"cell": ["lstn"]}, BASE, r"unknown cell 'lstn'; did you mean 'lstm'\?"),
    ({"gain": [1.0]}, BASE, r"needs a cell axis"),
    ({"cell": "lstm"}, BASE, r"cell must be a non-empty list"),
    ({"cell": []}, BASE, r"cell must be a non-empty list"),
    ({"cell": ["lstm", "lstm"]}, BASE, r"lists 'lstm' twice"),
    ({"cell": ["lstm"], "seed": [0], "train.seed": [1]}, BASE, r"'seed' and 'train.seed' set the same setting"),
    ({"cell": ["lstm"], "train.clip": [{"mode": "none"}], "train.clip.mode": ["norm"]}, BASE, r"same setting"),
    ({"cell": ["lstm"], "seed": [-1]}, BASE, r"seed must be an integer >= 0"),
    ({"cell": ["rnn_tanh"], "gain": [2.0]}, BASE.replace('init = "gaussian"', ""), r"run 'rnn_tanh gain=2.0'"),
    ({"cell": ["lstm"]}, BASE + "\n[[runs]]\ncell = \"gru\"\n", r"not \[\[runs\]\]"),
    ({"cell": ["lstm"]}, BASE.replace("[analysis]", "[analysys]"), r"unknown key 'analysys'; did you mean 'analysis'"),
    ({"cell": ["lstm"], "train.record_every": [1, 1.0]}, BASE, r"lists 1.0 twice|record_every|duplicate"),
])
def test_errors_are_one_line(axes, base, match):
    with pytest.raises(SpecError, match=match) as ei:
        expand_sweep(doc(axes, base), "t.toml")
    assert "\n" not in str(ei.value)


def test_missing_sweep_table_and_files(tmp_path):
    with pytest.raises(SpecError, match=r"missing \[sweep\] table"):
        expand_sweep(tomllib.loads(BASE), "t.toml")
    with pytest.raises(SpecError, match="spec file not found"):
        load_sweep(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[sweep\n")
    with pytest.raises(SpecError, match="not valid TOML"):
        load_sweep(bad)


def test_example_specs_expand():
    from pathlib import Path

    specs = sorted((Path(__file__).parents[2] / "analyses" / "sweeps").glob("*.toml"))
    assert specs
    for p in specs:
        s = load_sweep(p)
        assert len(s.runs) >= 6 and s.study.claim
