"""What a reader could not make out at a glance: legends and titles cut off at the figure's edge,
values spanning decades on a linear axis, cells and panels that draw nothing (an exactly-zero batch
median, −∞ or NaN Lyapunov exponents, no finite gradient), many training steps on one panel. Each
test checks the figure's data, axes or layout, not pixels.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import QuadMesh

from gradflow.report import (
    fig_clipping,
    fig_distance,
    fig_gates,
    fig_gradnorm_heatmap,
    fig_products,
    fig_spectra,
)

from .test_figures import Q, artists, assert_readable, axes_by_title


# ---------------------------------------------------------------- layout: nothing cut off

LONG = {"rnn_tanh": "tanh RNN (hidden 32, seed 0)", "lstm": "LSTM (forget bias 5)",
        "rnn_tanh+clip": "ReLU RNN g=2 + clip", "irnn": "ReLU RNN g=2 (diverged at step 1)"}


def long_labels(df):
    return df.assign(run=df["run"].map(lambda r: LONG.get(r, r)))


def drawn(fig):
    """Draw ``fig`` (its top-level Figure) as the writers do and return the renderer."""
    from gradflow.report._style import styled

    top = fig.figure
    with styled():
        top.canvas.draw()
    return top.canvas.get_renderer()


def assert_inside(fig, what="legend"):
    """Every legend (figure or axes) and every axes title lies inside ``fig``'s box after a draw."""
    r = drawn(fig)
    box = fig.bbox
    from matplotlib.legend import Legend

    items = [(f"legend {i}", leg) for i, leg in enumerate(fig.findobj(Legend))]
    items += [(f"title {t.get_text()!r}", t) for ax in fig.get_axes() for t in (ax.title, ax._left_title)
              if t.get_text()]
    assert any(name.startswith("legend") for name, _ in items) or what != "legend"
    for name, a in items:
        e = a.get_window_extent(r)
        assert e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1, (
            name, e.bounds, box.bounds)


def _spectra_with_zeros(t):
    sp = long_labels(t("spectra"))
    sp.loc[sp.index[::7], "sigma"] = 0.0  # "… σ = 0 not shown" in every legend label
    return sp


