"""Fixtures: synthetic run and study directories (see synth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .synth import make_run, make_study


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("study") / "cells")


@pytest.fixture(scope="session")
def _loaded(study_dir):
    from gradflow.report import load_runs

    return load_runs([study_dir])


@pytest.fixture
def runset(_loaded):
    """The synthetic study loaded once per session, handed to each test with its own table copies."""
    from types import MappingProxyType

    from gradflow.report import RunSet

    return RunSet(_loaded.runs, _loaded.studies, MappingProxyType({k: v.copy() for k, v in _loaded.tables.items()}))


@pytest.fixture
def fresh_study(tmp_path):
    """A study copied per test, free to be damaged."""
    return make_study(tmp_path / "cells")


@pytest.fixture(scope="session")
def built(tmp_path_factory, study_dir):
    """One full report of the synthetic study (HTML + PDF), shared by the tests that read it."""
    from gradflow.report import build_report

    out = tmp_path_factory.mktemp("report") / "out"
    paths = build_report([study_dir], html=out / "index.html", pdf=out / "report.pdf")
    return paths, study_dir


@pytest.fixture
def small_run(tmp_path):
    """One run with only the distance, decay and summary tables (one figure: quick to build)."""
    return make_run(tmp_path / "runs" / "small", "rnn_tanh", tables=("distance", "decay", "summary"))
