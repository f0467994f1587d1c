"""Gradient against distance: profile quantiles, decay rate, horizon, underflow and NaN reporting."""

import math

import numpy as np
import pytest
import torch

from gradflow import GradflowError
from gradflow.analysis import DistanceProfile, distance_profile, gradient_matrix
from gradflow.analysis.distance import _quantiles
from gradflow.tables import check_columns

from . import helpers as h


def orthogonal_linear_trace(s, *, T=30, B=4, H=4, direction=0, loss="last", lengths=None):
    g = torch.Generator().manual_seed(7)
    W = s * torch.linalg.qr(torch.randn(H, H, generator=g, dtype=h.DT)).Q
    step = lambda x, st: (st[0] @ W.T + 0.1 * x,)  # noqa: E731
    return h.make_trace("custom", T=T, B=B, F=H, H=H, step_fn=step, direction=direction, loss=loss,
                        lengths=lengths)


@pytest.mark.parametrize("direction,reference", [(0, 1), (1, 1), (0, 0), (1, 0), (0, 3)])
def test_orthogonal_decay_rate_and_horizon(direction, reference):
    """W = s·Q: ||δ at distance d|| = s^d ||δ_0||, so the rate is log10 s per step and the horizon is
    the first d with s^(d - r) <= 1e-3, r the reference distance (s = 0.6: 0.6^13 = 1.3e-3,
    0.6^14 = 7.8e-4, so d = r + 14)."""
    tr, key, _ = orthogonal_linear_trace(0.6, direction=direction)
    prof = distance_profile(tr, key, reference=reference)
    dec = prof.decay.iloc[0]
    assert dec.decay_rate == pytest.approx(math.log10(0.6), abs=1e-10)
    assert dec.ci_low <= dec.decay_rate <= dec.ci_high and dec.ci_high - dec.ci_low < 1e-8
    assert dec.horizon == reference + 14 and not dec.horizon_censored and not dec.underflow
    assert dec.reference == reference and dec.n_silent == 0
    t = prof.table
    assert list(t["distance"]) == list(range(30)) and (t["n"] == 4).all()
    assert np.allclose(np.diff(t["q50"]), math.log10(0.6), atol=1e-10)
    check_columns("distance", [*t.columns, "run"])
    check_columns("decay", [*prof.decay.columns, "run"])


def test_censored_horizon_is_extrapolated_and_flagged():
    tr, key, _ = orthogonal_linear_trace(0.9, T=20)
    dec = distance_profile(tr, key).decay.iloc[0]
    assert dec.horizon_censored and math.isnan(dec.horizon)
    assert dec.horizon_extrapolated == pytest.approx(1 - 3 / math.log10(0.9), rel=1e-8)  # from distance 1


def test_no_extrapolation_inside_the_data():
    """A profile that steps down 2.9 decades halfway never reaches 1000× below distance 1, but its
    straight-line fit predicts the threshold inside the data: that is no horizon to report."""
    D = 40
    curve = np.r_[np.zeros(20), np.full(D - 20, -2.9)]
    lg = torch.tensor(np.stack([curve, curve + 0.01], 1), dtype=h.DT)  # direction 1: distance = t
    dec = distance_profile(lg, "x", direction=1).decay.iloc[0]
    d = np.arange(1, D)
    assert 1 - 3 / np.polyfit(d, curve[1:], 1)[0] < D - 1  # the fit alone would say "inside the data"
    assert dec.horizon_censored and math.isnan(dec.horizon) and math.isnan(dec.horizon_extrapolated)
    # a rate whose 95% CI spans 0 predicts no fall at all
    d = np.arange(20.0)
    flat = torch.tensor(np.stack([sl * d for sl in (0.01, -0.02, -0.005, 0.002)], 1), dtype=h.DT)
    dec = distance_profile(flat, "x", direction=1).decay.iloc[0]
    assert dec.decay_rate < 0 < dec.ci_high and math.isnan(dec.horizon_extrapolated)


def test_silent_sequences_and_leading_zeros_are_not_underflow():
    """Sequence 0 has no gradient at all (saturated loss): counted, left out of the quantiles and the
    fit. Sequence 1 is 0 only at distance 0 (an LSTM's c when the loss reads h): not underflow.
    Sequence 2 underflows from distance 4."""
    T = 8
    d = np.arange(T, dtype=float)
    cols = [np.full(T, -np.inf), np.r_[-np.inf, -0.5 * d[1:]], np.r_[-0.5 * d[:4], np.full(T - 4, -np.inf)]]
    lg = torch.tensor(np.stack(cols, 1), dtype=h.DT)
    prof = distance_profile(lg, "x", direction=1)
    dec, t = prof.decay.iloc[0], prof.table.set_index("distance")
    assert dec.n_silent == 1 and dec.n_sequences == 2
    assert dec.underflow and dec.underflow_distance == 4
    assert dec.decay_rate == pytest.approx(-0.5)
    assert (t["n"] == 3).all()
    assert t.loc[1, "frac_zero"] == pytest.approx(1 / 3) and t.loc[0, "frac_zero"] == pytest.approx(2 / 3)
    assert t.loc[2, "q05"] == pytest.approx(-1.0)  # the silent sequence is left out
    only_leading = distance_profile(lg[:, 1:2], "x", direction=1).decay.iloc[0]
    assert not only_leading.underflow and only_leading.n_silent == 0


