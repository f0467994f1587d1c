"""What a report contains: the sections, the tables each needs, how to read each figure.

:func:`plan` turns a :class:`RunSet` into the sections that have data (each with a plain-language
explanation, notes on what is missing or flagged, a figure-drawing callable and/or a table) and a
list of the sections left out with the reason. HTML and PDF render the same plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from ._style import ordered
from .fig_gradients import fig_distance
from .fig_heatmap import fig_gradnorm_heatmap
from .fig_jacobians import fig_products, fig_spectra
from .fig_sweep import fig_sweep, numeric_axes, primary_rows, sweep_points
from .fig_training import clip_rates, fig_clipping, fig_gates, gate_kind
from .load import RunSet, fmt_number
from .notes import coverage_notes, flag_notes, lyapunov_notes, plan_notes, zero_median_notes

__all__ = ["Section", "Table", "plan", "run_rows", "RUN_COLUMNS", "verdict_table"]


@dataclass(frozen=True)
class Table:
    """A small display table: header cells, rows of text cells, an optional CSS class per row."""

    columns: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    row_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Section:
    id: str
    title: str
    explanation: str
    sources: tuple[str, ...]  # table names the section reads
    notes: tuple[str, ...] = ()
    draw: Callable | None = None  # draw(target=None) -> Figure
    alt: str = ""
    table: Table | None = None
    table_caption: str = ""


@dataclass(frozen=True)
class Omitted:
    id: str
    title: str
    note: str


EXPLAIN = {
    "summary": (
        "One verdict per run and recorded state, in plain words, from the analysis (summary.csv). "
        "'Vanishing' means the gradient that reaches early timesteps is orders of magnitude smaller "
        "than at the loss; 'exploding' that it grows. The figures below show the evidence."
    ),
    "gradnorms": (
        "Each cell is the median over the batch of the gradient norm ‖dL/ds_t‖ that reached timestep t "
        "(columns) at one recorded training step (rows). The loss sits at the last timestep, so the "
        "gradient enters at the right edge and flows leftwards through the recurrence: colour fading "
        "towards the left means it vanishes with distance, brightening means it explodes. Each panel "
        "has its own logarithmic colour scale (read the colour bar; compare runs in the next figure). "
        "Hatched cells: at least half of the batch got a gradient of exactly 0 there (a saturated output "
        "whose loss gradient is 0 in float32, or dead ReLU units), so the median is 0; the colour then "
        "shows the 95th percentile, what the rest of the batch received. Grey cells: (nearly) the whole "
        "batch got exactly 0, from float32 underflow (the true value is below float32 range, not zero), no "
        "path to the loss (an LSTM cell state at the last step) or no gradient at all; red: NaN or Inf."
    ),
    "distance": (
        "Median gradient norm against temporal distance (how many steps separate the state from the "
        "loss), with the 25–75% (dark) and 5–95% (light) spread over the batch, on a shared log axis. "
        "A straight falling line means exponential vanishing; the dashed line has the fitted slope, "
        "written in the legend as the factor the gradient is multiplied by per step. The dotted line is "
        "the memory horizon: the distance where the gradient has fallen by the stated factor below its "
        "value at distance 1, the first step back through the recurrence (distance 0 is the loss's direct "
        "gradient, which reaches the state through the readout; in gated cells it falls away within a few "
        "steps while the cell state still carries the gradient). Triangles "
        "at the bottom mark distances where some gradients were exactly 0 in float32: either underflow "
        "(the true value is below float32 range, not zero) or no gradient at all for those batch items "
        "(a saturated output, dead ReLU units)."
    ),
    "spectra": (
        "Singular values σ of the per-step Jacobians ∂s_t/∂s_(t-1): a gradient passing one step is "
        "stretched by σ > 1 and shrunk by σ < 1 along each direction. Mass left of the dashed line "
        "σ = 1 means gradients shrink at every step (vanishing); values right of it allow growth "
        "(explosion). Below: the largest singular value σ_max and the spectral radius ρ (largest "
        "|eigenvalue|) at each timestep, averaged over the batch (log scale when they span decades; "
        "triangles at the bottom mark timesteps where the Jacobian is exactly 0, e.g. every ReLU unit "
        "inactive). σ_max < 1 everywhere guarantees vanishing; ρ > 1 over many steps makes explosion likely."
    ),
    "products": (
        "Top: singular values of the product of k consecutive Jacobians, i.e. how much k steps together "
        "can stretch (σ > 1, above the dashed line) or shrink (below) a gradient, one line per "
        "direction (colour = rank, darkest the largest). The top line is the most any gradient can keep "
        "over k steps. Bottom: the Lyapunov spectrum, the average growth rate per step of each direction "
        "in natural log units: exponents below 0 vanish like e^(λk), above 0 explode. Its axis is fitted "
        "to the largest exponents, which decide what a gradient keeps; smaller ones may run off the bottom "
        "(the panel says how far), and −∞ (a direction mapped exactly to 0) are triangles at the bottom."
    ),
    "gates": (
        "Mean gate activation at each timestep (band: 25–75% over the batch), split by token class when "
        "the task has classes. Gates that close on irrelevant tokens and open on relevant ones show the "
        "cell learnt what to remember; the notes say how to read each cell's gates."
    ),
    "clipping": (
        "(a) Training loss per step. (b) Global gradient norm before clipping (solid) and after "
        "(dashed, log scale); the gap is what clipping removed. (c) Share of steps on which clipping "
        "fired. (d) Per-timestep gradient norms before and after clipping at one recorded step per run "
        "(the step where clipping cut most, else the last; named in the legend): clipping by "
        "global norm rescales every timestep by the same factor, so it caps an explosion but cannot "
        "bring back a gradient that has vanished."
    ),
}

EXPLAIN["sweep"] = (
    "How the sweep's outcome changes along each numeric sweep axis (from sweep.csv): left, the memory "
    "horizon (how many steps back the gradient stays above the horizon threshold; higher = longer memory); "
    "right, the final eval metric with the chance level as a dashed grey line. One line per cell; each "
    "point is the mean over seeds and the other axes, its error bar runs from the lowest to the highest "
    "value. Only each run's main state is used (LSTM: h and c together, '/hc'; other cells: '/h'). Open "
    "triangles at the top of a horizon panel mark runs whose gradient never fell below the threshold "
    "within the sequence (censored: the horizon is at least the sequence length); they are not in the mean."
)

TITLES = {
    "summary": "Verdicts",
    "gradnorms": "Gradient norm over training and time",
    "distance": "Gradient against temporal distance",
    "spectra": "Per-step Jacobian spectra",
    "products": "Jacobian products and Lyapunov spectrum",
    "gates": "Gate activations",
    "clipping": "Training and gradient clipping",
}

NEEDS = {
    "summary": ("summary",),
    "gradnorms": ("gradnorms",),
    "distance": ("distance", "decay"),
    "spectra": ("spectra", "spectra_summary"),
    "products": ("products", "lyapunov"),
    "gates": ("gates",),
    "clipping": ("metrics", "clip_timesteps"),
}


def plan(rs: RunSet) -> tuple[list[Section], list[Omitted]]:
    """The sections with data, in reading order, and the ones left out (with why)."""
    out, omitted = [], []
    sweep_sec = _sweep(rs)
    for sid in TITLES:
        if sid == "gradnorms" and sweep_sec is not None:
            (out if isinstance(sweep_sec, Section) else omitted).append(sweep_sec)
        have = [t for t in NEEDS[sid] if rs.has(t)]
        if not have:
            files = " or ".join(f"{t}.csv" for t in NEEDS[sid])
            omitted.append(Omitted(sid, TITLES[sid], f"No run has {files} with rows, so this section is left out."))
            continue
        out.append(_BUILD[sid](rs, tuple(have)))
    return out, omitted


def _sweep(rs: RunSet) -> Section | Omitted | None:
    """The sweep comparison (None when no loaded study has a sweep.csv)."""
    sw = rs.sweep
    if sw is None:
        return None
    title = "Sweep comparison"
    axes = numeric_axes(sw, rs.sweep_axes) if len(sw) else []
    if not axes:
        return Omitted("sweep", title, "sweep.csv has no numeric axis other than seed with more than one value "
                                       "(or no rows), so there is nothing to plot against; see the runs table.")
    notes = []
    p = primary_rows(sw)
    for axis in axes:
        hp = sweep_points(sw, axis, "horizon")
        for _, r in hp[hp["censored"] > 0].iterrows():
            notes.append(f"{axis} = {r['x']:g}, {r['cell']}: {int(r['censored'])} of {int(r['censored'] + r['n'])} "
                         "run(s) never reached the horizon (censored, open triangle at the top).")
        break  # censoring is per run, the same for every axis: list it once
    if "status" in p.columns:
        bad = p[p["status"].fillna("").astype(str) != "finished"]
        for _, r in bad.iterrows():
            notes.append(f"{r['run']}: {r['status']}" + (f" ({r['error']})" if isinstance(r.get("error"), str)
                                                        and r.get("error") else "")
                         + "; its missing values are left out of the means.")
    if "key" in p.columns:
        keys = sorted({str(k) for k in p["key"] if isinstance(k, str) and k})
        if keys:
            notes.append("State used per run: " + ", ".join(keys) + ".")
    axes_t = tuple(rs.sweep_axes)
    return Section(
        "sweep", title, EXPLAIN["sweep"], (), tuple(notes),
        draw=lambda target=None: fig_sweep(sw, axes_t, target=target),
        alt="Memory horizon and eval metric against " + ", ".join(axes) + ", one line per cell",
    )


def verdict_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The verdicts as a display frame (run, state, verdict, detail, kind), e.g. for a terminal;
    ``kind`` is vanishing / exploding / nonfinite / ok / neutral."""
    out = summary[["run", "key", "verdict", "detail"]].rename(columns={"key": "state"}).reset_index(drop=True)
    out["kind"] = [verdict_class(v) for v in out["verdict"]]
    return out


