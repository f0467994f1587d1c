"""The one orchestrator of the analysis: every table of a trace, planned and streamed.

:func:`analyze_trace` is what the CLI (``run``, ``inspect``, ``sweep``), studies and the Lightning
callback call. For each unit it first makes a :class:`~gradflow.analysis.plan.Plan`
(:func:`plan_trace`), then computes:

* ``distance`` / ``decay``: from the recorded gradient norms of the whole batch (O(T·B));
* ``spectra`` (the distribution of singular values at the plan's steps) and ``spectra_summary`` (per
  step, mean over the sequences the plan gives it): on the dense route every step's singular values
  give σ_max, σ_min and the fraction of σ > 1 at every step, and ρ (an eigenvalue decomposition) is
  computed at the distribution steps. On the top-k route σ_max is computed at every step by
  Golub–Kahan–Lanczos (a lower bound, exact once its iterations reach S), and J is formed and factored
  densely only at the distribution steps, for the plan's ``b_dist`` sequences: every singular value
  there (the top k stored), so σ_min and the fraction of σ > 1 are exact there and NaN elsewhere; ρ
  is not computed (NaN): no matrix-free route gives it reliably for a non-normal J;
* ``products`` (log-spaced distances) and ``lyapunov``: all directions or the top k, as planned;
* ``gates`` for kinds with gates, and the ``summary`` verdicts.

Jacobian work runs over the first ``batch_limit`` sequences (fewer per quantity where the plan's work
budget says so: ``Plan.b_spectra``, ``b_dist``, ``b_products``, ``b_lyapunov``), one chunk of ``plan.chunk`` timesteps
at a time (:class:`~gradflow.analysis.streaming.ChunkedLinearization`): the per-step Jacobians
[T, B, S, S] are formed only a chunk at a time and only on the dense route; the trace is read in
place, never copied per quantity (the batch subset is one ``index_select``). The spectra, products and
Lyapunov of every unit are independent jobs; on the top-k route they run longest first, two at a time
on a multi-core CPU (:func:`_workers`, :func:`_run_jobs`), each with one torch thread.
"""

from __future__ import annotations

import math
import os
import queue
import threading

import numpy as np
import pandas as pd
import torch

from .. import kinds
from ..errors import GradflowError
from ..trace import Trace
from . import _util
from .config import AnalysisConfig
from .adjoint import gradient_matrix
from .distance import distance_profile
from .frames import lyapunov_table, products_table, spectra_summary_table, spectra_table, verdicts
from .gates import gate_statistics
from .plan import Plan, plan_unit
from .products import lyapunov_exponents, product_singular_values
from .spectra import largest_singular_value, singular_values, step_summary
from .streaming import chunked_linearization

__all__ = ["analyze_trace", "plan_trace", "resolve_device"]

# σ_max on the top-k route: Lanczos stops early once no estimate moves by more than this (relative)
_SIGMA_MAX_TOL = 1e-10
# top-k products over distance: converged when ln σ moves by less than this (the reported log10 σ to ~4e-10)
_PRODUCTS_TOL = 1e-9


def _config(config) -> AnalysisConfig:
    if config is None:
        return AnalysisConfig()
    if isinstance(config, AnalysisConfig):
        return config
    return AnalysisConfig.from_mapping(config, where="analysis options")


def resolve_device(trace: Trace, config: AnalysisConfig) -> torch.device:
    """``config.device``, else the trace's recording device when it is CUDA and CUDA is available, else CPU."""
    want = config.device
    if want is None:
        rec = str(trace.meta.get("device", "cpu"))
        want = rec if rec.startswith("cuda") and torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise GradflowError(f"analysis device={want!r}: CUDA is not available here; use device='cpu'")
    return torch.device(want)


def _keys(trace: Trace, cfg: AnalysisConfig):
    keys = trace.keys()
    if cfg.keys != "all":
        keys = [k for k in keys if str(k) in set(cfg.keys)]
        if not keys:
            raise GradflowError(f"analysis keys {list(cfg.keys)!r} match none of {', '.join(map(str, trace.keys()))}")
    return keys


