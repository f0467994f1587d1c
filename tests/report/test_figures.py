"""Figures are checked on their data: what is plotted equals the table values (not pixels)."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import QuadMesh

from gradflow.errors import GradflowError
from gradflow.report import (
    fig_clipping,
    fig_distance,
    fig_gates,
    fig_gradnorm_heatmap,
    fig_products,
    fig_spectra,
)
from gradflow.report.fig_gradients import fit_intercept

from .synth import F32_LOG10_MIN, RUNS, T


def artists(fig, gid_prefix):
    """Every artist in ``fig`` (subfigures included) whose gid starts with ``gid_prefix``."""
    found = fig.findobj(lambda a: (a.get_gid() or "").startswith(gid_prefix))
    return {a.get_gid(): a for a in found}


def axes_by_title(fig):
    return {ax.get_title(loc="left"): ax for ax in fig.get_axes() if ax.get_title(loc="left")}


def assert_readable(fig):
    """Every data axes has an x and a y label (or categorical tick labels), every figure a legend
    or a colour bar, and nothing is registered with pyplot."""
    import matplotlib.pyplot as plt

    data_axes = [ax for ax in fig.get_axes() if ax.get_lines() or ax.collections or ax.patches]
    assert data_axes
    for ax in data_axes:
        if ax.get_label() == "<colorbar>":
            assert ax.get_ylabel() or ax.get_xlabel()
            continue
        assert ax.get_xlabel(), ax.get_title(loc="left")
        ticks = [t.get_text() for t in ax.get_yticklabels()]
        assert ax.get_ylabel() or any(t and not t.replace(".", "").isdigit() for t in ticks), ax.get_title(loc="left")
    assert fig.legends or any(ax.get_legend() for ax in fig.get_axes()) or any(
        ax.get_label() == "<colorbar>" for ax in fig.get_axes())
    assert plt.get_fignums() == []
    w, h = fig.get_size_inches()
    assert 6 <= w <= 8.5 and 2 <= h <= 11.7  # fits a page


# ---------------------------------------------------------------- heatmap

def test_heatmap_cells_equal_q50_per_run_and_key(runset):
    g = runset.table("gradnorms")
    fig = fig_gradnorm_heatmap(g)
    assert_readable(fig)
    titles = axes_by_title(fig)
    panels = list(dict.fromkeys(zip(g["run"], g["key"])))
    assert len([t for t in titles if " — " in t]) == len(panels)
    for run, key in panels:
        ax = titles[f"{run} — {key}"]
        sub = g[(g["run"] == run) & (g["key"] == key)]
        want = sub.pivot(index="step", columns="t", values="q50").sort_index().sort_index(axis=1).to_numpy()
        meshes = {m.get_gid(): m for m in ax.collections if isinstance(m, QuadMesh)}
        got = np.ma.asarray(meshes["q50"].get_array()).reshape(want.shape)
        fin = np.isfinite(want)
        np.testing.assert_array_equal(got.mask, ~fin)
        np.testing.assert_allclose(got.data[fin], want[fin])
        # exact zeros (float32 underflow) are painted, not dropped
        if np.isneginf(want).any():
            under = np.ma.asarray(meshes["underflow"].get_array()).reshape(want.shape)
            np.testing.assert_array_equal(~under.mask, np.isneginf(want))
        if np.isnan(want).any():
            bad = np.ma.asarray(meshes["nonfinite"].get_array()).reshape(want.shape)
            np.testing.assert_array_equal(~bad.mask, np.isnan(want))
        # rows are labelled with the recorded training steps
        labels = [t.get_text() for t in ax.get_yticklabels()]
        assert labels[0] == "0" and labels[-1] == str(max(sub["step"]))
        assert ax.get_xlabel().startswith("timestep")
    # one colour bar per panel, labelled
    cbars = [ax for ax in fig.get_axes() if ax.get_label() == "<colorbar>"]
    assert len(cbars) == len(panels)
    assert all("‖dL/ds_t‖" in c.get_ylabel() for c in cbars)
    legend_texts = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert any("underflow" in t for t in legend_texts) and any("NaN" in t for t in legend_texts)


def test_heatmap_rejects_duplicate_cells(runset):
    g = runset.table("gradnorms")
    with pytest.raises(GradflowError, match="duplicate rows"):
        fig_gradnorm_heatmap(pd.concat([g, g.iloc[:1]]))


def test_empty_tables_raise():
    for fn in (fig_gradnorm_heatmap, fig_distance, fig_gates):
        with pytest.raises(GradflowError, match="no rows"):
            fn(pd.DataFrame())
    for fn in (fig_spectra, fig_products, fig_clipping):
        with pytest.raises(GradflowError, match="no rows"):
            fn(None, None)


# ---------------------------------------------------------------- distance

def test_distance_lines_fit_horizon_and_underflow(runset):
    d, dec = runset.table("distance"), runset.table("decay")
    fig = fig_distance(d, dec)
    assert_readable(fig)
    med, fits, hz, under = (artists(fig, p) for p in ("median|", "fit|", "horizon|", "underflow|"))
    for run, key in dict.fromkeys(zip(d["run"], d["key"])):
        s = d[(d["run"] == run) & (d["key"] == key)].sort_values("distance")
        line = med[f"median|{run}|{key}"]
        np.testing.assert_array_equal(line.get_xdata(), s["distance"].to_numpy(float))
        np.testing.assert_array_equal(line.get_ydata(), s["q50"].to_numpy(float))  # -inf kept
        r = dec[(dec["run"] == run) & (dec["key"] == key)].iloc[0]
        fx, fy = fits[f"fit|{run}|{key}"].get_data()
        slope = np.diff(fy) / np.diff(fx)
        np.testing.assert_allclose(slope, r["decay_rate"])
        b = fit_intercept(s["distance"], s["q50"], r["decay_rate"])
        np.testing.assert_allclose(fy[0], b + r["decay_rate"] * fx[0])
        if r["horizon_censored"]:
            assert f"horizon|{run}|{key}" not in hz
        else:
            np.testing.assert_allclose(hz[f"horizon|{run}|{key}"].get_xdata(), [r["horizon"]] * 2)
        zero = s["frac_zero"].to_numpy() > 0
        if zero.any():
            np.testing.assert_array_equal(under[f"underflow|{run}|{key}"].get_offsets()[:, 0],
                                          s["distance"].to_numpy(float)[zero])
        else:
            assert f"underflow|{run}|{key}" not in under
    # the vanishing run really underflows in the synthetic data, and the plot says so
    assert "underflow|rnn_tanh|rnn/l0/d0/h" in under
    texts = [t.get_text() for ax in fig.get_axes() if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert any("×0.2 per step" in t and "horizon at 4.29 (falls 1,000×)" in t and "underflow" in t for t in texts)
    assert any("horizon > 79 steps" in t for t in texts)
    # a reference line at the float32 limit, since the data reach it
    ref = [ln for ax in fig.get_axes() for ln in ax.get_lines()
           if np.allclose(ln.get_ydata(), F32_LOG10_MIN) and len(set(ln.get_ydata())) == 1]
    assert ref


def test_distance_without_decay_marks_nothing_extra(runset):
    fig = fig_distance(runset.table("distance"))
    assert not artists(fig, "fit|") and not artists(fig, "horizon|")
    assert artists(fig, "median|")


def test_distance_marks_nonfinite(runset):
    d = runset.table("distance").copy()
    d["frac_nonfinite"] = 0.0
    d.loc[(d["run"] == "irnn") & (d["distance"] == 3), "frac_nonfinite"] = 0.5
    fig = fig_distance(d, runset.table("decay"))
    pts = artists(fig, "nonfinite|")
    assert list(pts) == ["nonfinite|irnn|rnn/l0/d0/h"]
    np.testing.assert_array_equal(pts["nonfinite|irnn|rnn/l0/d0/h"].get_offsets()[:, 0], [3.0])


# ---------------------------------------------------------------- spectra

def test_spectra_histogram_and_summary_lines(runset):
    sp, ss = runset.table("spectra"), runset.table("spectra_summary")
    sp = pd.concat([sp, sp.iloc[:1].assign(sigma=0.0)], ignore_index=True)  # one exact zero
    fig = fig_spectra(sp, ss)
    assert_readable(fig)
    hists = artists(fig, "hist|")
    assert len(hists) == len(set(zip(sp["run"], sp["key"])))
    for gid, line in hists.items():
        _, run, key = gid.split("|")
        v = sp[(sp["run"] == run) & (sp["key"] == key)]["sigma"].to_numpy()
        v = v[v > 0]
        x, y = line.get_data()
        edges = np.log10(np.asarray(x, float))
        counts, _ = np.histogram(np.log10(v), bins=edges)
        np.testing.assert_allclose(np.asarray(y, float)[: len(counts)], counts / len(v))
    ref = artists(fig, "sigma=1")["sigma=1"]
    np.testing.assert_array_equal(ref.get_xdata(), [1.0, 1.0])
    for col in ("sigma_max", "spectral_radius"):
        lines = artists(fig, col + "|")
        for (run, key), s in ss.groupby(["run", "key"], sort=False):
            np.testing.assert_array_equal(lines[f"{col}|{run}|{key}"].get_ydata(), s.sort_values("t")[col].to_numpy())
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    first = sp["run"].iloc[0]
    assert any(t.startswith(first) and "1 σ = 0 not shown" in t for t in legend), legend
    assert any("σ = 1" in t for t in legend)


def test_spectra_summary_only_and_missing_radius(runset):
    ss = runset.table("spectra_summary").assign(spectral_radius=np.nan)
    fig = fig_spectra(None, ss)
    assert artists(fig, "sigma_max|") and not artists(fig, "spectral_radius|") and not artists(fig, "hist|")
    assert_readable(fig)


# ---------------------------------------------------------------- products / Lyapunov

def test_products_and_lyapunov_lines(runset):
    pr, ly = runset.table("products"), runset.table("lyapunov")
    fig = fig_products(pr, ly)
    assert_readable(fig)
    lines = artists(fig, "product|")
    assert len(lines) == len(pr.groupby(["run", "key", "rank"]))
    for (run, key, rank), s in pr.groupby(["run", "key", "rank"], sort=False):
        ln = lines[f"product|{run}|{key}|{rank}"]
        s = s.sort_values("distance")
        np.testing.assert_array_equal(ln.get_xdata(), s["distance"].to_numpy(float))
        np.testing.assert_array_equal(ln.get_ydata(), s["log10_sigma"].to_numpy(float))
    ly_lines = artists(fig, "lyapunov|")
    for (run, key), s in ly.groupby(["run", "key"], sort=False):
        ln = ly_lines[f"lyapunov|{run}|{key}"]
        np.testing.assert_array_equal(ln.get_ydata(), s.sort_values("rank")["exponent"].to_numpy())
    zero_refs = [ln for ax in fig.get_axes() for ln in ax.get_lines()
                 if len(ln.get_ydata()) == 2 and np.all(np.asarray(ln.get_ydata()) == 0)]
    assert len(zero_refs) == len(set(zip(pr["run"], pr["key"]))) + 1  # σ = 1 per panel, λ = 0 once


def test_products_one_based_ranks_label(runset):
    pr = runset.table("products").assign(rank=lambda d: d["rank"] + 1)
    fig = fig_products(pr, None)
    cbar = [ax for ax in fig.get_axes() if ax.get_label() == "<colorbar>"][0]
    assert "1 = largest" in cbar.get_ylabel()


# ---------------------------------------------------------------- gates

def test_gate_lines_per_class(runset):
    g = runset.table("gates")
    fig = fig_gates(g)
    assert_readable(fig)
    lines = artists(fig, "gate|")
    assert len(lines) == len(g.groupby(["run", "key", "gate", "token_class"]))
    for (run, key, gate, cls), s in g.groupby(["run", "key", "gate", "token_class"], sort=False):
        np.testing.assert_array_equal(lines[f"gate|{run}|{key}|{gate}|{cls}"].get_ydata(),
                                      s.sort_values("t")["mean"].to_numpy())
    titles = axes_by_title(fig)
    assert "lstm: forget gate f" in titles
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert legend == ["0", "1"]


def test_gate_labels_come_from_the_cell_kind():
    """The gates table names gates, not kinds: the figure labels each run's gates from the kind whose
    gates they are (a GRU's z keeps the state, a minGRU's z takes the candidate)."""
    rows = []
    for run, gates in (("GRU", ("r", "z", "n")), ("minGRU", ("z",)), ("minLSTM", ("f", "i"))):
        for g in gates:
            for t in range(4):
                rows.append({"run": run, "key": "rnn/l0/d0/h", "gate": g, "t": t, "token_class": "all",
                             "mean": 0.5, "q25": 0.4, "q50": 0.5, "q75": 0.6})
    fig = fig_gates(pd.DataFrame(rows))
    titles = " | ".join(t.replace("\n", " ") for t in axes_by_title(fig))  # wrapped to the panel width
    assert "update gate z" in titles and "update gate z (1 = take the candidate)" in titles
    assert "forget gate f′ = f/(f+i)" in titles and "reset gate r" in titles


def test_gates_without_classes_have_one_line_per_gate(runset):
    g = runset.table("gates")
    g = g[g["token_class"] == "0"].assign(token_class="all")
    fig = fig_gates(g)
    assert len(artists(fig, "gate|")) == g["gate"].nunique()


# ---------------------------------------------------------------- clipping

def test_clipping_panels(runset):
    m, ct = runset.table("metrics"), runset.table("clip_timesteps")
    fig = fig_clipping(m, ct, clip_text={r.label: r.clip_text for r in runset.runs},
                       diverged_at={"irnn": 60})
    assert_readable(fig)
    a = {**artists(fig, "loss|"), **artists(fig, "grad_norm"), **artists(fig, "clip_rate|"),
         **artists(fig, "clip_t|"), **artists(fig, "diverged|")}
    for run, s in m.groupby("run", sort=False):
        s = s.sort_values("step")
        np.testing.assert_array_equal(a[f"loss|{run}"].get_ydata(), s["loss"].to_numpy())
        np.testing.assert_array_equal(a[f"grad_norm_before|{run}"].get_ydata(), s["grad_norm_before"].to_numpy())
        np.testing.assert_array_equal(a[f"grad_norm_after|{run}"].get_ydata(), s["grad_norm_after"].to_numpy())
        assert a[f"clip_rate|{run}"].get_width() == pytest.approx(100 * s["clipped"].mean())
    assert a["clip_rate|rnn_tanh+clip"].get_width() > 0 and a["clip_rate|lstm"].get_width() == 0
    for (run, key, step, when), s in ct.groupby(["run", "key", "step", "when"], sort=False):
        np.testing.assert_array_equal(a[f"clip_t|{run}|{key}|{step}|{when}"].get_ydata(),
                                      s.sort_values("t")["log10_norm"].to_numpy())
        assert a[f"clip_t|{run}|{key}|{step}|{when}"].get_linestyle() == ("-" if when == "before" else "--")
    # divergence: a cross at the last finite loss before step 60, and NaN steps ticked
    assert a["diverged|irnn"].get_xdata()[0] == 60
    nan_ticks = artists(fig, "loss_nonfinite|irnn")["loss_nonfinite|irnn"].get_offsets()[:, 0]
    np.testing.assert_array_equal(nan_ticks, np.arange(60, 100))
    # log scale for norms spanning decades
    norm_ax = a["grad_norm_before|lstm"].axes
    assert norm_ax.get_yscale() == "log"
    legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
    assert "rnn_tanh+clip (clip norm ≤ 1)" in legend and "after clipping" in legend


def test_clipping_rejects_bad_when(runset):
    ct = runset.table("clip_timesteps").assign(when="later")
    with pytest.raises(GradflowError, match="'when'"):
        fig_clipping(None, ct)


def test_clip_timesteps_only_is_one_panel(runset):
    fig = fig_clipping(None, runset.table("clip_timesteps"))
    assert len([ax for ax in fig.get_axes() if ax.get_lines()]) == 1


def test_user_backend_and_pyplot_untouched(runset):
    """Figures never select a backend nor register with pyplot."""
    import matplotlib.pyplot as plt

    before = matplotlib.rcParams._get_backend_or_none()
    fig_distance(runset.table("distance"), runset.table("decay"))
    assert matplotlib.rcParams._get_backend_or_none() == before
    assert plt.get_fignums() == []


def _set(df, cols, value):
    df = df.copy()
    for c in cols:
        df[c] = value
    return df


Q = ["q05", "q25", "q50", "q75", "q95"]
DEGENERATE = {
    "heatmap all NaN": lambda t: fig_gradnorm_heatmap(_set(t("gradnorms"), ["q50"], np.nan)),
    "heatmap all zero": lambda t: fig_gradnorm_heatmap(_set(t("gradnorms"), ["q50"], -np.inf)),
    "distance all zero, no fit": lambda t: fig_distance(_set(t("distance"), Q, -np.inf),
                                                        _set(t("decay"), ["decay_rate", "horizon"], np.nan)),
    "distance all NaN": lambda t: fig_distance(_set(t("distance"), Q, np.nan), t("decay")),
    "spectra summary NaN": lambda t: fig_spectra(t("spectra"), _set(t("spectra_summary"),
                                                                     ["sigma_max", "spectral_radius"], np.nan)),
    "products all zero": lambda t: fig_products(_set(t("products"), ["log10_sigma"], -np.inf),
                                                _set(t("lyapunov"), ["exponent", "stderr"], np.nan)),
    "gates all NaN": lambda t: fig_gates(_set(t("gates"), ["mean", "q25", "q50", "q75"], np.nan)),
    "clipping all NaN": lambda t: fig_clipping(_set(t("metrics"), ["loss", "grad_norm_before", "grad_norm_after"],
                                                    np.nan), _set(t("clip_timesteps"), ["log10_norm"], -np.inf)),
}


@pytest.mark.parametrize("case", list(DEGENERATE))
def test_degenerate_values_still_draw(runset, case):
    """All-NaN / all-zero columns (a diverged or fully underflowed run) draw without error or warning
    (layout is left to the build tests: drawing every artist is what can fail here)."""
    import warnings

    from gradflow.report._style import savefig_bytes

    def two_runs(name):  # one run with two keys, one diverged: every code path, half the drawing
        df = runset.table(name)
        return df[df["run"].isin(["lstm", "irnn"])] if name != "gates" else df

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = DEGENERATE[case](two_runs)
        fig.set_layout_engine("none")
        assert savefig_bytes(fig, "png").startswith(b"\x89PNG")


def test_spectra_without_positive_sigma_raises(runset):
    with pytest.raises(GradflowError, match="no positive finite singular value"):
        fig_spectra(_set(runset.table("spectra"), ["sigma"], 0.0), None)
