"""Notebook rendering: Trace / RunSet / VerdictTable ``_repr_html_``, ``gradflow.load`` and
``gradflow.report.figure``, plus a real notebook executed by nbclient in a local kernel."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest
import torch

import gradflow
from gradflow.errors import GradflowError
from gradflow.report import figure
from gradflow.report.notebook import fig_overview, trace_frame
from gradflow.trace import CellInfo, StateKey, Trace

from .synth import make_run, make_study

PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
EVIL = "<img src=x onerror=alert(1)> $\\frac{"


def _pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in PNG.findall(html)]


def _lstm_trace(keep="norms"):
    m = torch.nn.LSTM(3, 5, num_layers=2)
    with gradflow.record(m, keep=keep) as rec:
        out, _ = m(torch.randn(12, 4, 3, generator=torch.Generator().manual_seed(0)))
        out[-1].sum().backward()
    return rec.trace


def test_trace_html_lists_keys_and_shapes_with_a_small_heatmap():
    tr = _lstm_trace()
    h = tr._repr_html_()
    for k in tr.keys():
        assert html_escaped(str(k)) in h
    assert h.count("[12, 4, 5]") == 4 and "lstm (fused)" in h
    (png,) = _pngs(h)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 60_000
    assert "Nothing recorded" in Trace()._repr_html_()


def html_escaped(s: str) -> str:
    import html

    return html.escape(s, quote=True)


def test_trace_overview_values_match_a_direct_computation():
    """Median over valid batch items of log10 ‖δ_t‖; zeros are -inf; a NaN/Inf at a valid step is
    flagged (never dropped); masked steps are ignored."""
    g = torch.randn(6, 5, 3, dtype=torch.float64)
    g[0] = 0.0  # exactly zero everywhere at t = 0
    g[2, 1, 0] = float("nan")
    g[3, 4, 2] = float("inf")
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[4:, 3:] = False  # a packed sequence that ended
    g[~mask] = float("nan")  # what recording writes at missing steps
    tr = Trace(keep="full")
    unit = ("rnn", 0, 0, 0)
    tr.add_unit(unit, CellInfo("rnn_tanh", 2, 3, state_sizes={"h": 3}), mask)
    tr.add_state(StateKey("rnn"), g)
    fr = trace_frame(tr)
    for t in range(6):
        vals = [math.log10(float(torch.linalg.norm(g[t, b]))) if float(torch.linalg.norm(g[t, b])) > 0 else -math.inf
                for b in range(5) if mask[t, b] and math.isfinite(float(torch.linalg.norm(g[t, b])))]
        row = fr[fr["t"] == t].iloc[0]
        want = float(np.median(vals))
        assert row["log10"] == (want if np.isinf(want) else pytest.approx(want)), t
        assert bool(row["nonfinite"]) == (t in (2, 3)), t
    assert np.isneginf(fr.loc[fr["t"] == 0, "log10"]).all()
    assert "timesteps with NaN/Inf" in tr._repr_html_()


def test_runset_html_has_runs_verdicts_and_heatmap(study_dir):
    rs = gradflow.load(study_dir)
    h = rs._repr_html_()
    assert 'class="gradflow-verdicts"' in h and h.count("<table>") == 2
    summary = pd.concat(pd.read_csv(p) for p in sorted(study_dir.glob("runs/*/summary.csv")))
    for verdict, detail in zip(summary["verdict"], summary["detail"]):
        assert html_escaped(verdict) in h and html_escaped(detail) in h
    assert "LSTM and GRU keep gradients" in h  # the study's claim
    assert len(_pngs(h)) == 1
    v = rs.verdicts()
    assert len(v) == len(summary) and list(v.frame.columns) == ["run", "state", "verdict", "detail", "kind"]
    assert "color:#175cd3" in v._repr_html_()  # the vanishing verdict is coloured as in the report
    assert "vanishing" in repr(v)


def test_labels_are_escaped_everywhere(tmp_path):
    d = make_run(tmp_path / "r", "rnn_tanh", tables=("gradnorms", "summary"))
    meta = json.loads((d / "run.json").read_text())
    meta["label"] = EVIL
    (d / "run.json").write_text(json.dumps(meta))
    for f in d.glob("*.csv"):
        df = pd.read_csv(f)
        df["run"] = EVIL
        if "detail" in df:
            df["detail"] = "<script>x</script>"
        df.to_csv(f, index=False)
    h = gradflow.load(d)._repr_html_()
    assert "<img src=x" not in h and "<script>" not in h
    assert "&lt;img src=x onerror=alert(1)&gt;" in h and "&lt;script&gt;" in h
    assert len(_pngs(h)) == 1  # the "$\frac{" label did not break the figure's text


def test_overview_figure_marks_zero_and_nonfinite():
    fr = pd.DataFrame({"row": ["a"] * 3 + ["b $x$"] * 2, "t": [0, 1, 2, 0, 1],
                       "log10": [-np.inf, -3.0, 0.0, np.nan, -1.0], "nonfinite": [False] * 5})
    f = fig_overview(fr)
    ax = f.axes[0]
    layers = [im.get_array() for im in ax.get_images()]
    assert [int(x.count()) for x in layers] == [3, 1, 1]  # finite, grey (exactly 0), red (NaN)
    ticks = ax.get_yticklabels()
    assert [t.get_text() for t in ticks] == ["a", "b $x$"]  # as written, and not typeset as math:
    assert all(t._preprocess_math(t.get_text()) == (t.get_text(), False) for t in ticks)


def test_figure_is_the_one_the_report_embeds(small_run, tmp_path):
    from gradflow.report import load_runs
    from gradflow.report._style import savefig_bytes
    from gradflow.report.html import render_html
    from gradflow.report.sections import plan

    with mpl.rc_context({"svg.hashsalt": "gradflow-test"}):
        rs = load_runs([small_run])
        sections, omitted = plan(rs)
        page = render_html(rs, sections, omitted, "t", tmp_path / "x.html")
        fig = figure("distance", [small_run])
        mine = savefig_bytes(fig, "svg")
    embedded = [base64.b64decode(m) for m in re.findall(r'data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)', page)]
    assert mine in embedded
    assert fig._repr_png_()[:4] == b"\x89PNG"  # shown inline whatever the matplotlib backend
    assert rs.figure("distance").get_size_inches().tolist() == fig.get_size_inches().tolist()


@pytest.mark.parametrize("name, match", [
    ("nope", "unknown figure 'nope'; figures: sweep, gradnorms"),
    ("gates", "figure 'gates': No run has gates.csv"),
    ("sweep", "figure 'sweep': no loaded directory is a sweep"),
])
def test_figure_errors(small_run, name, match):
    with pytest.raises(GradflowError, match=match):
        figure(name, small_run)


def test_load_errors(tmp_path):
    with pytest.raises(GradflowError, match="no such directory"):
        gradflow.load(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(GradflowError, match="not a directory"):
        gradflow.load(tmp_path / "f")
    with pytest.raises(GradflowError, match="neither trace.json, run.json nor study.json"):
        gradflow.load(tmp_path)


def test_load_trace_directory(tmp_path):
    tr = _lstm_trace()
    tr.save(tmp_path / "trace")
    back = gradflow.load(tmp_path / "trace")
    assert isinstance(back, Trace) and back.keys() == tr.keys()


NOTEBOOK = [
    "import gradflow, torch\nrs = gradflow.load({study!r})\nrs",
    "rs.verdicts()",
    "gradflow.report.figure('distance', {study!r})",
    "m = torch.nn.GRU(3, 4)\nwith gradflow.record(m) as rec:\n    out, _ = m(torch.randn(9, 2, 3))\n"
    "    out[-1].sum().backward()\nrec.trace",
]


@pytest.mark.slow
def test_notebook_executes_and_renders(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    study = make_study(tmp_path / "cells")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.format(study=str(study))) for c in NOTEBOOK])
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = [[o for o in c.outputs if o.output_type == "execute_result"] for c in nb.cells]
    assert all(len(o) == 1 for o in outs), [c.outputs for c in nb.cells]
    runs_html, verdicts_html = outs[0][0]["data"]["text/html"], outs[1][0]["data"]["text/html"]
    summary = pd.read_csv(study / "runs/rnn_tanh/summary.csv")
    for h in (runs_html, verdicts_html):
        assert 'class="gradflow-verdicts"' in h and summary["verdict"][0] in h and summary["detail"][0] in h
    assert base64.b64decode(outs[2][0]["data"]["image/png"])[:4] == b"\x89PNG"
    trace_html = outs[3][0]["data"]["text/html"]
    assert "gradflow Trace" in trace_html and "[9, 2, 4]" in trace_html and len(_pngs(trace_html)) == 1