def test_fraction_and_fit_range():
    tr, key, _ = orthogonal_linear_trace(0.6)
    dec = distance_profile(tr, key, fraction=0.1, fit_range=(5, 12)).decay.iloc[0]
    assert dec.horizon == 6 and dec.fraction == 0.1  # 0.6^4 = 0.13, 0.6^5 = 0.078, from distance 1
    assert dec.decay_rate == pytest.approx(math.log10(0.6), abs=1e-10)


def test_float32_underflow_is_reported_and_recovered_in_log_space():
    tr, key, exact = h.float32_linear_trace(s=0.01, T=30)
    rec = distance_profile(tr, key)
    t, dec = rec.table, rec.decay.iloc[0]
    far = t["distance"] >= 25
    assert (t.loc[far, "frac_zero"] == 1).all() and (t.loc[~far & (t.distance < 20), "frac_zero"] == 0).all()
    assert np.isneginf(t.loc[far, "q50"]).all()
    assert dec.underflow and dec.underflow_distance <= 25
    assert dec.decay_rate == pytest.approx(-2, abs=1e-2)  # fitted on what float32 held (denormals: few bits)
    logspace = distance_profile(tr, key, source="jacobians")
    t2, dec2 = logspace.table, logspace.decay.iloc[0]
    assert np.isfinite(t2["q50"]).all() and (t2.loc[far, "frac_zero"] == 1).all()  # zeros still reported
    assert np.allclose(t2["q50"].to_numpy(), np.median(exact.numpy()[::-1], axis=1), atol=1e-4)
    assert dec2.underflow and dec2.decay_rate == pytest.approx(-2, abs=1e-5) and dec2.horizon == 3


def test_nan_gradients_are_located_not_dropped():
    tr, key, _ = orthogonal_linear_trace(0.6, T=10, B=3)
    rec = tr.state_record(key)
    rec["norm"] = rec["norm"].clone()
    rec["norm"][4, 1] = float("nan")
    rec["norm"][2, 0] = float("inf")
    tr.add_state(key, **rec)  # the public builder replaces the key's data
    prof = distance_profile(tr, key)
    nf = prof.nonfinite
    assert sorted(zip(nf["t"], nf["b"])) == [(2, 0), (4, 1)]
    assert set(nf["distance"]) == {7, 5}
    row = prof.table.set_index("distance")
    assert row.loc[5, "n"] == 3 and row.loc[5, "frac_nonfinite"] == pytest.approx(1 / 3)
    assert np.isfinite(row.loc[5, "q50"])


def test_quantiles_with_zero_gradients():
    rows = np.array([[-np.inf, -np.inf, -np.inf, 1.0, 2.0], [1.0, 2.0, 3.0, np.nan, np.nan], [np.nan] * 5])
    q = _quantiles(rows)
    assert np.isneginf(q[0, :3]).all() and q[0, 3] == 1.0 and q[0, 4] == pytest.approx(1.8)
    assert np.allclose(q[1], [1.1, 1.5, 2.0, 2.5, 2.9]) and np.isnan(q[2]).all()


def test_array_input_with_direction_and_mask():
    T, B = 6, 2
    lg = torch.tensor([[-0.5 * t for _ in range(B)] for t in range(T)], dtype=h.DT)  # direction 1: d = t
    mask = torch.ones(T, B, dtype=torch.bool)
    mask[4:, 1] = False
    prof = distance_profile(lg, "x", direction=1, mask=mask)
    assert list(prof.table["n"]) == [2, 2, 2, 2, 1, 1]
    assert prof.decay.iloc[0].decay_rate == pytest.approx(-0.5)


def test_gradient_matrix_profile_per_step_losses():
    tr, key, _ = orthogonal_linear_trace(0.6, T=20, B=2, loss="all")
    G = gradient_matrix(tr, key)
    prof = distance_profile(G)
    dec = prof.decay.iloc[0]
    assert dec.decay_rate == pytest.approx(math.log10(0.6), abs=1e-8)
    assert dec.horizon == 15
    assert list(prof.table["n"])[:3] == [40, 38, 36]  # (T - d) sources × B


def test_bad_configuration():
    for kw, word in [({"fraction": 2}, "fraction"), ({"source": "disk"}, "source"), ({"direct": "x"}, "direct"),
                     ({"fit_range": (5, 2)}, "fit_range"), ({"reference": -1}, "reference"),
                     ({"reference": 1.5}, "reference")]:
        with pytest.raises(GradflowError, match=word):
            DistanceProfile(**kw)
    with pytest.raises(GradflowError, match=r"\[T, B\]"):
        distance_profile(np.zeros(3))
    with pytest.raises(GradflowError, match="list"):
        distance_profile([1, 2])