def _primary(trace, k) -> bool:
    return k.state == trace.cell(k).states[0]


def plan_trace(trace: Trace, config=None) -> dict[str, Plan]:
    """The :class:`Plan` of every analysed unit, keyed by its primary state key (``str``); raises a
    one-line GradflowError when a unit cannot fit the memory budget."""
    cfg = _config(config)
    out = {}
    for k in _keys(trace, cfg):
        if not _primary(trace, k):
            continue
        T, B = trace.shape(k)
        S = _util.joint_size(trace.cell(k))
        warm = min(cfg.warmup, max(T - 2, 0))
        kind = kinds.get(trace.cell(k).kind)
        mv = kind.impl.matvec_flops(trace.cell(k)) if kind.structure == "dense" else None
        out[str(k)] = plan_unit(str(k), S=S, T=T, B=min(B, cfg.batch_limit), structure=kind.structure,
                                config=cfg, lyapunov=cfg.lyapunov and T - warm >= 2, matvec_flops=mv)
    return out


# ---------------------------------------------------------------------------------- spectra
def _bad_steps(lin) -> torch.Tensor | None:
    """[T, B] True where the step's linearization holds NaN/Inf (its Jacobian is non-finite)."""
    parts = list(lin.coef.values()) if lin.step is None else [lin.x, *lin.prev]
    T, B = lin.shape[:2]
    if any(not bool(torch.isfinite(w).all()) for w in lin.weights.values()):
        return torch.ones(T, B, dtype=torch.bool)  # non-finite weights: every step is
    bad = None
    for v in parts:
        b = ~torch.isfinite(v).flatten(2).all(-1)
        bad = b if bad is None else bad | b
    return bad


def _masked_out(lin, bad):
    """The same linearization with the steps ``bad`` [T, B] replaced by the identity."""
    from dataclasses import replace

    if bad is None or not bool(bad.any()):
        return lin
    keep = ~bad if lin.mask is None else lin.mask & ~bad
    coef = {k: torch.nan_to_num(v) for k, v in lin.coef.items()}
    return replace(lin, coef=coef, mask=keep)


def _spectra(small: Trace, key, plan: Plan, cfg: AnalysisConfig, device):
    """(spectra rows, summary tensors [T, B]) of one unit along the plan, chunk by chunk."""
    T, S = plan.T, plan.S
    B = small.shape(key)[1]
    mask = small.mask(key)
    op = chunked_linearization(small, key, chunk=plan.chunk, step_order=False,
                               device=None if device.type == "cpu" else device)
    nan = lambda: torch.full((T, B), math.nan, dtype=torch.float64)  # noqa: E731
    summ = {"sigma_max": nan(), "sigma_min": nan(), "frac_gt1": nan(), "spectral_radius": nan()}
    want = torch.zeros(T, dtype=torch.bool)
    want[list(plan.steps)] = True
    rows = []
    r = min(plan.k, cfg.max_rank)
    for a in range(0, T, plan.chunk):
        b = min(T, a + plan.chunk)
        lin = op.positions(a, b)
        pos = torch.arange(a, b)
        sel, other = pos[want[a:b]], pos[~want[a:b]]
        if plan.spectra == "exact":
            sv = lin.moduli().sort(-1, descending=True).values.to(torch.float64).cpu()
            sv[torch.isnan(sv).any(-1)] = math.nan
            summ["sigma_max"][a:b], summ["sigma_min"][a:b] = sv[..., 0], sv[..., -1]
            fr = (sv > 1).to(torch.float64).mean(-1)
            fr[torch.isnan(sv[..., 0])] = math.nan
            summ["frac_gt1"][a:b] = fr
            summ["spectral_radius"][a:b] = sv[..., 0]
            rows.append(_rows(sv, key, r, mask[a:b], a))
            continue
        if plan.spectra == "dense":  # every step's singular values (exact σ_max, σ_min); ρ and rows at the plan's steps
            J = lin.dense()
            sv = singular_values(J, on_nonfinite="nan")
            st = step_summary(J, radius=False, sigma=sv, on_nonfinite="nan")
            for c in st:
                summ[c][a:b] = st[c].to(torch.float64).cpu()
            if len(sel):
                j = sel - a
                if plan.radius:
                    summ["spectral_radius"][sel] = step_summary(J[j], radius=True, sigma=sv[j], on_nonfinite="nan")[
                        "spectral_radius"].to(torch.float64).cpu()
                rows.append(_rows(sv[j].to(torch.float64).cpu(), key, r, mask[sel], sel))
            del J
            continue
        # top-k: σ_max at every step by Lanczos; at the distribution steps, J formed for b_dist sequences
        summ["sigma_max"][a:b] = _sigma_lanczos(lin, plan.iterations)
        if len(sel):
            sub = lin.select(sel - a)
            if plan.b_dist < B:
                sub = sub.select_batch(torch.arange(plan.b_dist))
            J = sub.to(torch.float64).dense()  # a few large matrices: one float64 SVD each, no float32 try first
            sv = singular_values(J, on_nonfinite="nan")
            st = step_summary(J, radius=False, sigma=sv, on_nonfinite="nan")
            del J
            for c in ("sigma_max", "sigma_min", "frac_gt1"):
                summ[c][sel, :plan.b_dist] = st[c].to(torch.float64).cpu()
            rows.append(_rows(sv.to(torch.float64).cpu(), key, r, mask[sel][:, :plan.b_dist], sel))
    spectra = pd.concat(rows, ignore_index=True) if rows else spectra_table(torch.zeros(0, B, r), key)
    return spectra, summ


