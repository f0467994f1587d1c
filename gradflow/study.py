"""Run a study (a validated spec) into a study directory, and analyse run directories.

Study directory layout::

    <out>/study.json          {"kind": "study", "schema_version", "name", "title", "claim", "spec", "runs"}
    <out>/<run label>/        a run directory (gradflow.training) plus the analysis tables:
                              distance, decay, spectra, spectra_summary, products, lyapunov, gates,
                              summary (.csv, schemas in gradflow.tables)

A run whose directory already holds a finished run of the same resolved spec is not trained again
(re-running a spec after an interruption finishes only what is missing); its tables are rebuilt.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from . import _io
from .errors import GradflowError
from .spec import StudySpec, build_run, check_run_dirs

__all__ = ["run_study", "analyse_run"]


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def run_study(spec: StudySpec, out: str | Path, *, progress: bool = True,
              echo: Callable[[str], None] | None = None) -> Path:
    """Train and analyse every run of ``spec`` into ``out``; returns ``out``."""
    from .training import train

    check_run_dirs([r.label for r in spec.runs], spec.source)  # a StudySpec built by hand is checked too
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GradflowError(f"{out}: exists and is not a directory")
    existing = out / "study.json"
    if existing.exists():
        doc = _io.read_json(existing)
        if doc.get("kind") != "study":
            raise GradflowError(f"{existing}: not a gradflow study file")
    say = echo or (lambda s: None)
    if out.is_dir():  # what an interrupted earlier run was deleting
        for p in out.glob(".*.trash-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
    rel = []
    for r in spec.runs:
        run_dir = out / r.dirname
        rel.append(r.dirname)
        resolved = r.resolved()
        done = _finished(run_dir, resolved)
        if done:
            say(f"{r.label}: finished earlier, reusing {run_dir}")
        else:
            _clear_unfinished(run_dir)
            task, model, cfg = build_run(r, spec.source)
            res = train(task, model, cfg, run_dir=run_dir, name=r.dirname, label=r.label, progress=progress,
                        spec={"run": resolved})
            say(f"{r.label}: {res.status}" + (f" at step {res.diverged_at}" if res.diverged_at is not None else "")
                + (f", eval metric {res.result.get('eval_metric'):.3g}" if res.result.get("eval_metric") is not None
                   else ""))
        analyse_run(run_dir, spec.analysis, spec_run=r, echo=echo)
    _io.write_json(existing, {"kind": "study", "schema_version": _io.SCHEMA_VERSION, "name": spec.name,
                              "title": spec.title, "claim": spec.claim, "spec": spec.resolved(), "runs": rel})
    return out


def _clear_unfinished(run_dir: Path) -> None:
    """Remove an interrupted/failed/outdated run directory before retraining it; refuse to touch a
    non-empty directory that is not a gradflow run."""
    if not run_dir.exists():
        return
    if not any(run_dir.iterdir()):
        return
    f = run_dir / "run.json"
    try:
        doc = _io.read_json(f) if f.exists() else {}
    except GradflowError:
        doc = {}
    if doc.get("kind") != "run":
        raise GradflowError(f"{run_dir}: exists and is not a gradflow run directory; choose another --out")
    # renamed aside first, so an interruption never leaves part of a run (without its run.json) here
    trash = run_dir.parent / f".{run_dir.name}.trash-{os.getpid()}"
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(run_dir, trash)
    shutil.rmtree(trash)


def _finished(run_dir: Path, resolved: Mapping) -> bool:
    f = run_dir / "run.json"
    if not f.exists():
        return False
    try:
        doc = _io.read_json(f)
    except GradflowError:
        return False
    return doc.get("status") in ("finished", "diverged") and _same(doc.get("spec", {}).get("run"), resolved) and (
        doc.get("status") == "diverged" or (run_dir / "trace" / "trace.json").exists())


def analyse_run(run_dir: str | Path, analysis=None, *, spec_run=None, classes: np.ndarray | None = None,
                echo: Callable[[str], None] | None = None) -> dict[str, pd.DataFrame]:
    """Compute the analysis tables of a run directory from its saved ``trace/`` along the plan of each
    unit (:func:`gradflow.analysis.analyze_trace`; ``analysis``: an AnalysisConfig or a mapping) and
    write them as CSV next to it; the config and the plans go into ``run.json`` (``analysis``). A
    diverged run without a final trace gets only a summary row."""
    say = echo or (lambda s: None)
    from .trace import Trace

    run_dir = Path(run_dir)
    doc = _io.read_json(run_dir / "run.json")
    label = doc.get("label", run_dir.name)
    from .analysis.config import AnalysisConfig

    cfg = AnalysisConfig.from_mapping(analysis, where=f"{run_dir}: analysis")
    if cfg.per_step_loss is None:
        cfg = cfg.replace(per_step_loss=(doc.get("task") or {}).get("readout") == "all")
    if not (run_dir / "trace" / "trace.json").exists():
        tables = {"summary": pd.DataFrame([{
            "key": "(run)", "verdict": _status_verdict(doc) or "no trace recorded",
            "detail": "the run stopped before its final recorded pass"}])}
    else:
        trace = Trace.load(run_dir / "trace")
        if classes is None and spec_run is not None:
            classes = _eval_classes(spec_run, trace)
        from .analysis.pipeline import analyze_trace, plan_trace

        plans = plan_trace(trace, cfg)
        for p in plans.values():
            say(f"{label}: plan {p.describe()}")
        tables = analyze_trace(trace, cfg, classes=classes, plans=plans)
        doc["analysis"] = {"config": cfg.to_dict(), "plans": [p.to_json() for p in plans.values()]}
        sv = _status_verdict(doc)
        if sv:
            tables["summary"] = pd.concat([pd.DataFrame([{"key": "(run)", "verdict": sv, "detail": ""}]),
                                           tables["summary"]], ignore_index=True)
        clip_note = _clip_verdict(run_dir, doc)
        if clip_note:
            tables["summary"] = pd.concat([tables["summary"], pd.DataFrame([clip_note])], ignore_index=True)
    for name, df in tables.items():
        df = df.copy()
        df.insert(0, "run", label)
        _io.write_csv(run_dir / f"{name}.csv", df)
        tables[name] = df
    if "analysis" in doc:
        _io.write_json(run_dir / "run.json", doc)
    return tables


def _eval_classes(spec_run, trace) -> np.ndarray | None:
    """Token classes of the final trace's evaluation batch (regenerated from its seed)."""
    meta = trace.meta
    try:
        task, _, cfg = build_run(spec_run)
        batch = task.sample_eval(int(meta.get("eval_batch", cfg.eval_batch)), np.random.default_rng([cfg.seed, 1]))
    except GradflowError:
        return None
    return batch.classes


def _status_verdict(doc) -> str | None:
    if doc.get("status") == "diverged":
        return f"diverged: loss or gradient became NaN/Inf at training step {doc.get('diverged_at')}"
    if doc.get("status") == "failed":
        return f"failed: {doc.get('error', 'unknown error')}"
    return None


def _clip_verdict(run_dir: Path, doc) -> dict | None:
    clip = doc.get("clip") or {}
    if clip.get("mode") in (None, "none") or not (run_dir / "metrics.csv").exists():
        return None
    m = pd.read_csv(run_dir / "metrics.csv")
    if not len(m):
        return None
    frac = float(m["clipped"].mean())
    mx = float(m["grad_norm_before"].max())
    return {"key": "(run)", "verdict": f"clipping by {clip['mode']} fired on {frac:.0%} of steps",
            "detail": f"threshold {clip.get('threshold')}, largest raw gradient norm {_fmt(mx)}"}


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"
