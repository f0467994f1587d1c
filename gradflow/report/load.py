"""Read run and study directories into one :class:`RunSet` (metadata + concatenated tables).

A *run directory* holds ``run.json`` (``kind="run"``) and any of the CSV tables named in
:data:`gradflow.tables.TABLES`; a *study directory* holds ``study.json`` (``kind="study"``) whose
``runs`` list gives run directories relative to it. :func:`load_runs` accepts any mix of both, keeps
the order given (a study's runs in the study's order), drops a run reached twice, and concatenates
each table across runs. Every problem is one :class:`~gradflow.errors.GradflowError` naming the path.

Run labels are the ``run`` column of every table. When two loaded runs share a label (the same run
name in two studies), both are relabelled ``"<parent dir>/<label>"`` in their metadata and tables so
a combined report keeps them apart.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

from .. import _io
from ..errors import GradflowError
from ..tables import TABLES, check_columns

__all__ = ["RunInfo", "StudyInfo", "RunSet", "load_runs", "STATUSES"]

STATUSES = ("running", "finished", "diverged", "failed")

# columns read as text whatever they look like (a token class "0" stays "0")
_TEXT_COLUMNS = {"run", "key", "module", "state", "gate", "token_class", "when", "verdict", "detail"}
_REQUIRED_TEXT = {"run", "key", "gate", "token_class", "when", "state"}
# columns holding flags: accept bool, 0/1 and true/false spellings
_BOOL_COLUMNS = {"clipped", "horizon_censored", "underflow"}
# value ranges (NaN is allowed: a missing value; the figures say so): column -> (low, high, what)
_RANGES = {
    **{c: (0.0, math.inf, "a singular value or spectral radius") for c in ("sigma", "sigma_max", "sigma_min",
                                                                             "spectral_radius")},
    **{c: (0.0, math.inf, "a norm") for c in ("grad_norm_before", "grad_norm_after")},
    **{c: (0.0, 1.0, "a fraction") for c in ("frac_zero", "frac_nonfinite", "frac_gt1", "fraction")},
    "stderr": (0.0, math.inf, "a standard error"),
    "horizon": (0.0, math.inf, "a number of steps"),
    "cosine": (-1.0 - 1e-6, 1.0 + 1e-6, "a cosine"),
}
# numeric result columns of sweep.csv (the axes are the user's: any values)
_SWEEP_NUMERIC = ("eval_metric", "chance", "decay_rate", "ci_low", "ci_high", "horizon", "diverged_at")
# text columns with a fixed set of values
_CHOICES = {"when": ("before", "after")}
# columns that index something: finite whole numbers >= 0 (direction: 0 or 1)
_INDEX_COLUMNS = {"t", "b", "rank", "step", "distance", "n", "layer", "direction"}


@dataclass(frozen=True)
class StudyInfo:
    """One study directory: its name, the claim it tests and the labels of its runs."""

    path: Path
    name: str
    claim: str
    runs: tuple[str, ...]


@dataclass(frozen=True)
class RunInfo:
    """Metadata of one run directory (``run.json``) and which tables it holds."""

    path: Path
    name: str
    label: str
    status: str
    diverged_at: int | None
    task: Mapping[str, Any]
    model: Mapping[str, Any]
    clip: Mapping[str, Any]
    meta: Mapping[str, Any]
    spec: Mapping[str, Any]
    study: str | None
    tables: tuple[str, ...]
    result: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    plans: tuple[Mapping[str, Any], ...] = ()  # run.json analysis.plans: how each unit was analysed

    @property
    def flagged(self) -> bool:
        """True when the run did not finish normally (diverged, failed or still running)."""
        return self.status != "finished"

    @property
    def versions(self) -> dict[str, str]:
        """Library versions from ``meta.versions`` (or flat ``meta`` keys as the training loop writes)."""
        v = self.meta.get("versions")
        if isinstance(v, Mapping):
            return {str(k): str(x) for k, x in v.items()}
        return {k: str(self.meta[k]) for k in ("gradflow", "torch", "numpy", "python") if k in self.meta}

    @property
    def clip_text(self) -> str:
        mode = self.clip.get("mode")
        if not mode or mode == "none":
            return "no clipping"
        thr = self.clip.get("threshold")
        return f"clip {mode}" + (f" ≤ {thr:g}" if isinstance(thr, (int, float)) else "")


@dataclass(frozen=True)
class RunSet:
    """Runs, studies and each table concatenated across runs (read-only mapping name -> frame).

    Tables that no run holds are absent from ``tables``; :meth:`table` returns an empty frame with
    the schema's columns for them.
    """

    runs: tuple[RunInfo, ...]
    studies: tuple[StudyInfo, ...] = ()
    tables: Mapping[str, pd.DataFrame] = field(default_factory=lambda: MappingProxyType({}))
    # sweep.csv of the loaded study directories (one row per run x state key), None without one
    sweep: pd.DataFrame | None = None
    sweep_axes: tuple[str, ...] = ()

    def has(self, name: str) -> bool:
        return name in self.tables and len(self.tables[name]) > 0

    def table(self, name: str) -> pd.DataFrame:
        if name not in TABLES:
            raise GradflowError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
        if name in self.tables:
            return self.tables[name]
        return pd.DataFrame({c: [] for c in TABLES[name]})

    def run(self, label: str) -> RunInfo:
        for r in self.runs:
            if r.label == label:
                return r
        raise GradflowError(f"no run labelled {label!r}; loaded: {', '.join(r.label for r in self.runs)}")

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(r.label for r in self.runs)

    def verdicts(self):
        """The verdicts (summary.csv rows) as a :class:`~gradflow.report.VerdictTable`."""
        from .notebook import verdicts

        return verdicts(self)

    def figure(self, name: str):
        """The report's figure ``name`` for these runs (see :func:`gradflow.report.figure`)."""
        from .build import figure

        return figure(name, self)

    def _repr_html_(self) -> str:
        from .notebook import runset_html

        return runset_html(self)