def _sigma_lanczos(lin, iterations: int) -> torch.Tensor:
    """σ_max [n, B] of every step of ``lin`` by Golub–Kahan–Lanczos (NaN where the step is non-finite)."""
    bad = _bad_steps(lin)
    sv = largest_singular_value(_masked_out(lin, bad), iterations=iterations, tol=_SIGMA_MAX_TOL,
                                chunk=lin.shape[0]).to(torch.float64)
    if bad is not None and bool(bad.any()):
        sv[bad] = math.nan
    return sv


def _rows(sv, key, r, mask, positions) -> pd.DataFrame:
    """spectra rows of singular values [n, B, ≥r] at ``positions`` (an offset or an index tensor)."""
    df = spectra_table(sv, key, max_rank=r, mask=mask)
    if isinstance(positions, int):
        df["t"] = df["t"] + positions
    else:
        df["t"] = positions.numpy()[df["t"].to_numpy()]
    return df


# ---------------------------------------------------------------------------------- products, Lyapunov
def _products(small, key, plan: Plan, device, threads: int | None = None):
    op = chunked_linearization(small, key, chunk=plan.chunk, dtype=torch.float64)
    ds = list(plan.distances)
    ls = product_singular_values(op, distances=ds, mask=op.step_mask, k=None if plan.products >= plan.S else plan.products,
                                 device=device, tol=_PRODUCTS_TOL, threads=threads)
    return products_table(ls, key, ds)


def _lyapunov(small, key, plan: Plan, warmup: int, device):
    op = chunked_linearization(small, key, chunk=plan.chunk, dtype=torch.float64)
    res = lyapunov_exponents(op, warmup=warmup, k=None if plan.lyapunov >= plan.S else plan.lyapunov,
                             mask=op.step_mask, device=device)
    return lyapunov_table(res, key)


# ---------------------------------------------------------------------------------- the orchestrator
def _first(trace: Trace, b: int) -> Trace:
    """The trace of its first ``b`` sequences (itself when it has no more)."""
    return trace if b >= trace.shape(trace.keys()[0])[1] else trace.subset(slice(0, b))


