"""Spec plumbing shared by ``run``, ``sweep`` and ``demo``: ``--copy`` and ``--steps`` (no torch)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

from ..errors import SpecError


def copy_spec(src: Path, dest_dir: Path = Path(".")) -> Path:
    """Copy the spec file ``src`` into ``dest_dir`` under its own name (atomically) and return the new
    path. Refuses to overwrite an existing file (one-line SpecError naming it)."""
    from .. import _io

    dest = Path(dest_dir) / src.name
    if dest.exists():
        same = dest.resolve() == src.resolve()
        raise SpecError(f"{dest}: {'is the spec itself' if same else 'already exists'}; edit it or remove it first")
    try:
        data = src.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{src}: spec file not found") from None
    _io.write_bytes(dest, data)
    return dest


def with_steps(doc: Mapping[str, Any], steps: int) -> dict:
    """A copy of a spec document in which every run trains ``steps`` steps and records about three of
    them (``record_every = max(1, steps // 3)``, replacing any other recording schedule). Used for a
    quick look at a study (``--steps``); the spec check then runs on the result as usual."""
    doc = copy.deepcopy(dict(doc))
    tables = [doc.setdefault("train", {})]
    runs = doc.get("runs")
    if isinstance(runs, list):
        tables += [r.setdefault("train", {}) for r in runs if isinstance(r, dict)]
    for table in tables:
        if not isinstance(table, dict):
            continue  # not a table: the spec check names it
        for k in ("record_per_decade", "record_steps"):
            table.pop(k, None)
        table["steps"] = steps
        table["record_every"] = max(1, steps // 3)
    return doc
