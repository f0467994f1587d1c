"""AnalysisConfig: one frozen set of analysis options, every value checked with a one-line error."""

import tomllib
from importlib import resources

import pytest

from gradflow.analysis.config import AnalysisConfig, parse_memory
from gradflow.errors import SpecError
from gradflow.spec import parse_spec

WHERE = "analyses/x.toml: [analysis]"

# (mapping, message regex) — every rejected value names the file and the key, in one line
BAD = [
    ({"warmup": -1}, r"analyses/x\.toml: \[analysis\] warmup must be an integer >= 0, got -1"),
    ({"warmup": True}, r"warmup must be an integer >= 0, got True"),  # bool is not a number
    ({"warmup": 1.5}, r"warmup must be an integer"),
    ({"batch_limit": 0}, r"batch_limit must be an integer >= 1, got 0"),
    ({"k": 0}, r"\] k must be an integer >= 1, got 0"),
    ({"k": "32"}, r"\] k must be an integer >= 1, got '32'"),
    ({"max_rank": -3}, r"max_rank must be an integer >= 1"),
    ({"horizon_fraction": 0}, r"horizon_fraction must be a number strictly between 0 and 1, got 0"),
    ({"horizon_fraction": 1.0}, r"horizon_fraction must be a number strictly between 0 and 1"),
    ({"horizon_fraction": True}, r"horizon_fraction must be a number"),
    ({"horizon_reference": -1}, r"horizon_reference must be an integer >= 0"),
    ({"lyapunov": "no"}, r"lyapunov must be true or false, got 'no'"),  # "no" is not a bool
    ({"products": 1}, r"products must be true or false, got 1"),
    ({"per_step_loss": "yes"}, r"per_step_loss must be true or false"),
    ({"keys": []}, r"keys must be \"all\" or a non-empty list of state keys"),
    ({"keys": "h"}, r"keys must be"),
    ({"memory": 0}, r"\[analysis\] memory must be a positive size, got 0"),
    ({"memory": -5}, r"memory must be a positive size"),
    ({"memory": "2 parsecs"}, r"memory must be a size like '2GB'"),
    ({"memory": True}, r"memory must be a size in bytes"),
    ({"memory": [1]}, r"memory must be a size in bytes"),
    ({"spectra_steps": 0}, r"spectra_steps must be an integer >= 1"),
    ({"chunk": 0}, r"chunk must be an integer >= 1"),
    ({"device": "gpu"}, r"device must be \"cpu\", \"cuda\", \"cuda:N\" or \"mps\", got 'gpu'"),
    ({"lyapunv": True}, r"unknown key 'lyapunv'; did you mean 'lyapunov'\?"),
    ({"memroy": "1GB"}, r"unknown key 'memroy'; did you mean 'memory'\?"),
]


@pytest.mark.parametrize("mapping,match", BAD, ids=[str(m) for m, _ in BAD])
def test_bad_values_are_one_line_errors_naming_file_and_key(mapping, match):
    with pytest.raises(SpecError, match=match) as exc:
        AnalysisConfig.from_mapping(mapping, where=WHERE)
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(WHERE)


GOOD = [
    ({}, {}),
    ({"memory": "2GB"}, {"memory": 2 * 10**9}),
    ({"memory": "512MB"}, {"memory": 512 * 10**6}),
    ({"memory": "1.5GiB"}, {"memory": int(1.5 * 2**30)}),
    ({"memory": 123456}, {"memory": 123456}),
    ({"k": 8, "spectra_steps": 5}, {"k": 8, "spectra_steps": 5}),
    ({"keys": ["a/l0/d0/h"]}, {"keys": ("a/l0/d0/h",)}),
    ({"per_step_loss": True, "lyapunov": False}, {"per_step_loss": True, "lyapunov": False}),
    ({"device": "cuda:1", "chunk": 4}, {"device": "cuda:1", "chunk": 4}),
    ({"horizon_fraction": 0.01, "horizon_reference": 0}, {"horizon_fraction": 0.01, "horizon_reference": 0}),
]


@pytest.mark.parametrize("mapping,expect", GOOD, ids=[str(m) for m, _ in GOOD])
def test_good_values(mapping, expect):
    cfg = AnalysisConfig.from_mapping(mapping, where=WHERE)
    for k, v in expect.items():
        assert getattr(cfg, k) == v
    assert AnalysisConfig.from_mapping(cfg.to_dict()) == cfg  # round trip through JSON-able form


def test_defaults_and_frozen():
    cfg = AnalysisConfig()
    assert (cfg.memory, cfg.k, cfg.device, cfg.warmup, cfg.batch_limit, cfg.max_rank) == (2 * 10**9, 32, None, 0, 16, 32)
    with pytest.raises(Exception):
        cfg.k = 3  # frozen
    assert cfg.replace(k=4).k == 4
    with pytest.raises(SpecError, match=r"AnalysisConfig: k must be an integer >= 1"):
        cfg.replace(k=-1)
    assert AnalysisConfig(memory="1GB").memory == 10**9


@pytest.mark.parametrize("text,n", [("1", 1), ("10 kb", 10_000), ("3MiB", 3 * 2**20), ("2e3", 2000), ("1TB", 10**12)])
def test_parse_memory(text, n):
    assert parse_memory(text) == n


def _demo():
    return tomllib.loads(resources.files("gradflow.specs").joinpath("demo.toml").read_text())


def test_spec_parse_validates_analysis_before_anything_runs():
    doc = _demo()
    doc.setdefault("analysis", {})["memory"] = "1 GB"
    spec = parse_spec(doc, source="demo.toml")
    assert isinstance(spec.analysis, AnalysisConfig) and spec.analysis.memory == 10**9
    assert spec.resolved()["analysis"]["memory"] == 10**9
    doc["analysis"]["k"] = True
    with pytest.raises(SpecError, match=r"^demo\.toml: \[analysis\] k must be an integer >= 1, got True$"):
        parse_spec(doc, source="demo.toml")