def _summary(rs: RunSet, have) -> Section:
    s = rs.table("summary")
    flagged = {r.label for r in rs.runs if r.flagged}
    rows, classes = [], []
    for _, r in s.iterrows():
        rows.append((r["run"], r["key"], r["verdict"], r["detail"]))
        cls = verdict_class(r["verdict"])
        classes.append(cls + (" flagged" if r["run"] in flagged else ""))
    return Section(
        "summary", TITLES["summary"], EXPLAIN["summary"], have,
        notes=tuple(coverage_notes(rs, have) + flag_notes(rs, have)),
        table=Table(("run", "state", "verdict", "detail"), tuple(rows), tuple(classes)),
    )


def verdict_class(verdict: str) -> str:
    """CSS class of a verdict: its leading word (analysis.verdicts writes "vanishing: ...")."""
    v = str(verdict).lower()
    if "non-finite" in v or "nan" in v.split(":")[0]:
        return "nonfinite"
    if "vanish" in v:
        return "vanishing"
    if "explod" in v:
        return "exploding"
    if v.startswith(("stable", "healthy", "ok")):
        return "ok"
    return "neutral"


def _gradnorms(rs: RunSet, have) -> Section:
    g = rs.table("gradnorms")
    notes = coverage_notes(rs, have) + flag_notes(rs, have)
    notes += zero_median_notes(g)
    return Section(
        "gradnorms", TITLES["gradnorms"], EXPLAIN["gradnorms"], have, tuple(notes),
        draw=lambda target=None: fig_gradnorm_heatmap(g, target=target),
        alt="Heatmaps of the median log10 gradient norm over training step and timestep, one per run and state",
    )


