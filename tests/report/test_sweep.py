"""Sweep comparison: sweep.csv -> points (means over seeds of the primary key) and the report section."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gradflow.report import build_report, load_runs, plan
from gradflow.report.fig_sweep import fig_sweep, primary_key, primary_rows, sweep_points

from .synth import make_study

RESULT = ["status", "eval_metric", "chance", "solved", "diverged_at", "key", "decay_rate", "ci_low", "ci_high",
          "horizon", "horizon_censored", "error"]


def sweep_frame() -> pd.DataFrame:
    rows = []
    for cell, keys in (("rnn_tanh", ["rnn/l0/d0/h"]), ("lstm", ["rnn/l0/d0/h", "rnn/l0/d0/hc", "rnn/l0/d0/c"])):
        for gain in (0.5, 1.0, 2.0):
            for seed in (0, 1):
                run = f"{cell} gain={gain} seed={seed}"
                for k in keys:
                    bonus = 100.0 if k.endswith("/hc") else 0.0  # only the /hc row may reach the plot
                    hz = 10 * gain + seed + bonus if cell == "rnn_tanh" else 50 + 5 * seed + bonus
                    cens = cell == "lstm" and gain == 2.0 and seed == 1
                    rows.append(dict(run=run, dir=run.replace(" ", "_"), cell=cell, gain=gain, seed=seed,
                                     status="finished", eval_metric=0.3 + 0.1 * gain + 0.05 * seed, chance=0.25,
                                     solved=False, diverged_at=None, key=k, decay_rate=-0.1, ci_low=-0.2,
                                     ci_high=0.0, horizon=np.nan if cens else hz, horizon_censored=cens,
                                     error=None))
    return pd.DataFrame(rows, columns=["run", "dir", "cell", "gain", "seed", *RESULT])


def test_primary_key():
    assert primary_key(["a/h", "a/hc", "a/c"]) == "a/hc"
    assert primary_key(["a/c", "a/h"]) == "a/h"
    assert primary_key([None]) is None


def test_points_are_means_of_primary_rows():
    df = sweep_frame()
    p = primary_rows(df)
    assert len(p) == 12 and set(p.loc[p["cell"] == "lstm", "key"]) == {"rnn/l0/d0/hc"}
    hp = sweep_points(df, "gain", "horizon").set_index(["cell", "x"])
    assert hp.loc[("rnn_tanh", 1.0), "mean"] == pytest.approx(10.5)
    assert (hp.loc[("rnn_tanh", 1.0), "lo"], hp.loc[("rnn_tanh", 1.0), "hi"]) == (10.0, 11.0)
    assert hp.loc[("lstm", 0.5), "mean"] == pytest.approx(152.5)
    # the censored run is out of the mean and counted
    assert hp.loc[("lstm", 2.0), "mean"] == pytest.approx(150.0) and hp.loc[("lstm", 2.0), "censored"] == 1
    mp = sweep_points(df, "gain", "eval_metric").set_index(["cell", "x"])
    assert mp.loc[("lstm", 2.0), "mean"] == pytest.approx(0.525) and mp.loc[("lstm", 2.0), "chance"] == 0.25


def test_figure_plots_the_means():
    df = sweep_frame()
    f = fig_sweep(df, ["cell", "gain", "seed"])
    ax_h, ax_m = f.axes[:2]
    hp = sweep_points(df, "gain", "horizon")
    mp = sweep_points(df, "gain", "eval_metric")
    for ax, pts in ((ax_h, hp), (ax_m, mp)):
        lines = [ln for ln in ax.get_lines() if str(ln.get_gid()).startswith("sweep-mean:")]
        assert [ln.get_gid() for ln in lines] == ["sweep-mean:rnn_tanh", "sweep-mean:lstm"]
        for ln in lines:
            q = pts[(pts["cell"] == ln.get_gid().split(":", 1)[1]) & (pts["n"] > 0)]
            np.testing.assert_allclose(np.asarray(ln.get_ydata(), float), q["mean"].to_numpy(float))
    # chance line and one open censored marker at the top
    assert any(ln.get_linestyle() == "--" and np.allclose(np.asarray(ln.get_ydata(), float), 0.25)
               for ln in ax_m.get_lines())
    opens = [ln for ln in ax_h.get_lines() if ln.get_marker() == "^" and len(ln.get_xdata())]
    assert len(opens) == 1
    assert opens[0].get_markerfacecolor() == "none"
    assert opens[0].get_ydata()[0] >= max(np.nanmax(hp["hi"]), 0)
    assert ax_h.get_yscale() == "log"  # horizons span 5..155: more than a decade


def write_sweep_study(root):
    make_study(root, labels=("rnn_tanh", "lstm"), name="gain_sweep")
    doc = json.loads((root / "study.json").read_text())
    doc["sweep"] = {"axes": ["cell", "gain", "seed"]}
    (root / "study.json").write_text(json.dumps(doc))
    sweep_frame().to_csv(root / "sweep.csv", index=False)
    return root


def test_build_report_has_sweep_section(tmp_path):
    root = write_sweep_study(tmp_path / "sw")
    rs = load_runs([root])
    assert rs.sweep is not None and rs.sweep_axes == ("cell", "gain", "seed")
    sections, _ = plan(rs)
    ids = [s.id for s in sections]
    assert ids.index("sweep") == ids.index("summary") + 1
    sec = sections[ids.index("sweep")]
    assert any("censored" in n for n in sec.notes)
    out = build_report([root], html=tmp_path / "r.html", pdf=tmp_path / "r.pdf")
    page = out["html"].read_text()
    assert 'id="sweep"' in page and "Sweep comparison" in page and "chance level" in page
    assert out["pdf"].read_bytes().startswith(b"%PDF")


def test_no_sweep_section_without_sweep_csv(tmp_path):
    root = make_study(tmp_path / "st", labels=("rnn_tanh",))
    sections, omitted = plan(load_runs([root]))
    assert "sweep" not in [s.id for s in sections] + [o.id for o in omitted]


def test_sweep_without_numeric_axis_is_omitted(tmp_path):
    root = write_sweep_study(tmp_path / "sw")
    sweep_frame().assign(gain=1.0).to_csv(root / "sweep.csv", index=False)
    sections, omitted = plan(load_runs([root]))
    assert "sweep" in [o.id for o in omitted]
