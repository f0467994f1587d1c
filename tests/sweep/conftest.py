"""Tiny sweep specs (T=8, hidden 6, 3 steps) written as TOML text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BASE = """title = "tiny sweep"
claim = "A tiny sweep for tests."

[task]
name = "checksum"
T = 8

[model]
hidden = 6
init = "gaussian"

[train]
steps = 3
batch = 4
eval_batch = 8
record_every = 1

[analysis]
batch_limit = 4
"""


def toml_value(v) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(v)


def sweep_text(axes: dict, base: str = BASE) -> str:
    lines = ["[sweep]"] + [f"{json.dumps(k)} = {toml_value(v)}" for k, v in axes.items()]
    return base + "\n" + "\n".join(lines) + "\n"


@pytest.fixture
def write_sweep(tmp_path):
    def write(axes: dict, name: str = "tiny", base: str = BASE) -> Path:
        p = tmp_path / f"{name}.toml"
        p.write_text(sweep_text(axes, base), encoding="utf-8")
        return p

    return write


# 3 cells x 2 gains x 2 lengths x 2 seeds = 24 runs
AXES24 = {"cell": ["rnn_tanh", "lstm", "gru"], "gain": [0.5, 1.0], "task.T": [6, 8], "seed": [0, 1]}