def _distance(rs: RunSet, have) -> Section:
    d = rs.table("distance") if rs.has("distance") else None
    dec = rs.table("decay") if rs.has("decay") else None
    notes = coverage_notes(rs, have) + flag_notes(rs, have)
    if d is None:
        notes.append("distance.csv is absent: only the fitted decay table is shown.")
    elif dec is None:
        notes.append("decay.csv is absent: no fitted decay rate or memory horizon is marked.")
    else:
        notes.append("The dashed fit uses the analysis' slope (decay_rate); its intercept is the least-squares "
                     "one for that slope, since decay.csv stores no intercept.")
    if d is not None and "frac_nonfinite" in d.columns:
        for run in dict.fromkeys(d.loc[d["frac_nonfinite"] > 0, "run"]):
            every = bool((d.loc[d["run"] == run, "frac_nonfinite"] > 0).all())
            notes.append(f"{run}: NaN/Inf gradients at {'every distance' if every else 'some distances'} "
                         "(red crosses at the top).")
    for run in dict.fromkeys(d.loc[d["frac_zero"] > 0, "run"]) if d is not None else ():
        sel = d["run"] == run
        fz = d.loc[sel, "frac_zero"]
        where = "every distance" if bool((fz > 0).all()) else "some distances"
        line = "; the median is exactly 0 everywhere, so no line is drawn" if np.isneginf(
            d.loc[sel, "q50"].to_numpy(float)).all() else ""
        notes.append(f"{run}: up to {fz.max():.0%} of gradients exactly 0 at {where} (float32 underflow, no path "
                     f"to the loss, or no gradient at all: a saturated output, dead units){line}.")
    table = None
    if dec is not None:
        rows = []
        for _, r in dec.iterrows():
            rate = float(r["decay_rate"])
            lo_, hi_ = float(r["ci_low"]), float(r["ci_high"])
            ci = f"[{lo_:.3g}, {hi_:.3g}]" if math.isfinite(lo_) and math.isfinite(hi_) else "—"
            hz = ("not reached" if bool(r["horizon_censored"]) or not math.isfinite(float(r["horizon"]))
                  else f"{float(r['horizon']):.3g}")
            if not math.isfinite(rate) and not math.isfinite(float(r["horizon"])):
                hz = "— (no finite gradient to fit)"
            ext = float(r.get("horizon_extrapolated", math.nan))
            if hz == "not reached" and math.isfinite(ext) and ext > 0:
                hz += f" (≈{ext:.3g} extrapolated)"
            ok = math.isfinite(rate)
            ref = float(r.get("reference", 0.0))  # runs written before the reference column used distance 0
            ref = int(ref) if math.isfinite(ref) else 0
            rows.append((r["run"], r["key"], f"{rate:.3g}" if ok else "—", ci, f"{10 ** rate:.3g}×" if ok else "—",
                         hz, f"{float(r['fraction']):.3g} × distance {ref}",
                         "yes" if bool(r["underflow"]) else "no"))
        table = Table(("run", "state", "decay rate (log10/step)", "95% CI", "factor per step",
                       "horizon (distance)", "horizon threshold", "float32 underflow"), tuple(rows))
    return Section(
        "distance", TITLES["distance"], EXPLAIN["distance"], have, tuple(notes),
        draw=None if d is None else (lambda target=None: fig_distance(d, dec, target=target)),
        alt="Gradient norm against temporal distance per run with fitted decay and memory horizon",
        table=table, table_caption="Fitted decay per run and state (decay.csv)",
    )


