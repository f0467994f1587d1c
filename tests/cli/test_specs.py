"""Every shipped analysis spec (and the embedded demo) validates, and states its claim."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import pytest

from gradflow.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "analyses").glob("*.toml"))


def test_there_are_specs():
    assert len(SPECS) >= 8


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_spec_validates_and_states_a_claim(path):
    spec = load_spec(path)
    assert len(spec.claim.split()) >= 8
    assert path.read_text().lstrip().startswith("# Claim"), "the header states the claim"
    assert path.stem in (ROOT / "README.md").read_text(), "the README lists every analysis"


def test_demo_spec_validates():
    text = resources.files("gradflow.specs").joinpath("demo.toml").read_text()
    spec = parse_spec(tomllib.loads(text), source="demo.toml")
    assert [r.cell for r in spec.runs] == ["rnn_tanh", "lstm", "gru", "rnn_relu", "rnn_relu"]


@pytest.mark.parametrize("value,ok", [(0, True), (3, True), (-1, False), (1.5, False), (True, False), ("1", False)])
def test_horizon_reference_is_checked(value, ok):
    from gradflow.errors import SpecError

    doc = tomllib.loads(resources.files("gradflow.specs").joinpath("demo.toml").read_text())
    doc.setdefault("analysis", {})["horizon_reference"] = value
    if ok:
        assert parse_spec(doc, source="demo.toml").analysis.horizon_reference == value
    else:
        with pytest.raises(SpecError, match=r"demo\.toml.*horizon_reference"):
            parse_spec(doc, source="demo.toml")
