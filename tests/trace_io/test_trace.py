"""Trace save/load round trips (no pickle), tidy frames, key parsing and errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import gradflow
from gradflow import _io
from gradflow.errors import GradflowError, TraceError
from gradflow.trace import StateKey, Trace


def recorded(keep):
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, bidirectional=True, proj_size=2).double()
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (5, 3, 4)]
    with gradflow.record(m, keep=keep) as rec:
        out, _ = m(pack_sequence(seqs, enforce_sorted=False))
        out.data.pow(2).sum().backward()
    return rec.trace


@pytest.mark.parametrize("keep", ["norms", "full", "states"])
def test_save_load_round_trip(tmp_path, keep):
    tr = recorded(keep)
    tr.save(tmp_path / "t")
    back = Trace.load(tmp_path / "t")
    assert back.keys() == tr.keys() and back.keep == keep
    for k in tr.keys():
        torch.testing.assert_close(back.norm(k), tr.norm(k), equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(back.mask(k), tr.mask(k))
        assert back.cell(k) == tr.cell(k)
        if keep != "norms":
            torch.testing.assert_close(back.grad(k), tr.grad(k), equal_nan=True, rtol=0, atol=0)
        if keep == "states":
            for f in ("states", "prev_states", "inputs"):
                torch.testing.assert_close(getattr(back, f)(k), getattr(tr, f)(k), rtol=0, atol=0)
            assert back.params(k).keys() == tr.params(k).keys()
    # norms.csv is a tidy table pandas reads directly; values round-trip exactly with the options of
    # _io.exact_float_options (pandas 2's default parser may be 1 ulp off; pandas 3's is exact)
    df = pd.read_csv(tmp_path / "t" / "norms.csv", **_io.exact_float_options())
    assert list(df.columns) == ["module", "layer", "direction", "state", "call", "t", "b", "valid", "norm", "log10_norm"]
    k = tr.keys()[0]
    sub = df[(df.direction == k.direction) & (df.state == k.state) & (df.layer == 0)]
    np.testing.assert_array_equal(sub["norm"].to_numpy(), tr.norm(k).numpy().ravel())
    # packed: b=1 has length 3, so t=3,4 are missing (NaN, invalid), never zero
    assert not sub[(sub.b == 1) & (sub.t >= 3)]["valid"].any()
    assert sub[(sub.b == 1) & (sub.t >= 3)]["norm"].isna().all()
    # arrays load without pickle
    with np.load(tmp_path / "t" / "arrays.npz", allow_pickle=False) as z:
        assert all(z[f].dtype != object for f in z.files)


def test_load_errors(tmp_path):
    with pytest.raises(TraceError, match="not a trace directory"):
        Trace.load(tmp_path / "missing")
    d = tmp_path / "bad"
    d.mkdir()
    (d / "trace.json").write_text("{not json")
    with pytest.raises(GradflowError, match="trace.json: not valid JSON"):
        Trace.load(d)
    (d / "trace.json").write_text(json.dumps({"kind": "trace", "schema_version": 99}))
    with pytest.raises(GradflowError, match="schema_version 99 is not supported"):
        Trace.load(d)
    (d / "trace.json").write_text(json.dumps({"kind": "run", "schema_version": 1}))
    with pytest.raises(GradflowError, match="not a gradflow trace file"):
        Trace.load(d)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    tr = recorded("full")
    import gradflow._io as io

    def boom(fh, **arrays):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(GradflowError, match="cannot write .*arrays.npz: No space left on device"):
        tr.save(tmp_path / "t")
    assert list((tmp_path / "t").iterdir()) == []


def test_key_parse_and_errors():
    k = StateKey("enc.rnn", 1, 1, "c", 2)
    assert StateKey.parse(str(k)) == k
    assert StateKey.parse("<root>/l0/d0/h") == StateKey("")
    with pytest.raises(TraceError, match="cannot parse state key 'rnn'"):
        StateKey.parse("rnn")
    tr = recorded("norms")
    with pytest.raises(TraceError, match="no state x/l0/d0/h in this trace"):
        tr.norm("x/l0/d0/h")
    with pytest.raises(TraceError, match="keep='states'"):
        tr.states(tr.keys()[0])


def test_to_frame_and_log_norm():
    tr = recorded("norms")
    df = tr.to_frame()
    assert len(df) == sum(np.prod(tr.shape(k)) for k in tr.keys())
    k = tr.keys()[0]
    np.testing.assert_allclose(tr.log10_norm(k).numpy(), np.log10(tr.norm(k).numpy()))


def test_norms_of_float32_gradients_are_right_at_any_magnitude():
    """float32 rows are summed in float32 only where no square can underflow or overflow; the
    others (tiny, huge, zero, NaN, Inf) are summed in float64."""
    from gradflow.trace import _norms

    g = torch.randn(6, 3, 40)
    g[0, 0] *= 1e-30
    g[1, 1] *= 1e-18
    g[2, 2] *= 1e25
    g[3, 0] = 0
    g[4, 1, 7] = float("nan")
    g[5, 2, 0] = float("inf")
    n = _norms(g)
    assert n.dtype == torch.float64
    ref = torch.linalg.vector_norm(g.double(), dim=-1)
    torch.testing.assert_close(n, ref, rtol=1e-6, atol=0, equal_nan=True)
    assert n[0, 0] > 0 and n[3, 0] == 0 and torch.isnan(n[4, 1]) and torch.isinf(n[5, 2])


def test_read_csv_round_trips_float64_exactly_without_warnings(tmp_path):
    # every decade of float64, subnormals, signed zero and the non-finite values, as written by _io
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20000) * 10.0 ** rng.integers(-320, 308, 20000)
    x[:5] = [0.0, -0.0, 5e-324, np.inf, -np.inf]
    path = tmp_path / "x.csv"
    _io.write_csv(path, pd.DataFrame({"x": x}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pandas 3 deprecates float_precision: no warning on a plain read
        back = _io.read_csv(path)["x"].to_numpy()
    np.testing.assert_array_equal(back, x)
    assert np.signbit(back[1])