def _spectra(rs: RunSet, have) -> Section:
    sp = rs.table("spectra") if rs.has("spectra") else None
    ss = rs.table("spectra_summary") if rs.has("spectra_summary") else None
    notes = plan_notes(rs, have) + coverage_notes(rs, have)
    if sp is None:
        notes.append("spectra.csv is absent: the distribution of singular values is not shown.")
    else:
        v = sp["sigma"].to_numpy(float)
        if not (np.isfinite(v) & (v > 0)).any():
            notes.append("Every singular value in spectra.csv is 0 or non-finite: no distribution can be drawn "
                         "on a log axis.")
            sp = None
    if ss is None:
        notes.append("spectra_summary.csv is absent: σ_max and spectral radius over time are not shown.")
    elif not np.isfinite(ss["spectral_radius"].to_numpy(float)).any():
        notes.append("The spectral radius was not computed (all NaN in spectra_summary.csv): only σ_max is shown.")
    if sp is None and ss is None:  # nothing drawable: the notes say why
        return Section("spectra", TITLES["spectra"], EXPLAIN["spectra"], have, tuple(notes))
    return Section(
        "spectra", TITLES["spectra"], EXPLAIN["spectra"], have, tuple(notes),
        draw=lambda target=None: fig_spectra(sp, ss, target=target),
        alt="Distribution of per-step Jacobian singular values, and sigma_max and spectral radius over time",
    )


def _products(rs: RunSet, have) -> Section:
    pr = rs.table("products") if rs.has("products") else None
    ly = rs.table("lyapunov") if rs.has("lyapunov") else None
    notes = plan_notes(rs, have) + coverage_notes(rs, have)
    if pr is None:
        notes.append("products.csv is absent: singular values of products over distance are not shown.")
    if ly is None:
        notes.append("lyapunov.csv is absent: the Lyapunov spectrum is not shown.")
    else:
        notes += lyapunov_notes(ly)
    return Section(
        "products", TITLES["products"], EXPLAIN["products"], have, tuple(notes),
        draw=lambda target=None: fig_products(pr, ly, target=target),
        alt="Singular values of Jacobian products against distance, and Lyapunov exponents",
    )


def name_token_classes(gates: pd.DataFrame, rs: RunSet) -> pd.DataFrame:
    """Integer token classes ("0", "1", ...) replaced by the task's ``class_names`` from run.json
    (e.g. key / blank / noise) where the run records them; other values are kept."""
    out = gates.copy()
    for r in rs.runs:
        names = r.task.get("class_names")
        if not isinstance(names, (list, tuple)) or not names:
            continue
        sel = out["run"] == r.label
        out.loc[sel, "token_class"] = [
            str(names[int(c)]) if str(c).isdigit() and int(c) < len(names) else c
            for c in out.loc[sel, "token_class"]
        ]
    return out


