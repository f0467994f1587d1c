"""Tables in the gradflow.tables schemas, and plain-language verdicts."""

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import gradflow
from gradflow.analysis import (AnalysisConfig, LyapunovResult, analyze_trace, lyapunov_table, products_table,
                               spectra_table, verdicts)
from gradflow.tables import check_columns

from . import helpers as h


def test_analyze_produces_every_table_in_schema():
    tr, key, _ = h.make_trace("lstm", T=12, B=3, H=3, lengths=[12, 9, 12])
    out = analyze_trace(tr, AnalysisConfig(warmup=2, keys=[str(key)], max_rank=6))
    assert set(out) == {"distance", "decay", "spectra", "spectra_summary", "products", "lyapunov", "gates", "summary"}
    for name, df in out.items():
        check_columns(name, [*df.columns, "run"])
        assert "run" not in df.columns and len(df)
    spectra = out["spectra"]
    assert len(spectra) == (12 + 9 + 12) * 6  # masked (t, b) left out, S = 6 ranks
    assert spectra["rank"].min() == 1
    assert out["summary"]["verdict"].iloc[0].split(":")[0] in ("vanishing", "exploding", "stable")


def test_spectra_and_products_tables():
    sv = torch.tensor([[[3.0, 1.0]], [[2.0, 0.5]]], dtype=torch.float64)  # T=2, B=1, S=2
    df = spectra_table(sv, "k", max_rank=1)
    assert df[["t", "b", "rank", "sigma"]].values.tolist() == [[0, 0, 1, 3.0], [1, 0, 1, 2.0]]
    ls = torch.log(torch.tensor([[[10.0, 1.0], [1000.0, 0.0]]], dtype=torch.float64))  # D=1, B=2
    p = products_table(ls, "k", [5])
    assert p["log10_sigma"].tolist() == pytest.approx([2.0, 0.0])
    assert p["distance"].tolist() == [5, 5]


def test_lyapunov_table_mean_and_stderr():
    ex = torch.tensor([[0.1, -1.0], [0.3, -1.2]], dtype=torch.float64)
    res = LyapunovResult(ex, torch.zeros(2, 2), torch.zeros(2), ex[None], torch.full((2,), 10.0), 0)
    df = lyapunov_table(res, "k")
    assert df["exponent"].tolist() == pytest.approx([0.2, -1.1])
    assert df["stderr"].tolist() == pytest.approx([0.1, 0.1])


def _decay(**kw):
    row = {"key": "k", "decay_rate": -0.2, "ci_low": -0.21, "ci_high": -0.19, "horizon": 14.0,
           "horizon_censored": False, "fraction": 1e-3, "underflow": False, "horizon_extrapolated": math.nan,
           "underflow_distance": math.nan}
    row.update(kw)
    return pd.DataFrame([row])


DIST = pd.DataFrame({"key": "k", "distance": range(50)})

VERDICTS = [  # (decay overrides, spectra sigma_max, start of the verdict)
    ({}, None, "vanishing: gradient falls 1000× by distance 14"),
    ({"decay_rate": 0.12, "ci_low": 0.1, "ci_high": 0.14, "horizon": math.nan, "horizon_censored": True},
     [1.8, 1.2], "exploding: gradient grows"),
    ({"horizon": math.nan, "horizon_censored": True, "underflow": True, "underflow_distance": 30.0}, None,
     "vanishing: gradient underflows float32 to 0 from distance 30"),
    ({"decay_rate": -0.01, "ci_low": -0.02, "ci_high": 0.0, "horizon": math.nan, "horizon_censored": True,
      "horizon_extrapolated": 300.0}, None, "stable within the sequence"),
    (None, [1.8, 0.9], "exploding: σ_max up to 1.8"),
    (None, [0.93, 0.5], "vanishing: every step contracts, σ_max ≤ 0.93"),
]


@pytest.mark.parametrize("over,smax,start", VERDICTS)
def test_verdicts(over, smax, start):
    dec = None if over is None else _decay(**over)
    ss = None if smax is None else pd.DataFrame({"key": "k", "t": range(len(smax)), "sigma_max": smax,
                                                 "sigma_min": 0.1, "frac_gt1": 0.1, "spectral_radius": 0.5})
    out = verdicts(dec, ss, distance=DIST if dec is not None else None)
    check_columns("summary", [*out.columns, "run"])
    assert out["verdict"].iloc[0].startswith(start), out["verdict"].iloc[0]
    if dec is not None:
        assert "decay rate" in out["detail"].iloc[0]


def test_detail_names_the_reference_and_silent_sequences():
    d = verdicts(_decay(reference=1, n_silent=61), distance=DIST)["detail"].iloc[0]
    assert "horizon measured from the gradient at distance 1" in d
    assert "61 sequence(s) received no gradient at all" in d
    old = verdicts(_decay(), distance=DIST)["detail"].iloc[0]  # a run written before the reference column
    assert "from the gradient at distance 0" in old and "no gradient at all" not in old
    grows = verdicts(_decay(decay_rate=0.12, ci_low=0.1, ci_high=0.14, horizon=math.nan, horizon_censored=True,
                            reference=1), distance=DIST)
    assert grows["verdict"].iloc[0].startswith("exploding") and "horizon measured" not in grows["detail"].iloc[0]


def test_nan_lyapunov_exponent_is_described_not_printed():
    ly = pd.DataFrame({"key": ["k"], "rank": [1], "exponent": [math.nan], "stderr": [math.nan]})
    out = verdicts(None, lyapunov=ly)
    assert "nan" not in out["detail"].iloc[0].lower() and "non-finite" in out["detail"].iloc[0]
    assert out["verdict"].iloc[0] == "no evidence"


def test_nonfinite_verdict_wins():
    nf = pd.DataFrame({"key": ["k"], "t": [3], "b": [1], "distance": [5], "log10_norm": [np.nan]})
    out = verdicts(_decay(), nonfinite=nf)
    assert out["verdict"].iloc[0] == "non-finite: 1 NaN/Inf gradient(s), first at t=3, b=1"
    assert "horizon measured" not in out["detail"].iloc[0]


def test_analysis_imports_neither_recording_nor_plotting():
    root = Path(gradflow.analysis.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            for n in names:
                assert "recording" not in n and not n.startswith(("matplotlib", "seaborn")), (path.name, n)
