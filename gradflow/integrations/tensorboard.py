"""Log gradient flow to TensorBoard: per-timestep norms, spectra summaries, clipping statistics.

Needs the ``tensorboard`` extra (``pip install gradflow[tensorboard]``). ``writer`` is a
``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar``, ``add_histogram`` and
``add_image``); :func:`log_run` also accepts a log directory and then opens and closes a writer.

Tags (``P`` = ``prefix``, default ``"gradflow"``; ``KEY`` = ``str(StateKey)`` with ``<root>`` written
``root``):

* ``P/KEY/log10_norm/tNNNN`` — scalar, the median over the batch of log10 ||dL/ds_t|| at position t
  (from a trace, or the ``q50`` column of ``gradnorms.csv``), at the training step;
* ``P/KEY/log10_norm`` — histogram of the finite log10 norms of all (t, b) (traces only);
* ``P/log10_norm_heatmap`` — RGB image, one band of rows per key, one column block per t, colour
  the median log10 norm on a viridis ramp scaled to the finite range; black = exactly zero
  (float underflow), red = NaN/Inf at a valid step, grey = no valid step;
* ``P/nonfinite`` — scalar, the number of NaN/Inf entries (traces) ;
* ``P/train/{loss,metric,grad_norm_before,grad_norm_after,cosine,clipped}``,
  ``P/clipping/{factor,frac_clipped}`` — from ``metrics.csv``, per step (factor = after/before,
  frac_clipped = share of steps clipped so far);
* ``P/spectra/KEY/{sigma_max,sigma_min,spectral_radius,frac_gt1}`` — from
  ``spectra_summary.csv`` when present, **with the timestep t as the global step** (a profile over
  the sequence, not a time series over training);
* ``P/final/...`` — the run's ``trace/`` (final evaluation pass) through :func:`log_trace`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import _io
from ..errors import GradflowError
from ..trace import Trace
from . import require
from .faults import nonfinite_count

require("tensorboard", "tensorboard")

__all__ = ["log_trace", "log_run", "heatmap_image"]

_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
_ZERO, _BAD, _MISSING = (0, 0, 0), (255, 0, 0), (200, 200, 200)


def _tag(key) -> str:
    return str(key).replace("<root>", "root")


def heatmap_image(values: np.ndarray, bad: np.ndarray | None = None, *, cell_height: int = 8,
                  width: int = 256) -> np.ndarray:
    """[K, T] log10 values (NaN = missing, -inf = exact zero) -> uint8 RGB image [K*cell_height, W, 3]
    (HWC), each t a block of ``max(1, width // T)`` columns; ``bad`` [K, T] marks NaN/Inf cells (red)."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2 or v.size == 0:
        raise GradflowError(f"heatmap_image needs a non-empty [keys, T] array, got shape {v.shape}")
    fin = np.isfinite(v)
    img = np.empty(v.shape + (3,), dtype=np.float64)
    img[:] = _MISSING
    if fin.any():
        lo, hi = v[fin].min(), v[fin].max()
        u = np.where(fin, (v - lo) / (hi - lo) if hi > lo else 0.5, 0.0) * (len(_VIRIDIS) - 1)
        i = np.clip(np.floor(u).astype(int), 0, len(_VIRIDIS) - 2)
        f = (u - i)[..., None]
        img[fin] = ((1 - f) * _VIRIDIS[i] + f * _VIRIDIS[i + 1])[fin]
    img[np.isneginf(v)] = _ZERO
    if bad is not None:
        img[np.asarray(bad, dtype=bool)] = _BAD
    cw = max(1, width // v.shape[1])
    img = np.repeat(np.repeat(img, cell_height, axis=0), cw, axis=1)
    return np.round(img).astype(np.uint8)


def _median_log10(trace: Trace, key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([T] median log10 norm over valid finite entries (-inf if they are all 0), [T] any NaN/Inf,
    [T*B] finite positive log10 norms)."""
    n = trace.norm(key).numpy().astype(np.float64)
    m = trace.mask(key).numpy()
    ok = m & np.isfinite(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(ok, np.log10(np.where(ok, n, 1.0)), np.nan)
    med = np.full(n.shape[0], np.nan)
    has = ok.any(axis=1)
    if has.any():
        med[has] = np.nanmedian(logs[has], axis=1)
    bad = (m & ~np.isfinite(n)).any(axis=1)
    pos = logs[np.isfinite(logs)]
    return med, bad, pos


def log_trace(writer, trace: Trace, step: int, *, prefix: str = "gradflow", timesteps: bool = True) -> list[str]:
    """Log one trace at ``step`` (tags in the module docstring); returns the tags written."""
    if not isinstance(trace, Trace):
        raise GradflowError(f"log_trace needs a gradflow Trace, got {type(trace).__name__}")
    tags: list[str] = []
    rows, bads = [], []
    T = max((trace.shape(k)[0] for k in trace.keys()), default=0)
    for key in trace.keys():
        med, bad, pos = _median_log10(trace, key)
        base = f"{prefix}/{_tag(key)}/log10_norm"
        if pos.size:
            writer.add_histogram(base, pos, global_step=step)
            tags.append(base)
        if timesteps:
            for t, v in enumerate(med):
                writer.add_scalar(f"{base}/t{t:04d}", float(v), global_step=step)
                tags.append(f"{base}/t{t:04d}")
        rows.append(np.pad(med, (0, T - med.size), constant_values=np.nan))
        bads.append(np.pad(bad, (0, T - bad.size)))
    if rows and T:
        writer.add_image(f"{prefix}/log10_norm_heatmap", heatmap_image(np.stack(rows), np.stack(bads)),
                         global_step=step, dataformats="HWC")
        tags.append(f"{prefix}/log10_norm_heatmap")
    writer.add_scalar(f"{prefix}/nonfinite", nonfinite_count(trace), global_step=step)
    tags.append(f"{prefix}/nonfinite")
    return tags


def _scalar(writer, tags, tag, v, step) -> None:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return
    writer.add_scalar(tag, float(v), global_step=int(step))
    tags.append(tag)


def _log_metrics(writer, m, prefix, tags) -> None:
    frac = m["clipped"].astype(bool).cumsum() / np.arange(1, len(m) + 1) if "clipped" in m else None
    for i, row in enumerate(m.itertuples(index=False)):
        r = row._asdict()
        s = r["step"]
        for c in ("loss", "metric", "grad_norm_before", "grad_norm_after", "cosine"):
            if c in r:
                _scalar(writer, tags, f"{prefix}/train/{c}", float(r[c]), s)
        if "clipped" in r:
            _scalar(writer, tags, f"{prefix}/train/clipped", float(bool(r["clipped"])), s)
            _scalar(writer, tags, f"{prefix}/clipping/frac_clipped", float(frac.iloc[i]), s)
        b, a = float(r.get("grad_norm_before", math.nan)), float(r.get("grad_norm_after", math.nan))
        if b > 0 and math.isfinite(b) and math.isfinite(a):
            _scalar(writer, tags, f"{prefix}/clipping/factor", a / b, s)


def _log_gradnorms(writer, g, prefix, tags) -> None:
    keys = list(dict.fromkeys(g["key"]))
    for step, d in g.groupby("step", sort=True):
        T = int(d["t"].max()) + 1
        vals = np.full((len(keys), T), np.nan)
        bad = np.zeros((len(keys), T), dtype=bool)
        for r in d.itertuples(index=False):
            k = keys.index(r.key)
            q = float(r.q50) if r.n > 0 else math.nan
            vals[k, r.t] = q
            bad[k, r.t] = float(r.frac_nonfinite) > 0
            tag = f"{prefix}/{_tag(r.key)}/log10_norm/t{int(r.t):04d}"
            writer.add_scalar(tag, q, global_step=int(step))
            tags.append(tag)
        writer.add_image(f"{prefix}/log10_norm_heatmap", heatmap_image(vals, bad), global_step=int(step),
                         dataformats="HWC")
        tags.append(f"{prefix}/log10_norm_heatmap")


def _log_spectra(writer, s, prefix, tags) -> None:
    for r in s.itertuples(index=False):
        for c in ("sigma_max", "sigma_min", "spectral_radius", "frac_gt1"):
            if hasattr(r, c):
                _scalar(writer, tags, f"{prefix}/spectra/{_tag(r.key)}/{c}", float(getattr(r, c)), int(r.t))


def log_run(writer, run_dir: str | Path, *, prefix: str = "gradflow", final_trace: bool = True) -> list[str]:
    """Log a run directory (``metrics.csv``, ``gradnorms.csv``, ``spectra_summary.csv``, ``trace/``;
    each when present) to ``writer`` (a SummaryWriter or a log directory). Returns the distinct tags
    written, sorted."""
    run_dir = Path(run_dir)
    meta = _io.read_json(run_dir / "run.json")
    _io.check_schema(run_dir / "run.json", meta, "run")
    own = None
    if isinstance(writer, (str, Path)):
        from torch.utils.tensorboard import SummaryWriter

        own = writer = SummaryWriter(log_dir=str(writer))
    tags: list[str] = []
    try:
        tables = {n: _io.read_csv(run_dir / f"{n}.csv") for n in ("metrics", "gradnorms", "spectra_summary")
                  if (run_dir / f"{n}.csv").exists()}
        if "metrics" in tables and len(tables["metrics"]):
            _log_metrics(writer, tables["metrics"], prefix, tags)
        if "gradnorms" in tables and len(tables["gradnorms"]):
            _log_gradnorms(writer, tables["gradnorms"], prefix, tags)
        if "spectra_summary" in tables and len(tables["spectra_summary"]):
            _log_spectra(writer, tables["spectra_summary"], prefix, tags)
        if final_trace and (run_dir / "trace" / "trace.json").exists():
            tr = Trace.load(run_dir / "trace")
            step = tr.meta.get("step", 0)
            tags += log_trace(writer, tr, int(step) if isinstance(step, int) else 0, prefix=f"{prefix}/final")
        writer.flush()
    finally:
        if own is not None:
            own.close()
    return sorted(set(tags))
