"""Fixtures: synthetic run and study directories (see synth.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .synth import make_study


@pytest.fixture(scope="session")
def study_dir(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("study") / "cells")


@pytest.fixture
def runset(study_dir):
    from gradflow.report import load_runs

    return load_runs([study_dir])


@pytest.fixture
def fresh_study(tmp_path):
    """A study copied per test, free to be damaged."""
    return make_study(tmp_path / "cells")
