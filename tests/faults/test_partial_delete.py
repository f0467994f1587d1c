"""A run directory being deleted for retraining is renamed aside first: an interruption in the middle
of the deletion (run.json already gone, other files left) must not leave a directory that the
re-run refuses as "not a gradflow run directory"."""

from __future__ import annotations

import json
import shutil

import pytest

from gradflow import sweep as sweep_mod
from gradflow.spec import parse_spec
from gradflow.study import run_study

from .harness import BASE


def _interrupting_rmtree(real):
    def rmtree(path, *a, **k):
        (path / "run.json").unlink()  # the deletion got as far as run.json ...
        raise KeyboardInterrupt  # ... when the user pressed Ctrl-C

    return rmtree


def _spec(tmp_path):
    import tomllib

    doc = tomllib.loads(BASE.format(steps=2) + '\n[[runs]]\nlabel = "gru"\ncell = "gru"\n')
    return parse_spec(doc, str(tmp_path / "s.toml"))


@pytest.mark.parametrize("where", ["study", "sweep"])
def test_interrupted_deletion_leaves_a_directory_the_rerun_accepts(tmp_path, monkeypatch, where):
    spec = _spec(tmp_path)
    out = tmp_path / "out"
    run_study(spec, out, progress=False)
    d = out / spec.runs[0].dirname
    doc = json.loads((d / "run.json").read_text())
    doc["status"] = "running"  # as a killed run leaves it: retrained, so deleted first
    (d / "run.json").write_text(json.dumps(doc))
    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", _interrupting_rmtree(shutil.rmtree))
        with pytest.raises(KeyboardInterrupt):
            if where == "study":
                run_study(spec, out, progress=False)
            else:
                sweep_mod._clear(d)
    assert not d.exists() or (d / "run.json").exists()
    run_study(spec, out, progress=False)  # the re-run trains it again
    assert json.loads((d / "run.json").read_text())["status"] == "finished"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the renamed-aside copy is gone
