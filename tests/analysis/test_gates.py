"""Gate statistics per timestep and token class, against gate values computed in the test."""

import numpy as np
import pytest
import torch

from gradflow import GradflowError
from gradflow.analysis import gate_statistics, gate_values
from gradflow.tables import check_columns

from . import helpers as h


def explicit_gates(kind, p, x, h_prev):
    gi = x @ p["weight_ih"].T + p.get("bias_ih", 0.0)
    gh = h_prev @ p["weight_hh"].T + p.get("bias_hh", 0.0)
    H = p["weight_hh"].shape[0] // (4 if kind == "lstm" else 3)
    if kind == "lstm":
        a = gi + gh
        return {"i": a[..., :H].sigmoid(), "f": a[..., H:2 * H].sigmoid(), "g": a[..., 2 * H:3 * H].tanh(),
                "o": a[..., 3 * H:].sigmoid()}
    r = (gi[..., :H] + gh[..., :H]).sigmoid()
    z = (gi[..., H:2 * H] + gh[..., H:2 * H]).sigmoid()
    return {"r": r, "z": z, "n": (gi[..., 2 * H:] + r * gh[..., 2 * H:]).tanh()}


@pytest.mark.parametrize("kind,opts", [("lstm", {"proj": 2}), ("gru", {"bias": False})])
def test_gate_values_and_statistics(kind, opts):
    tr, key, ref = h.make_trace(kind, T=6, B=4, H=3, lengths=[6, 6, 3, 5], **opts)
    want = explicit_gates(kind, ref["p"], ref["x"], ref["prevs"][0])
    got = gate_values(ref["cell"], ref["p"], ref["x"], ref["prevs"])
    assert set(got) == set(want)
    for g in want:
        assert torch.allclose(got[g], want[g], atol=1e-12)
    df = gate_statistics(tr, key)
    check_columns("gates", [*df.columns, "run"])
    assert set(df["gate"]) == set(want) and set(df["token_class"]) == {"all"}
    gate = "f" if kind == "lstm" else "z"
    row = df[(df.gate == gate) & (df.t == 4)].iloc[0]
    vals = want[gate][4][ref["mask"][4]].numpy().ravel()  # b = 2 is past its length at t = 4
    assert row["mean"] == pytest.approx(vals.mean()) and row["q50"] == pytest.approx(np.median(vals))
    assert row["q25"] == pytest.approx(np.quantile(vals, 0.25))


def test_token_classes_split_rows():
    tr, key, ref = h.make_trace("lstm", T=5, B=3, H=2)
    classes = np.array([["irrelevant", "signal", "irrelevant"]] * 5)
    classes[0, 0] = "signal"
    df = gate_statistics(tr, key, classes=classes, gates=["i"])
    assert set(df["token_class"]) == {"all", "signal", "irrelevant"}
    i = explicit_gates("lstm", ref["p"], ref["x"], ref["prevs"][0])["i"]
    row = df[(df.t == 0) & (df.token_class == "signal")].iloc[0]
    assert row["mean"] == pytest.approx(i[0, :2].mean().item())
    assert len(df[df.t == 1]) == 3


def test_gate_errors():
    tr, key, _ = h.make_trace("rnn_tanh")
    with pytest.raises(GradflowError, match="no gates"):
        gate_statistics(tr, key)
    tr, key, _ = h.make_trace("gru")
    with pytest.raises(GradflowError, match="unknown gate"):
        gate_statistics(tr, key, gates=["f"])
    with pytest.raises(GradflowError, match=r"\[T, B\]"):
        gate_statistics(tr, key, classes=np.zeros((2, 2)))


@pytest.mark.parametrize("kind", ["mingru", "minlstm"])
def test_minimal_cells_gates(kind):
    """minGRU's z and minLSTM's normalised f′ = f/(f+i), i′ = i/(f+i), from the input only."""
    tr, key, ref = h.make_trace(kind, T=5, B=3, H=3, lengths=[5, 2, 4])
    p, x = ref["p"], ref["x"]
    a = x @ p["weight_ih"].T + p["bias_ih"]
    if kind == "mingru":
        want = {"z": a[..., :3].sigmoid()}
    else:
        f, i = a[..., :3].sigmoid(), a[..., 3:6].sigmoid()
        want = {"f": f / (f + i), "i": i / (f + i)}
    got = gate_values(ref["cell"], p, x, ref["prevs"])
    assert set(got) == set(want)
    for g in want:
        torch.testing.assert_close(got[g], want[g], atol=1e-14, rtol=0)
    df = gate_statistics(tr, key)
    assert list(dict.fromkeys(df["gate"])) == list(want)
    row = df[(df.gate == list(want)[0]) & (df.t == 3)].iloc[0]
    vals = want[list(want)[0]][3][ref["mask"][3]].numpy().ravel()  # b = 1 is past its length at t = 3
    assert row["mean"] == pytest.approx(vals.mean())


@pytest.mark.parametrize("kind", ["indrnn", "lru"])
def test_cells_without_gates(kind):
    tr, key, _ = h.make_trace(kind)
    with pytest.raises(GradflowError, match="no gates"):
        gate_statistics(tr, key)


@pytest.mark.parametrize("n,nan_fraction", [(1, 0.0), (7, 0.3), (64, 0.0), (64, 0.9), (500, 0.5)])
def test_row_statistics_equal_numpys_nan_quantiles(n, nan_fraction):
    """The one-sort quantiles of gate rows equal np.nanmean / np.nanquantile, rows all NaN included."""
    from gradflow.analysis.gates import _stats

    rng = np.random.default_rng(n)
    v = rng.normal(size=(12, n))
    v[rng.random(v.shape) < nan_fraction] = np.nan
    v[3] = np.nan  # a step with no valid entry
    got = _stats(v)
    assert np.isnan(got[3]).all()
    ok = ~np.isnan(v).all(1)
    with np.errstate(all="ignore"):
        want = np.column_stack([np.nanmean(v[ok], 1), np.nanquantile(v[ok], [0.25, 0.5, 0.75], axis=1).T])
    np.testing.assert_allclose(got[ok], want, rtol=1e-13, atol=1e-15)
