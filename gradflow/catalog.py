"""What ships with gradflow, by name, without importing torch: tasks, cells and analysis specs.

``gradflow list`` and ``gradflow run NAME`` read this module only, so they start in a fraction of
a second. :data:`TASKS` mirrors the task registry (``gradflow.tasks.TASKS``, which imports torch);
``tests/cli/test_catalog.py`` checks that the names, their order and the descriptions agree, so the
two cannot drift apart. :data:`CELLS` is read from the cell-kind registry's zoo
(:mod:`gradflow.kinds`, whose declarations do not import torch).

The analysis specs live in the top-level ``analyses/`` directory of the source tree (one TOML file
per study, sweep specs in ``analyses/sweeps/``). A wheel or sdist ships that same directory as
package data at ``gradflow/analyses/`` (``package-dir`` in pyproject.toml); :func:`analyses_dir`
finds it in a source checkout, an editable install and a regular install alike.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path

from . import kinds
from .errors import SpecError

__all__ = ["TASKS", "CELLS", "analyses_dir", "shipped_specs", "resolve_spec", "spec_claim"]

# name -> the start of the task class's docstring, up to a word boundary, without ``markup``
# (gradflow.tasks.TASKS, same order)
TASKS: dict[str, str] = {
    "checksum": "Checksum: the first n_key tokens decide the label, read out after the last step.",
    "irrelevant_tokens": "Informative tokens interleaved with a marked class of irrelevant ones (markup in a "
                         "web page).",
    "segments": "A sequence with logical breaks: the label depends only on the current (last) segment.",
    "agreement": "Subject-verb number agreement across a distractor clause (Linzen, Dupoux & Goldberg 2016).",
    "adding": "Adding problem, two channels per step (value, marker); regression read out after the last step.",
    "copy_memory": "Copy memory (Arjovsky, Shah & Bengio 2016; after Hochreiter & Schmidhuber 1997).",
    "temporal_order": "Temporal order (Pascanu, Mikolov & Bengio 2013; Hochreiter & Schmidhuber 1997, exp. 6).",
    "char_lm": "Character-level language modelling: predict the next character after every step.",
    "stocks": "Monthly stock prices 1990-01 – 2022-06 from matplotlib's Stocks.csv",
    "eeg": "Four EEG channels, 800 samples each",
    "membrane": "A membrane-potential recording, 12000 float32 samples (matplotlib's membrane.dat), z-scored",
}

# name -> description of the model zoo's cells (gradflow.kinds.zoo(), same order)
CELLS: dict[str, str] = {name: cell.description for name, cell in kinds.zoo().items()}

KINDS = ("study", "sweep")


def analyses_dir() -> Path:
    """The directory of the shipped analysis specs (``*.toml``; sweep specs in ``sweeps/``).

    In a source checkout (also what an editable install points at) that is ``analyses/`` beside the
    package; in an installed wheel or sdist it is the package data ``gradflow/analyses/``. The
    checkout comes first, so code imported from a checkout reads that checkout's specs.
    """
    pkg = Path(__file__).resolve().parent
    checkout = pkg.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "analyses").is_dir():
        return checkout / "analyses"
    return pkg / "analyses"


def _kind_dir(root: Path, kind: str) -> Path:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return root / "sweeps" if kind == "sweep" else root


def shipped_specs(kind: str = "study", root: str | Path | None = None) -> dict[str, Path]:
    """``name -> path`` of the specs of ``kind`` ("study" or "sweep") in ``root`` (default
    :func:`analyses_dir`), sorted by name; the name is the file's stem."""
    d = _kind_dir(Path(root) if root is not None else analyses_dir(), kind)
    return {p.stem: p for p in sorted(d.glob("*.toml"))} if d.is_dir() else {}


def resolve_spec(ref: str | Path, kind: str = "study") -> Path:
    """The spec file that ``ref`` names: an existing file, else a shipped spec of that name.

    ``ref`` that names no file and looks like a path (it has a directory part or a ``.toml``
    suffix) is returned as it is, so reading it reports "spec file not found". A bare name that is
    not shipped raises a one-line SpecError with the nearest shipped name (and says when the name is
    a spec of the other kind: ``gradflow sweep`` for sweep specs).
    """
    p = Path(ref)
    if p.is_file():
        return p
    if p.is_dir():
        raise SpecError(f"{p}: is a directory; give a spec file (TOML) or the name of a shipped spec")
    text = str(ref)
    if p.suffix == ".toml" or "/" in text or "\\" in text or p.name != text:
        return p
    specs = shipped_specs(kind)
    if text in specs:
        return specs[text]
    other = "sweep" if kind == "study" else "study"
    if text in shipped_specs(other):
        cmd = "gradflow sweep" if other == "sweep" else "gradflow run"
        raise SpecError(f"{text!r} is a shipped {other} spec: use {cmd} {text}")
    near = difflib.get_close_matches(text, list(specs), n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    known = ", ".join(specs) or "none"
    raise SpecError(f"{text}: no such spec file and no shipped {kind} spec of that name{hint} (shipped: {known})")


def spec_claim(path: str | Path) -> str:
    """A spec's ``claim`` on one line ("(unreadable spec)" when the file is not valid TOML)."""
    try:
        claim = tomllib.loads(Path(path).read_text(encoding="utf-8")).get("claim", "")
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return "(unreadable spec)"
    return " ".join(str(claim).split())
