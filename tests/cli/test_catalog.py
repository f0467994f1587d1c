"""gradflow.catalog: the torch-free name table agrees with the real registries, and spec names
resolve to the shipped analyses (or to files)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gradflow import catalog
from gradflow.errors import SpecError

ROOT = Path(__file__).resolve().parents[2]


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "")


def test_task_names_and_descriptions_match_the_task_registry():
    from gradflow.tasks import TASKS

    assert list(catalog.TASKS) == list(TASKS)
    for name, cls in TASKS.items():
        para, line = _first_paragraph(cls.__doc__ or ""), catalog.TASKS[name]
        # the catalog line is the docstring's start, cut at a word boundary
        assert para.startswith(line) and (len(para) == len(line) or para[len(line)] in " ,;."), (name, line, para)


def test_cell_names_and_descriptions_match_the_model_zoo():
    from gradflow.models import CELLS, list_cells

    assert list(catalog.CELLS) == list_cells()
    assert catalog.CELLS == {name: CELLS[name].description for name in list_cells()}


def test_shipped_specs_are_the_analyses_directory():
    assert catalog.analyses_dir() == ROOT / "analyses"  # a source checkout reads its own specs
    studies, sweeps = catalog.shipped_specs("study"), catalog.shipped_specs("sweep")
    assert studies == {p.stem: p for p in sorted((ROOT / "analyses").glob("*.toml"))}
    assert len(studies) == 11 and "checksum" in studies
    assert set(sweeps) == {"gain_cells", "length"}
    assert all(len(catalog.spec_claim(p).split()) >= 8 for p in [*studies.values(), *sweeps.values()])


def test_resolve_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert catalog.resolve_spec("checksum") == ROOT / "analyses" / "checksum.toml"
    assert catalog.resolve_spec("gain_cells", "sweep") == ROOT / "analyses" / "sweeps" / "gain_cells.toml"
    # an existing file wins over a shipped name; path-like refs are returned for the reader to report
    (tmp_path / "checksum").write_text("x")
    assert catalog.resolve_spec("checksum") == Path("checksum")
    (tmp_path / "checksum").unlink()
    (tmp_path / "checksum").mkdir()
    with pytest.raises(SpecError, match="checksum: is a directory; give a spec file"):
        catalog.resolve_spec("checksum")
    (tmp_path / "checksum").rmdir()
    for ref in ("nope.toml", "dir/nope", "./checksum.toml"):
        assert catalog.resolve_spec(ref) == Path(ref)
    with pytest.raises(SpecError, match=re.escape("chcksum: no such spec file and no shipped study spec of that "
                                                  "name; did you mean 'checksum'?")):
        catalog.resolve_spec("chcksum")
    with pytest.raises(SpecError, match=re.escape("'gain_cells' is a shipped sweep spec: use gradflow sweep gain_cells")):
        catalog.resolve_spec("gain_cells")
    with pytest.raises(SpecError, match=re.escape("'checksum' is a shipped study spec: use gradflow run checksum")):
        catalog.resolve_spec("checksum", "sweep")


def test_spec_claim_of_a_bad_file(tmp_path):
    (tmp_path / "bad.toml").write_text("claim = ")
    assert catalog.spec_claim(tmp_path / "bad.toml") == "(unreadable spec)"
