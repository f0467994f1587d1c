"""Every spec value is validated by type and range in ``parse_spec``, before anything trains or is
written (issue 12 item 5): each bad value is one SpecError line naming the file and the key."""

from __future__ import annotations

import copy
import time

import pytest

from gradflow.errors import SpecError
from gradflow.spec import parse_spec

BASE = {"claim": "every value is checked before anything runs", "task": {"name": "adding", "T": 4},
        "train": {"steps": 2, "batch": 2, "eval_batch": 2, "record_every": 1},
        "runs": [{"cell": "lstm"}]}

BIG = 2**63 - 1
# (table, key, value, text the message names besides the file): a table "runs.0" is the first run
BAD = [
    ("train", "lr", True, "lr"),
    ("train", "lr", float("nan"), "lr"),
    ("train", "lr", "0.1", "lr"),
    ("train", "steps", True, "steps"),
    ("train", "steps", BIG, "steps"),
    ("train", "steps", 0, "steps"),
    ("train", "batch", 1.5, "batch"),
    ("train", "batch", 10**9, "batch"),
    ("train", "eval_batch", -1, "eval_batch"),
    ("train", "flush_every", 0, "flush_every"),
    ("train", "seed", -1, "seed"),
    ("train", "seed", 2.0, "seed"),
    ("train", "momentum", float("inf"), "momentum"),
    ("train", "momentum", 0.9, "momentum"),            # adam (the default) takes no momentum
    ("train", "momentum", -0.5, "momentum"),
    ("train", "optimizer", "lbfgs", "optimizer"),
    ("train", "optimizer", 3, "optimizer"),
    ("train", "device", "bogus", "device"),
    ("train", "device", 0, "device"),
    ("train", "device", "cuda:", "device"),
    ("train", "device", "cpu:0", "device"),
    ("train", "record_every", -1, "record_every"),
    ("train", "record_every", True, "record_every"),
    ("train", "record_per_decade", -2, "record_per_decade"),
    ("train", "record_steps", [-1], "record_steps"),
    ("train", "record_steps", ["a"], "record_steps"),
    ("train", "record_steps", 3, "record_steps"),
    ("train", "record_steps", [5], "record_steps"),    # past the last of 2 steps: never recorded
    ("train", "clip", {"mode": "norm", "threshold": True}, "threshold"),
    ("train", "clip", {"mode": "norm", "threshold": float("nan")}, "threshold"),
    ("train", "clip", {"mode": "norm"}, "threshold"),
    ("train", "clip", {"mode": "value", "threshold": -1}, "threshold"),
    ("train", "clip", {"mode": 1}, "mode"),
    ("train", "clip", {"mode": "sometimes", "threshold": 1.0}, "mode"),
    ("train", "clip", "norm", "clip"),
    ("model", "hidden", 1e6, "hidden"),
    ("model", "hidden", 10**6, "hidden"),
    ("model", "hidden", True, "hidden"),
    ("model", "hidden", 0, "hidden"),
    ("model", "hidden", BIG, "hidden"),
    ("model", "layers", 100000, "layers"),
    ("model", "layers", "2", "layers"),
    ("model", "dropout", 1.0, "dropout"),
    ("model", "dropout", float("nan"), "dropout"),
    ("model", "dropout", True, "dropout"),
    ("model", "gain", True, "gain"),
    ("model", "gain", float("nan"), "gain"),
    ("model", "init", 5, "init"),
    ("model", "init", "xavier", "init"),
    ("model", "forget_bias", float("nan"), "forget_bias"),
    ("model", "forget_bias", True, "forget_bias"),
    ("model", "forget_bias", float("-inf"), "forget_bias"),
    ("model", "r_min", 0.5, "r_min"),                  # an LRU option given to an LSTM
    ("runs.0", "hidden", -3, "hidden"),
    ("runs.0", "label", 5, "label"),
    ("runs.0", "cell", 5, "cell"),
    ("runs.0", "model", 5, "model"),
    ("runs.0", "train", [], "train"),
    ("runs.0", "task", "adding", "task"),
    ("task", "T", True, "T"),
    ("task", "T", BIG, "T"),
    ("task", "T", 4.0, "T"),
    ("task", "variant", 3, "variant"),
    ("task", "zero_first", "no", "zero_first"),
    ("task", "name", 5, "name"),
    ("analysis", "warmup", -1, "warmup"),
    ("analysis", "max_rank", 0, "max_rank"),
    ("analysis", "batch_limit", 0, "batch_limit"),
    ("analysis", "batch_limit", -4, "batch_limit"),
    ("analysis", "lyapunov", "no", "lyapunov"),
    ("analysis", "horizon_fraction", True, "horizon_fraction"),
    ("analysis", "keys", ["nope"], "keys"),
    ("analysis", "keys", ["rnn/l1/d0/h"], "keys"),     # a 1-layer model has no layer 1
    ("analysis", "warmup", 3, "warmup"),               # T = 4: 3 Jacobians, none left after the warm-up
    ("", "model", 5, "model"),
    ("", "train", "fast", "train"),
    ("", "name", 5, "name"),
    ("", "title", 5, "title"),
    ("", "claim", 5, "claim"),
    ("", "runs", {"cell": "lstm"}, "runs"),
    ("", "runs", ["lstm"], "runs"),
]


