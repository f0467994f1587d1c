"""Issue 12 item 8: labels are data. A run label, a state key's module name or a token class holding
``$…$`` (valid or broken mathtext) is drawn literally in every figure, the PDF text and the HTML page;
only gradflow's own axis labels (σ, ρ, λ, ∂s/∂s) are typeset as math."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from matplotlib.text import Text

from gradflow.report import build_report, figure, load_runs
from gradflow.report.build import FIGURES

from .synth import make_study

# run label -> module name used in its state keys (each a mathtext trap: broken, valid, escaped)
LABELS = {"rnn_tanh": ("tanh$\\frac{x$", "enc$^$"), "lstm": ("$x$", "m$a$b"), "irnn": ("cost\\$5$", "$$")}
CLASSES = ["$\\bogus$", "plain"]


def _relabel(study):
    doc = json.loads((study / "study.json").read_text())
    for rel in doc["runs"]:
        d = study / rel
        meta = json.loads((d / "run.json").read_text())
        old = meta["label"]
        new, mod = LABELS.get(old, (old, None))
        meta["label"] = new
        meta["task"]["class_names"] = CLASSES
        (d / "run.json").write_text(json.dumps(meta))
        for f in d.glob("*.csv"):
            df = pd.read_csv(f, keep_default_na=False, dtype=str)
            df["run"] = new
            if mod is not None:
                for col in ("key",):
                    if col in df:
                        df[col] = df[col].str.replace("rnn/", f"{mod}/", regex=False)
                if "module" in df:
                    df["module"] = mod
            df.to_csv(f, index=False)
    return study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return _relabel(make_study(tmp_path_factory.mktemp("labels") / "cells",
                               labels=("rnn_tanh", "lstm", "irnn", "rnn_tanh+clip")))


def _texts(fig):
    return [t for t in fig.findobj(Text) if t.get_text()]


@pytest.mark.parametrize("name", [n for n in FIGURES if n != "sweep"])
def test_figures_draw_labels_literally(study, name):
    fig = figure(name, study)
    fig.canvas.draw()  # would raise matplotlib's ParseException on a label parsed as mathtext
    texts = _texts(fig)
    data = [lab for lab, _ in LABELS.values()] + [m for _, m in LABELS.values()] + CLASSES
    shown = [t for t in texts if any(s in t.get_text().replace("\n", " ") for s in data)]
    assert shown, f"{name}: no label drawn"
    for t in shown:
        s, ismath = t._preprocess_math(t.get_text())
        assert ismath is False and s == t.get_text(), (name, t.get_text())


def test_own_axis_labels_are_still_math(study):
    fig = figure("products", study)
    fig.canvas.draw()
    maths = [t for t in _texts(fig) if "\\lambda_i" in t.get_text() or "\\sigma_i" in t.get_text()]
    assert maths and all(t._preprocess_math(t.get_text())[1] is True for t in maths)


def test_html_and_pdf_show_dollar_labels_as_written(tmp_path):
    import subprocess

    small = _relabel(make_study(tmp_path / "small", labels=("rnn_tanh", "lstm", "irnn"),
                                tables=("distance", "decay", "summary")))
    out = build_report([small], html=tmp_path / "r.html", pdf=tmp_path / "r.pdf")
    page = out["html"].read_text(encoding="utf-8")
    txt = subprocess.run(["pdftotext", "-layout", str(out["pdf"]), "-"], capture_output=True, text=True,
                         check=True).stdout
    for lab, _ in LABELS.values():
        assert lab in page, lab
        assert lab in txt, lab