FIGURES = {
    "heatmap": lambda t, **k: fig_gradnorm_heatmap(long_labels(t("gradnorms")), **k),
    "distance": lambda t, **k: fig_distance(long_labels(t("distance")), long_labels(t("decay")), **k),
    "spectra": lambda t, **k: fig_spectra(_spectra_with_zeros(t), long_labels(t("spectra_summary")), **k),
    "products": lambda t, **k: fig_products(long_labels(t("products")), long_labels(t("lyapunov")), **k),
    "gates": lambda t, **k: fig_gates(long_labels(t("gates")), **k),
    "clipping": lambda t, **k: fig_clipping(
        long_labels(t("metrics")), long_labels(t("clip_timesteps")),
        clip_text={v: "no clipping" if "clip" not in v else "clip norm ≤ 1" for v in LONG.values()},
        diverged_at={LONG["irnn"]: 60}, **k),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_legends_and_titles_lie_inside_the_figure(runset, name):
    """Long run labels wrap the legends into more rows instead of running off the page."""
    assert_inside(FIGURES[name](runset.table))


@pytest.mark.parametrize("name", ["spectra"])
def test_legends_fit_a_pdf_page_subfigure(runset, name):
    """Drawn under a page header (the PDF writer's target), the legend stays inside the subfigure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def target(w, h):
        page = Figure(figsize=(8.27, h + 2), layout="constrained")
        FigureCanvasAgg(page)
        return page.subfigures(2, 1, height_ratios=[2, h])[1]

    fig = FIGURES[name](runset.table, target=target)
    assert fig is not fig.figure
    assert_inside(fig)


def test_legend_below_wraps_and_reduces_columns():
    from matplotlib.lines import Line2D

    from gradflow.report._style import legend_below, new_figure, styled

    with styled():
        f = new_figure(6, 3)
        f.add_subplot().plot([0, 1])
        labels = ["short", "a label that is rather long " * 5, "x" * 20]
        leg = legend_below(f, [Line2D([], []) for _ in labels], labels, max_cols=3)
    texts = [t.get_text() for t in leg.get_texts()]
    assert "\n" in texts[1] and texts[0] == "short"
    assert leg._ncols < 3
    assert_inside(f)


# ---------------------------------------------------------------- spectra: log axis over decades

def _summary(values):
    rows = []
    for run, ys in values.items():
        for t, y in enumerate(ys):
            rows.append(dict(run=run, key="rnn/l0/d0/h", t=t, sigma_max=y, sigma_min=0.0, frac_gt1=0.0,
                             spectral_radius=y / 2))
    return pd.DataFrame(rows)


def test_spectra_summary_log_axis_when_values_span_decades():
    """ReLU g=2 reaches 5000 while the others stay near 1: a linear axis would flatten them to 0."""
    ss = _summary({"tanh RNN": [0.9] * 20, "LSTM": [1.3] * 20, "ReLU RNN g=2": [4500.0] * 8 + [0.0] * 12})
    fig = fig_spectra(None, ss)
    sig = artists(fig, "sigma_max|")
    rho = artists(fig, "spectral_radius|")
    assert {ln.axes.get_yscale() for ln in [*sig.values(), *rho.values()]} == {"log"}
    assert "log scale" in next(iter(sig.values())).axes.get_ylabel()
    for col in ("sigma_max", "spectral_radius"):
        # exact zeros cannot sit on a log axis: triangles at the bottom edge at those t
        zeros = artists(fig, f"{col}_zero|")
        assert list(zeros) == [f"{col}_zero|ReLU RNN g=2|rnn/l0/d0/h"]
        np.testing.assert_array_equal(zeros[f"{col}_zero|ReLU RNN g=2|rnn/l0/d0/h"].get_offsets()[:, 0],
                                      np.arange(8, 20))
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any("exactly 0" in t for t in legend)
    # values within a decade of 1 keep a linear axis
    fig = fig_spectra(None, _summary({"a": [0.8] * 5, "b": [1.5] * 5}))
    assert {ln.axes.get_yscale() for ln in artists(fig, "sigma_max|").values()} == {"linear"}
    assert not artists(fig, "sigma_max_zero|")


# ---------------------------------------------------------------- heatmap: median exactly 0

def _dead_batch(steps=(0, 25), T=6):
    """Two runs: 'dead' has 65 % of the batch at exactly 0 everywhere (median -inf, q75/q95 ~1e4) and
    at step 25 a last column where even q95 is 0; 'fine' has finite medians."""
    rows = []
    for run in ("fine", "dead"):
        for step in steps:
            for t in range(T):
                v = 4.0 - 0.5 * t
                q = dict(q05=v - 1, q25=v - 0.5, q50=v, q75=v + 0.2, q95=v + 0.4, frac_zero=0.0)
                if run == "dead":
                    q = dict(q05=-np.inf, q25=-np.inf, q50=-np.inf, q75=v, q95=v + 0.3, frac_zero=0.65)
                    if step == 25 and t == T - 1:
                        q.update(q75=-np.inf, q95=-np.inf, frac_zero=1.0)
                rows.append(dict(run=run, step=step, key="rnn/l0/d0/h", t=t, n=32, frac_nonfinite=0.0, **q))
    return pd.DataFrame(rows)


def test_heatmap_colours_zero_median_cells_by_the_95th_percentile():
    from matplotlib.collections import PolyCollection

    from gradflow.report.fig_heatmap import heatmap_layers

    g = _dead_batch()
    sub = g[g["run"] == "dead"]
    L = heatmap_layers(sub)
    q95 = sub.pivot(index="step", columns="t", values="q95").to_numpy()
    assert L["upper"].sum() == 11 and L["zero"].sum() == 1 and np.isneginf(L["q50"]).all()
    np.testing.assert_array_equal(L["colour"][L["upper"]], q95[L["upper"]])

    fig = fig_gradnorm_heatmap(g)
    assert_readable(fig)
    titles = axes_by_title(fig)
    ax = titles["dead — rnn/l0/d0/h"]
    meshes = {m.get_gid(): m for m in ax.collections if isinstance(m, QuadMesh)}
    up = np.ma.asarray(meshes["q95_median_zero"].get_array()).reshape(q95.shape)
    np.testing.assert_array_equal(~up.mask, L["upper"])
    np.testing.assert_allclose(up.data[L["upper"]], q95[L["upper"]])
    grey = np.ma.asarray(meshes["underflow"].get_array()).reshape(q95.shape)
    np.testing.assert_array_equal(~grey.mask, L["zero"])
    # the q95 colours share the panel's scale (the colour bar covers them), and the cells are hatched
    assert meshes["q95_median_zero"].norm is meshes["q50"].norm
    assert meshes["q50"].norm.vmax == pytest.approx(np.nanmax(q95[L["upper"]]))
    hatched = [c for c in ax.collections if isinstance(c, PolyCollection)
               and (c.get_gid() or "").startswith("median_zero_hatch")]
    assert hatched and all(c.get_hatch() for c in hatched)
    covered = np.zeros_like(L["upper"])
    xc = np.arange(q95.shape[1])  # t = column index here
    for c in hatched:
        for path in c.get_paths():
            (x0, y0), (x1, _) = path.vertices.min(0), path.vertices.max(0)
            covered[int(y0), (xc > x0) & (xc < x1)] = True
    np.testing.assert_array_equal(covered, L["upper"])
    cbar = [a for a in fig.get_axes() if a.get_label() == "<colorbar>"]
    assert any("hatched: 95th percentile" in c.get_ylabel() for c in cbar)
    # the finite-median panel is neither hatched nor grey
    fine = titles["fine — rnn/l0/d0/h"]
    assert not [c for c in fine.collections if (c.get_gid() or "").startswith(("median_zero", "underflow"))]
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any("median exactly 0" in t and "95th percentile" in t for t in legend)
    assert any("whole batch" in t for t in legend)
    assert_inside(fig)


def test_heatmap_notes_say_what_the_zero_median_cells_show():
    from gradflow.report.notes import zero_median_notes

    notes = zero_median_notes(_dead_batch())
    assert notes == ["dead: the median gradient is exactly 0 in all cells; 11 hatched, coloured by the 95th "
                     "percentile (65% of the batch exactly 0); 1 grey (95th percentile exactly 0 too)."]


def test_heatmap_step_ticks_are_evenly_spaced_with_first_and_last():
    from gradflow.report.fig_heatmap import step_ticks

    assert list(step_ticks(10)) == [0, 3, 6, 9]
    assert list(step_ticks(4)) == [0, 1, 2, 3]
    t = step_ticks(12)
    assert t[0] == 0 and t[-1] == 11 and len(t) <= 6 and len(set(np.diff(t[:-1]))) == 1


# ---------------------------------------------------------------- Lyapunov: non-finite exponents

def _lyap():
    rows = []
    for run, ex in {"tanh RNN": -0.36 - 0.1 * np.arange(8),
                    "LSTM": 0.01 - np.r_[0, 0.01, 0.02, 0.5, 1, 5, 20, 60],
                    "ReLU RNN g=2": np.full(8, -np.inf),
                    "ReLU RNN g=2 + clip": np.r_[0.42, 0.37, 0.3, -1, -3, -np.inf, -np.inf, -np.inf],
                    "broken": np.full(8, np.nan)}.items():
        for r, e in enumerate(ex, 1):
            rows.append(dict(run=run, key="rnn/l0/d0/h", rank=r, exponent=e, stderr=0.01))
    return pd.DataFrame(rows)


def test_lyapunov_marks_minus_infinity_and_names_runs_without_finite_exponents():
    from gradflow.report.fig_jacobians import lyapunov_ylim
    from gradflow.report.notes import lyapunov_notes

    ly = _lyap()
    fig = fig_products(None, ly)
    assert_readable(fig)
    ax = artists(fig, "lyapunov|")["lyapunov|tanh RNN|rnn/l0/d0/h"].axes
    neg = artists(fig, "lyapunov_neginf|")
    np.testing.assert_array_equal(neg["lyapunov_neginf|ReLU RNN g=2|rnn/l0/d0/h"].get_offsets()[:, 0],
                                  np.arange(1, 9))
    np.testing.assert_array_equal(neg["lyapunov_neginf|ReLU RNN g=2 + clip|rnn/l0/d0/h"].get_offsets()[:, 0],
                                  [6, 7, 8])
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "ReLU RNN g=2 (all −∞)" in legend and "ReLU RNN g=2 + clip (3 of 8 −∞)" in legend
    assert "broken (all NaN)" in legend
    notes = " ".join(t.get_text() for t in ax.texts)
    assert "not drawn (no finite exponent): broken (all NaN)" in notes
    # the axis is fitted to the largest exponents; the smallest run off the bottom, and it says so
    lo, hi = ax.get_ylim()
    assert (lo, hi) == pytest.approx(lyapunov_ylim(ly)[:2])
    assert lo < -0.56 and hi > 0.42 and lo > -60
    assert "continue down to -60" in notes
    assert_inside(fig)
    text = " ".join(lyapunov_notes(ly))
    assert "ReLU RNN g=2: no finite Lyapunov exponent (all −∞)" in text
    assert "broken: no finite Lyapunov exponent (all NaN): nothing can be drawn" in text
    assert "ReLU RNN g=2 + clip: 3 of 8 Lyapunov exponents are −∞" in text
    assert "tanh RNN" not in text and "LSTM" not in text


def test_products_section_notes_runs_without_finite_exponents(tmp_path):
    from gradflow.report import load_runs, plan

    from .synth import make_run

    d = make_run(tmp_path / "runs" / "irnn", "irnn", tables=("lyapunov",))
    f = d / "lyapunov.csv"
    ly = pd.read_csv(f).assign(exponent=-np.inf, stderr=np.nan)
    ly.to_csv(f, index=False)
    sections, _ = plan(load_runs([d]))
    (prod,) = [s for s in sections if s.id == "products"]
    assert any(n.startswith("irnn: no finite Lyapunov exponent (all −∞)") for n in prod.notes)


# ---------------------------------------------------------------- distance: nothing to draw

def test_distance_panel_says_why_it_has_no_line(runset):
    d = runset.table("distance").copy()
    d.loc[d["run"] == "irnn", Q] = np.nan
    d.loc[d["run"] == "rnn_tanh", Q] = -np.inf
    d.loc[d["run"] == "rnn_tanh", "frac_zero"] = 0.97
    fig = fig_distance(d, runset.table("decay"))
    t = axes_by_title(fig)
    assert "no finite gradient: NaN/Inf at every distance" in [x.get_text() for x in t["irnn"].texts]
    assert ["median exactly 0 at every distance\n(97% of the batch got no gradient at all)"] == [
        x.get_text() for x in t["rnn_tanh"].texts]
    assert not t["lstm"].texts


# ---------------------------------------------------------------- clipping: zeros, one step in (d)

def test_clipping_log_loss_marks_exact_zeros_and_picks_one_step_per_run(runset):
    from gradflow.report.fig_training import clip_steps

    m = runset.table("metrics").copy()
    m.loc[(m["run"] == "lstm") & (m["step"] >= 90), "loss"] = 0.0  # float32: a loss of exactly 0
    m.loc[m["run"] == "rnn_tanh+clip", "loss"] *= 1e4
    ct = runset.table("clip_timesteps")
    ct = pd.concat([ct, ct.assign(step=80, log10_norm=ct["log10_norm"] - 1)], ignore_index=True)
    bump = (ct["run"] == "rnn_tanh+clip") & (ct["step"] == 80) & (ct["when"] == "after")
    ct.loc[bump, "log10_norm"] -= 3  # clipping cut most at step 80
    steps = clip_steps(ct)
    assert steps == {"rnn_tanh": 80, "lstm": 80, "rnn_tanh+clip": 80, "irnn": 80}
    ct2 = ct[~((ct["run"] == "lstm") & (ct["step"] == 80))]
    assert clip_steps(ct2)["lstm"] == 40  # the last step with a finite norm where nothing was clipped
    fig = fig_clipping(m, ct2)
    loss_ax = artists(fig, "loss|")["loss|lstm"].axes
    assert loss_ax.get_yscale() == "log"
    zeros = artists(fig, "loss_zero|")
    np.testing.assert_array_equal(zeros["loss_zero|lstm"].get_offsets()[:, 0], np.arange(90, 100))
    shown = {g.split("|")[1]: int(g.split("|")[3]) for g in artists(fig, "clip_t|")}
    assert shown == {"rnn_tanh": 80, "lstm": 40, "rnn_tanh+clip": 80, "irnn": 80}
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "lstm ((d) at step 40)" in legend and any("exactly 0" in t for t in legend)
    assert "see legend" in artists(fig, "clip_t|").popitem()[1].axes.get_title(loc="left")


@pytest.mark.parametrize("lo,hi,want", [
    (0.6, 1.1, {"0.7", "0.8", "0.9"}),  # less than half a decade: every minor tick is labelled
    (0.15, 1.2, {"0.2", "0.3", "0.5"}),  # under two decades: 2, 3 and 5 × 10ᵏ
])
def test_a_log_axis_spanning_less_than_a_decade_has_readable_ticks(lo, hi, want):
    """A σ histogram whose values lie in 0.79-0.87 showed a single tick label ("1") on its log axis."""
    import matplotlib.pyplot as plt

    from gradflow.report._style import log_scale

    f, ax = plt.subplots()
    try:
        ax.plot([lo, hi], [0, 1])
        ax.set_xlim(lo, hi)
        log_scale(ax, "x")
        f.canvas.draw()
        a, b = ax.get_xlim()
        shown = {t.get_text() for t in ax.get_xticklabels(minor=True) + ax.get_xticklabels()
                 if t.get_text() and a <= t.get_position()[0] <= b}
        assert want <= shown, shown
    finally:
        plt.close(f)