def analyze_trace(trace: Trace, config=None, classes: np.ndarray | None = None, *,
                  plans: dict[str, Plan] | None = None) -> dict[str, pd.DataFrame]:
    """Every analysis table (``gradflow.tables`` schemas, without the ``run`` column) of a
    keep='states' trace, for every unit (or ``config.keys``), along the plan of each unit (see the
    module docstring). ``config``: an :class:`AnalysisConfig` (or a mapping validated into one);
    ``classes``: token classes [B] for the gate statistics; ``plans``: from :func:`plan_trace` (made
    here when None). With ``per_step_loss`` (a loss at every step) the distance profile is built from
    G[s, t] = ||∂L_s/∂s_t|| of the joint state over the analysed sequences."""
    if not isinstance(trace, Trace):
        raise GradflowError(f"analyze_trace: expected a gradflow.Trace, got {type(trace).__name__}")
    cfg = _config(config)
    plans = plan_trace(trace, cfg) if plans is None else plans
    device = resolve_device(trace, cfg)
    keys = _keys(trace, cfg)
    T, B = trace.shape(keys[0])
    small = trace if B <= cfg.batch_limit else trace.subset(slice(0, cfg.batch_limit))
    warmup = min(cfg.warmup, max(T - 2, 0))
    frac, ref, per_step = cfg.horizon_fraction, cfg.horizon_reference, bool(cfg.per_step_loss)
    # the Jacobian work of every unit (spectra, products, Lyapunov) first, as independent jobs; on
    # the top-k route they run two at a time (see _run_jobs), the cheap tables after, in unit order
    primaries = [k for k in keys if _primary(trace, k)]
    n_jobs = sum(1 + bool(plans[str(k)].products) + bool(plans[str(k)].lyapunov) for k in primaries)
    workers = _workers(plans, device, n_jobs)
    prod_threads = _product_threads(workers, sum(bool(plans[str(k)].products) for k in primaries), plans)
    jobs, slots, subsets = [], {}, {}
    for k in primaries:
        plan = plans[str(k)]
        sub = subsets[str(k)] = _first(small, plan.b_spectra)
        slots[(str(k), "spectra")] = len(jobs)
        jobs.append(lambda k=k, sub=sub, plan=plan: _spectra(sub, k, plan, cfg, device))
        if plan.products:
            slots[(str(k), "products")] = len(jobs)
            jobs.append(lambda k=k, plan=plan: _products(_first(small, plan.b_products), k, plan, device, prod_threads))
        if plan.lyapunov:
            slots[(str(k), "lyapunov")] = len(jobs)
            jobs.append(lambda k=k, plan=plan: _lyapunov(_first(small, plan.b_lyapunov), k, plan, warmup, device))
    # longest first (products over distance, then spectra, then Lyapunov: their usual order of cost
    # on the top-k route), so that two workers finish together
    rank = {"products": 0, "spectra": 1, "lyapunov": 2}
    order = sorted(slots, key=lambda ks: (rank[ks[1]], slots[ks]))
    ran = _run_jobs([jobs[slots[ks]] for ks in order], workers)
    done = [None] * len(jobs)
    for ks, res in zip(order, ran):
        done[slots[ks]] = res
    parts: dict[str, list[pd.DataFrame]] = {}
    for k in keys:
        primary = _primary(trace, k)
        summ = lyap = joint = None
        if per_step:
            if not primary:
                continue
            prof = distance_profile(gradient_matrix(small, k), fraction=frac, reference=ref)
        else:
            prof = distance_profile(trace, k, fraction=frac, reference=ref)
        tabs = {"distance": prof.table, "decay": prof.decay}
        if not per_step and len(trace.cell(k).states) > 1 and primary:
            joint = _joint_profile(trace, k, frac, ref)
            tabs["distance"] = pd.concat([tabs["distance"], joint.table], ignore_index=True)
            tabs["decay"] = pd.concat([tabs["decay"], joint.decay], ignore_index=True)
        if primary:
            spectra, st = done[slots[(str(k), "spectra")]]
            summ = spectra_summary_table(st, k, mask=subsets[str(k)].mask(k))
            tabs.update(spectra=spectra, spectra_summary=summ)
            if (str(k), "products") in slots:
                tabs["products"] = done[slots[(str(k), "products")]]
            if (str(k), "lyapunov") in slots:
                lyap = done[slots[(str(k), "lyapunov")]]
                tabs["lyapunov"] = lyap
            if kinds.get(trace.cell(k).kind).gates:
                tabs["gates"] = gate_statistics(trace, k, classes=classes)
        if len(trace.cell(k).states) == 1 or per_step:
            tabs["summary"] = verdicts(prof.decay, summ, lyap, prof.nonfinite, prof.table)
        elif joint is not None:  # LSTM: one verdict on the joint state (h, c), where the memory lives
            v = verdicts(joint.decay, None, None, pd.concat([prof.nonfinite, joint.nonfinite]), joint.table)
            extra = verdicts(None, summ, lyap, None, None)
            if len(extra):
                v["detail"] = v["detail"] + "; " + extra["detail"].iloc[0]
            tabs["summary"] = v
        for name, df in tabs.items():
            if df is not None and len(df):
                parts.setdefault(name, []).append(df)
    return {name: pd.concat(dfs, ignore_index=True) for name, dfs in parts.items()}