def _gates(rs: RunSet, have) -> Section:
    g = name_token_classes(rs.table("gates"), rs)
    notes = coverage_notes(rs, have)
    if set(g["token_class"]) == {"all"}:
        notes.append("The task has no token classes: one line per gate.")
    for kind in dict.fromkeys(gate_kind(ordered(s["gate"])) for _, s in g.groupby(["run", "key"], sort=False)):
        if kind is not None and kind.gate_note and kind.gate_note not in EXPLAIN["gates"]:
            notes.append(kind.gate_note)
    return Section(
        "gates", TITLES["gates"], EXPLAIN["gates"], have, tuple(notes),
        draw=lambda target=None: fig_gates(g, target=target),
        alt="Gate activations over timesteps per run, split by token class",
    )


def _clipping(rs: RunSet, have) -> Section:
    m = rs.table("metrics") if rs.has("metrics") else None
    ct = rs.table("clip_timesteps") if rs.has("clip_timesteps") else None
    notes = coverage_notes(rs, have) + flag_notes(rs, have)
    if m is None:
        notes.append("metrics.csv is absent: loss, global norms and clipping rate are not shown.")
    if ct is None:
        notes.append("clip_timesteps.csv is absent: per-timestep norms before/after clipping are not shown.")
    if m is not None:
        for run, rate in clip_rates(m).items():
            r = rs.run(run)
            if r.clip.get("mode") not in (None, "none"):
                notes.append(f"{run}: {r.clip_text}; clipping fired on {rate:.0%} of steps.")
    clip_text = {r.label: r.clip_text for r in rs.runs}
    div = {r.label: r.diverged_at for r in rs.runs if r.diverged_at is not None}
    return Section(
        "clipping", TITLES["clipping"], EXPLAIN["clipping"], have, tuple(notes),
        draw=lambda target=None: fig_clipping(m, ct, clip_text=clip_text, diverged_at=div, target=target),
        alt="Loss curves, global gradient norm before and after clipping, clipping rate, per-timestep norms",
    )


_BUILD = {
    "summary": _summary,
    "gradnorms": _gradnorms,
    "distance": _distance,
    "spectra": _spectra,
    "products": _products,
    "gates": _gates,
    "clipping": _clipping,
}

RUN_COLUMNS = ("run", "status", "study", "task", "model", "parameters", "clipping", "final metric", "seed",
               "device", "finished", "versions")


def _when(stamp) -> str:
    """An ISO time stamp shortened to minutes ("2026-11-22 21:06"); anything else as is."""
    m = re.match(r"^(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2})", str(stamp)) if stamp else None
    return f"{m[1]} {m[2]}" if m else fmt_number(stamp)


def _result_text(r) -> str:
    """e.g. "0.562 (chance 0.25)" or "0.98 (chance 0.25), solved" from run.json's result."""
    m = r.result.get("eval_metric")
    if not isinstance(m, (int, float)) or isinstance(m, bool):
        return "—"
    chance = r.result.get("chance", r.task.get("chance"))
    text = f"{m:.3g}" + (f" (chance {chance:.3g})" if isinstance(chance, (int, float)) else "")
    return text + (", solved" if r.result.get("solved") is True else "")


def run_rows(rs: RunSet) -> Table:
    """One row of metadata per run (from run.json); flagged runs get the CSS class 'flagged'."""
    rows, classes = [], []
    for r in rs.runs:
        status = ("⚠ " if r.flagged else "") + r.status + (f" at step {r.diverged_at}" if r.diverged_at is not None else "")
        task = str(r.task.get("name", "—")) + (f", T={r.task['T']}" if "T" in r.task else "")
        model = str(r.model.get("cell", "—"))
        if "hidden" in r.model:
            model += f", hidden {r.model['hidden']}"
        if "layers" in r.model:
            model += f" × {r.model['layers']} layer" + ("s" if r.model["layers"] != 1 else "")
        vtext = ", ".join(f"{k} {v}" for k, v in r.versions.items()) or "—"
        rows.append((r.label, status, r.study or "—", task, model, fmt_number(r.model.get("n_params")),
                     r.clip_text, _result_text(r), fmt_number(r.meta.get("seed")), fmt_number(r.meta.get("device")),
                     _when(r.meta.get("finished")), vtext))
        classes.append("flagged" if r.flagged else "")
    return Table(RUN_COLUMNS, tuple(rows), tuple(classes))