def load_runs(paths: Iterable[str | os.PathLike]) -> RunSet:
    """Load run and/or study directories (``run.json`` / ``study.json``) into a :class:`RunSet`.

    Raises GradflowError (one line, naming the path) for a missing directory, a directory with
    neither file, a wrong ``kind``, an unsupported ``schema_version``, or a malformed table.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise GradflowError("no run or study directory given")
    studies: list[StudyInfo] = []
    sweeps: list[pd.DataFrame] = []
    sweep_axes: list[str] = []
    found: list[tuple[Path, str | None]] = []  # (run dir, study name)
    for p in paths:
        if not p.exists():
            raise GradflowError(f"{p}: no such directory")
        if not p.is_dir():
            raise GradflowError(f"{p}: not a directory (give a run or study directory)")
        if (p / "study.json").exists():
            st, run_dirs = _read_study(p)
            studies.append(st)
            found.extend((d, st.name) for d in run_dirs)
            if (p / "sweep.csv").exists():
                df, axes = read_sweep(p)
                sweeps.append(df)
                sweep_axes.extend(a for a in axes if a not in sweep_axes)
        elif (p / "run.json").exists():
            found.append((p, None))
        else:
            raise GradflowError(f"{p}: neither run.json nor study.json found (not a gradflow run or study)")

    seen: set[Path] = set()
    runs: list[tuple[dict, Path, str | None]] = []
    for d, study in found:
        key = d.resolve()
        if key in seen:
            continue
        seen.add(key)
        runs.append((_read_run_json(d), d, study))

    labels = [_label(meta) for meta, _, _ in runs]
    relabel = _unique_labels(labels, [d for _, d, _ in runs])

    infos: list[RunInfo] = []
    per_table: dict[str, list[pd.DataFrame]] = {}
    for (meta, d, study), old, new in zip(runs, labels, relabel):
        present = []
        for name in TABLES:
            f = d / f"{name}.csv"
            if not f.exists():
                continue
            df = read_table(f, name)
            bad = sorted(set(df["run"].dropna().unique()) - {old})
            if bad:
                raise GradflowError(
                    f"{f}: column 'run' holds {_show(bad[0])} but {d / 'run.json'} labels the run {old!r}"
                )
            if new != old:
                df["run"] = new
            present.append(name)
            if len(df):
                per_table.setdefault(name, []).append(df)
        infos.append(_run_info(meta, d, new, study, tuple(present)))

    studies = [
        StudyInfo(s.path, s.name, s.claim, tuple(relabel[i] for i, (_, _, st) in enumerate(runs) if st == s.name))
        for s in studies
    ]
    tables = {n: pd.concat(fs, ignore_index=True) for n, fs in per_table.items()}
    sweep = pd.concat(sweeps, ignore_index=True) if sweeps else None
    return RunSet(tuple(infos), tuple(studies), MappingProxyType(tables), sweep, tuple(sweep_axes))


def read_sweep(study: Path) -> tuple[pd.DataFrame, list[str]]:
    """``<study>/sweep.csv`` (as ``gradflow sweep`` writes it) and the sweep's axis names (from
    study.json ``sweep.axes`` when present, else the columns between ``dir`` and ``status``)."""
    f = Path(study) / "sweep.csv"
    try:
        df = pd.read_csv(f, dtype={c: str for c in ("run", "dir", "key", "cell", "status", "error")})
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise GradflowError(f"{f}: malformed CSV ({msg})") from None
    missing = [c for c in ("run", "key", "eval_metric", "horizon") if c not in df.columns]
    if missing:
        raise GradflowError(f"{f}: missing column(s) {', '.join(missing)}")
    for col in _SWEEP_NUMERIC:  # empty (a failed run) is NaN; text is damage
        if col in df.columns:
            num = pd.to_numeric(df[col], errors="coerce")
            bad = num.isna() & df[col].notna()
            if bad.any():
                i = int(bad.to_numpy().nonzero()[0][0])
                raise GradflowError(f"{f}: column {col!r} must be numeric, row {i + 2} holds {_show(df[col].iloc[i])}")
            df[col] = num.astype(float)
            _check_range(df[col], f, col)
    meta = _io.read_json(Path(study) / "study.json")
    axes = (meta.get("sweep") or {}).get("axes") if isinstance(meta, dict) else None
    if not (isinstance(axes, list) and all(isinstance(a, str) for a in axes)):
        cols = list(df.columns)
        stop = cols.index("status") if "status" in cols else len(cols)
        axes = cols[cols.index("dir") + 1 if "dir" in cols else 0:stop]
    df["study"] = str(Path(study).name)
    return df, [a for a in axes if a in df.columns]


def read_table(path: Path, name: str) -> pd.DataFrame:
    """Read one CSV table, check its columns and types; errors name the file and column."""
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={c: str for c in _TEXT_COLUMNS}, keep_default_na=True)
    except FileNotFoundError:
        raise GradflowError(f"{path}: file not found") from None
    except pd.errors.EmptyDataError:
        raise GradflowError(f"{path}: empty file (expected a CSV header with the {name!r} columns)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise GradflowError(f"{path}: malformed CSV ({msg})") from None
    try:
        check_columns(name, df.columns)
    except GradflowError as exc:
        raise GradflowError(f"{path}: {exc}") from None
    for col in TABLES[name]:
        if col in _TEXT_COLUMNS:
            if col in _REQUIRED_TEXT and df[col].isna().any():
                i = int(df[col].isna().to_numpy().nonzero()[0][0])
                raise GradflowError(f"{path}: column {col!r} is empty in row {i + 2}")
            df[col] = df[col].fillna("").astype(str)
            if col in _CHOICES:
                bad = ~df[col].isin(_CHOICES[col])
                if bad.any():
                    i = int(bad.to_numpy().nonzero()[0][0])
                    raise GradflowError(f"{path}: column {col!r} must be one of {', '.join(_CHOICES[col])}; "
                                        f"row {i + 2} holds {_show(df[col].iloc[i])}")
            continue
        if col in _BOOL_COLUMNS:
            df[col] = _to_bool(df[col], path, col)
            continue
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() & df[col].notna()
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise GradflowError(
                f"{path}: column {col!r} must be numeric, row {i + 2} holds {_show(df[col].iloc[i])}"
            )
        df[col] = num.astype(float) if num.dtype.kind not in "iu" else num
        _check_range(df[col], path, col)
    return df


def _show(v: Any, limit: int = 40) -> str:
    """A value quoted for an error message, cut to ``limit`` characters (a damaged file can hold
    megabytes in one cell)."""
    text = repr(v.item() if hasattr(v, "item") else v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _check_range(v: pd.Series, path: Path, col: str) -> None:
    """Values a table of this kind cannot hold (a negative singular value, a fraction above 1, a
    timestep -1 or 2.5) are damage: one error naming the file, column and row."""
    x = v.to_numpy(dtype=float)
    if col in _INDEX_COLUMNS:
        hi = 1 if col == "direction" else math.inf
        with np.errstate(invalid="ignore"):
            bad = ~(np.isfinite(x) & (x >= 0) & (x <= hi) & (np.floor(x) == x))
        what = "0 or 1" if col == "direction" else "a whole number >= 0"
    elif col in _RANGES:
        lo, hi, noun = _RANGES[col]
        with np.errstate(invalid="ignore"):
            bad = (x < lo) | (x > hi)
        what = f"{noun}, between {lo:g} and {hi:g}" if math.isfinite(hi) else f"{noun}, >= {lo:g}"
    else:
        return
    if bad.any():
        i = int(bad.nonzero()[0][0])
        raise GradflowError(f"{path}: column {col!r} must be {what}; row {i + 2} holds {float(x[i])!r}")


def _to_bool(s: pd.Series, path: Path, col: str) -> pd.Series:
    if s.dtype == bool:
        return s
    m = {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}
    out = s.astype(str).str.strip().str.lower().map(m)
    bad = out.isna()
    if bad.any():
        i = int(bad.to_numpy().nonzero()[0][0])
        raise GradflowError(f"{path}: column {col!r} must be true/false, row {i + 2} holds {_show(s.iloc[i])}")
    return out.astype(bool)


def _read_study(p: Path) -> tuple[StudyInfo, list[Path]]:
    f = p / "study.json"
    meta = _io.read_json(f)
    if not isinstance(meta, dict):
        raise GradflowError(f"{f}: expected a JSON object")
    _io.check_schema(f, meta, "study")
    runs = meta.get("runs")
    if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
        raise GradflowError(f"{f}: 'runs' must be a list of run directories relative to the study")
    dirs = []
    for r in runs:
        d = p / r
        if not (d / "run.json").exists():
            raise GradflowError(f"{f}: listed run {r!r} has no run.json at {d}")
        dirs.append(d)
    name = str(meta.get("name") or p.name)
    return StudyInfo(p, name, str(meta.get("claim") or ""), ()), dirs


def _read_run_json(d: Path) -> dict:
    f = d / "run.json"
    meta = _io.read_json(f)
    if not isinstance(meta, dict):
        raise GradflowError(f"{f}: expected a JSON object")
    _io.check_schema(f, meta, "run")
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        raise GradflowError(f"{f}: 'name' must be a non-empty string")
    status = meta.get("status")
    if status not in STATUSES:
        raise GradflowError(f"{f}: 'status' is {_show(status)}; expected one of {', '.join(STATUSES)}")
    da = meta.get("diverged_at")
    if da is not None and (isinstance(da, bool) or not isinstance(da, int)):
        raise GradflowError(f"{f}: 'diverged_at' must be an integer step or null, not {_show(da)}")
    for k in ("spec", "task", "model", "clip", "meta", "result", "analysis"):
        if meta.get(k) is not None and not isinstance(meta[k], dict):
            raise GradflowError(f"{f}: {k!r} must be a JSON object")
    plans = (meta.get("analysis") or {}).get("plans", [])
    if not isinstance(plans, list) or not all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                              and isinstance(p.get("unit"), str) for p in plans):
        raise GradflowError(f"{f}: 'analysis.plans' must be a list of objects with 'unit' and 'text' strings")
    return meta


def _label(meta: dict) -> str:
    lab = meta.get("label")
    return str(lab) if isinstance(lab, str) and lab else meta["name"]


def _unique_labels(labels: list[str], dirs: list[Path]) -> list[str]:
    out = list(labels)
    dup = {lab for lab in labels if labels.count(lab) > 1}
    for i, lab in enumerate(labels):
        if lab in dup:
            out[i] = f"{dirs[i].resolve().parent.name}/{lab}"
    clash = {lab for lab in out if out.count(lab) > 1}
    return [f"{lab} [{i + 1}]" if lab in clash else lab for i, lab in enumerate(out)]


def _run_info(meta: dict, d: Path, label: str, study: str | None, tables: tuple[str, ...]) -> RunInfo:
    def obj(k):
        return MappingProxyType(dict(meta.get(k) or {}))

    da = meta.get("diverged_at")
    return RunInfo(
        path=d,
        name=meta["name"],
        label=label,
        status=meta["status"],
        diverged_at=None if da is None else int(da),
        task=obj("task"),
        model=obj("model"),
        clip=obj("clip"),
        meta=obj("meta"),
        spec=obj("spec"),
        study=study,
        tables=tables,
        result=obj("result"),
        plans=tuple(MappingProxyType(dict(p)) for p in (meta.get("analysis") or {}).get("plans", [])),
    )


def fmt_number(x: Any) -> str:
    """Short human formatting for metadata cells."""
    if isinstance(x, bool) or x is None:
        return "—" if x is None else str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return "—" if math.isnan(x) else f"{x:.4g}"
    return str(x)