def _workers(plans: dict[str, Plan], device, jobs: int) -> int:
    """How many Jacobian jobs run at once: two on a CPU with two or more cores when some unit takes
    the top-k route (its per-step sweeps are thin GEMMs that one core runs as fast as two, so two
    jobs side by side nearly halve the time) and two of the largest working sets fit the budget
    together; else one (small units: Python-bound, where threads only contend for the GIL)."""
    if device.type != "cpu" or jobs < 2 or (os.cpu_count() or 1) < 2 or not plans:
        return 1
    big = [p for p in plans.values() if p.spectra == "top-k"]
    if not big:
        return 1
    peak = max(p.peak for p in plans.values())
    return 2 if 2 * peak <= min(p.memory for p in plans.values()) else 1


def _product_threads(workers: int, products_jobs: int, plans: dict[str, Plan]) -> int | None:
    """The ``threads`` of each products job. Products over distance are the longest job on the top-k
    route, so with fewer products jobs than workers a worker idles once its shorter jobs (spectra,
    Lyapunov) are done: the products jobs take those workers' share for their top-k finishes (the
    distances the shared rounds leave unsettled). Measured on 2 cores, analysis of one layer at
    H=512, T=100, B=16: LSTM 5.35 -> 4.46 s, GRU 3.28 -> 2.46 s; with two layers (two products jobs
    on two workers) a second thread each was 9% slower, so they get none. With one worker, small
    units keep the full-frame chain's own default (batch groups in parallel), and a top-k unit whose
    working set the budget fits only once gets one thread (each thread holds a chunk of its own)."""
    if workers > 1:
        return 1 + max(0, workers - products_jobs)
    return 1 if any(p.spectra == "top-k" for p in plans.values()) else None


def _run_jobs(jobs: list, workers: int) -> list:
    """Results of ``jobs`` (zero-argument callables) in order. With workers > 1 they run on that
    many daemon threads with one intra-op torch thread each (restored after, even on error); the
    first exception is re-raised once every job started has stopped, and an interrupt of the main
    thread propagates at once (daemon threads do not hold up the exit)."""
    if workers <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    results: list = [None] * len(jobs)
    errors: list = []
    todo = queue.SimpleQueue()
    for i in range(len(jobs)):
        todo.put(i)

    def work():
        while not errors:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = jobs[i]()
            except BaseException as e:  # re-raised in the caller's thread
                errors.append(e)

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pool = [threading.Thread(target=work, daemon=True, name=f"gradflow-analysis-{n}") for n in range(workers)]
        for t in pool:
            t.start()
        for t in pool:
            while t.is_alive():
                t.join(0.2)
    finally:
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]
    return results


def _joint_profile(trace, key, fraction, reference=1):
    """Distance profile of the joint state's gradient norm sqrt(Σ_states ||dL/ds_t||²) of a
    multi-state cell (LSTM: h and c), reported under the key ``<unit>/hc``."""
    states = trace.cell(key).states
    sq = sum(trace.norm(key.with_state(s)) ** 2 for s in states)
    with np.errstate(divide="ignore"):
        logn = np.log10(np.sqrt(sq.numpy()))
    label = str(key.with_state("".join(states)))
    return distance_profile(logn, label, direction=key.direction, mask=trace.mask(key), fraction=fraction,
                            reference=reference)
