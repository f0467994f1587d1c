"""Verdict wording on edge cases: tiny growth is not 'exploding'; no finite fit says so."""

from __future__ import annotations

import math

import pandas as pd

from gradflow.analysis import verdicts


def _decay(rate, lo, hi, horizon=math.nan):
    return pd.DataFrame([{"key": "k", "decay_rate": rate, "ci_low": lo, "ci_high": hi, "horizon": horizon,
                          "horizon_censored": True, "fraction": 1e-3, "underflow": False,
                          "horizon_extrapolated": math.nan, "underflow_distance": math.nan}])


def _dist(span):
    return pd.DataFrame({"key": "k", "distance": range(span + 1)})


def test_growth_under_one_decade_is_not_exploding():
    v = verdicts(_decay(0.00127, 0.0002, 0.0023), distance=_dist(99))
    assert not v["verdict"].iloc[0].startswith("exploding")
    v = verdicts(_decay(0.154, 0.151, 0.157), distance=_dist(29))
    assert v["verdict"].iloc[0].startswith("exploding: gradient grows")


def test_nan_fit_is_described_not_printed_as_nan():
    v = verdicts(_decay(math.nan, math.nan, math.nan), distance=_dist(29))
    assert "nan" not in v["detail"].iloc[0].lower()
    assert "no finite gradient" in v["detail"].iloc[0]