@pytest.fixture(scope="module", autouse=True)
def _imports_done():
    """The time bound below is about building nothing large, not about importing torch once."""
    parse_spec(copy.deepcopy(BASE), source="warm.toml")


def _doc(table, key, value):
    doc = copy.deepcopy(BASE)
    if not table:
        doc[key] = value
    elif table == "runs.0":
        doc["runs"][0][key] = value
    else:
        doc.setdefault(table, {})[key] = value
    return doc


@pytest.mark.parametrize("table,key,value,word", BAD, ids=[f"{t}.{k}={v!r}" for t, k, v, _ in BAD])
def test_bad_value_is_one_line_naming_file_and_key(table, key, value, word):
    t0 = time.perf_counter()
    with pytest.raises(SpecError) as e:
        parse_spec(_doc(table, key, value), source="bad.toml")
    msg = str(e.value)
    assert msg.startswith("bad.toml:") and "\n" not in msg
    assert word in msg
    assert time.perf_counter() - t0 < 2.0, "parsing builds nothing large"


GOOD = [
    ("train", "momentum", 0.0),
    ("train", "lr", 1),
    ("train", "record_steps", [0, 1]),
    ("train", "clip", {"mode": "none"}),
    ("train", "clip", {"mode": "norm", "threshold": 1}),
    ("train", "device", "cpu"),
    ("train", "device", "cuda:99"),  # by its form only: a sweep's runs may execute on other machines
    ("model", "forget_bias", 1.0),
    ("model", "layers", 2),
    ("model", "dropout", 0.25),
    ("model", "init", "orthogonal"),
    ("task", "zero_first", False),
    ("analysis", "keys", ["rnn/l0/d0/c"]),
    ("analysis", "keys", "all"),
    ("analysis", "warmup", 2),
]


@pytest.mark.parametrize("table,key,value", GOOD, ids=[f"{t}.{k}={v!r}" for t, k, v in GOOD])
def test_good_value_parses(table, key, value):
    parse_spec(_doc(table, key, value), source="ok.toml")


def test_adam_with_momentum_names_the_optimizer():
    doc = _doc("train", "momentum", 0.5)
    with pytest.raises(SpecError, match="adam"):
        parse_spec(doc, source="bad.toml")
    doc["train"]["optimizer"] = "sgd"
    parse_spec(doc, source="ok.toml")


def test_keys_are_checked_per_run():
    """A key one run has and another lacks: the run that lacks every listed key is named."""
    doc = copy.deepcopy(BASE)
    doc["runs"] = [{"cell": "lstm"}, {"cell": "gru"}]
    doc["analysis"] = {"keys": ["rnn/l0/d0/c"]}
    with pytest.raises(SpecError, match="gru"):
        parse_spec(doc, source="bad.toml")
    doc["analysis"] = {"keys": ["rnn/l0/d0/h"]}
    parse_spec(doc, source="ok.toml")


@pytest.mark.parametrize("axes,text", [
    ({"cell": ["lstm"], "hidden": [True]}, "[sweep] run 'lstm hidden=true' [model] hidden must be"),
    ({"cell": ["lstm"], "train.lr": [float("nan")]}, "[sweep] run 'lstm lr=nan' [train] lr must be"),
    ({"cell": ["lstm"], "task.T": [4, 2**40]}, "T must be an integer"),
])
def test_sweep_values_name_the_run_by_its_label(axes, text):
    """A sweep file has no [[runs]] tables: its errors name the expanded run by label under [sweep]."""
    from gradflow.sweep import expand_sweep

    doc = {k: v for k, v in copy.deepcopy(BASE).items() if k != "runs"}
    with pytest.raises(SpecError) as e:
        expand_sweep({**doc, "sweep": axes}, "s.toml")
    msg = str(e.value)
    assert msg.startswith("s.toml: ") and text in msg and "runs." not in msg, msg
