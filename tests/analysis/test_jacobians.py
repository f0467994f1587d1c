"""Per-step Jacobians against torch.autograd.functional.jacobian of explicit cell steps (float64)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradflow
from gradflow import GradflowError, TraceError
from gradflow.analysis import cell_jacobians, jacobians, linearize, linearize_trace
from gradflow.trace import Trace

from . import helpers as h

CASES = [  # (kind, options) — every kind and option of the closed forms
    ("rnn_tanh", {}),
    ("rnn_tanh", {"bias": False}),
    ("rnn_relu", {}),
    ("rnn_relu", {"bias": False}),
    ("lstm", {}),
    ("lstm", {"bias": False}),
    ("lstm", {"proj": 2}),
    ("lstm", {"proj": 2, "bias": False}),
    ("gru", {}),
    ("gru", {"bias": False}),
    ("mingru", {}),
    ("mingru", {"bias": False}),
    ("minlstm", {}),
    ("minlstm", {"bias": False}),
    ("indrnn", {}),
    ("indrnn", {"bias": False}),
    ("lru", {}),
]


def _reference(ref):
    J = h.autograd_jacobians(ref["step"], ref["x"], ref["prevs"])
    J[~ref["mask"]] = torch.eye(J.shape[-1], dtype=J.dtype)
    return J


@pytest.mark.parametrize("kind,opts", CASES, ids=[f"{k}-{o}" for k, o in CASES])
@pytest.mark.parametrize("direction", [0, 1])
def test_closed_form_matches_autograd(kind, opts, direction):
    tr, key, ref = h.make_trace(kind, T=5, B=3, H=4, F=3, direction=direction, lengths=[5, 2, 4], **opts)
    J = jacobians(tr, key)
    S = sum(ref["cell"].state_sizes[s] for s in ref["cell"].states)
    assert J.shape == (5, 3, S, S)
    assert torch.allclose(J, _reference(ref), atol=1e-10, rtol=0)


@pytest.mark.parametrize("state", ["h", "c"])
def test_lstm_joint_state_whichever_key(state):
    tr, key, ref = h.make_trace("lstm", proj=2)
    J = jacobians(tr, key.with_state(state))
    assert J.shape[-1] == 2 + 3  # [h (P=2); c (H=3)]
    assert torch.allclose(J, _reference(ref), atol=1e-10, rtol=0)


def test_relu_saturated_units_have_zero_rows():
    tr, key, ref = h.make_trace("rnn_relu", scale=3.0, x_scale=3.0)
    J = jacobians(tr, key)
    dead = ref["states"][0] == 0  # h_t = relu(a) = 0 -> row t of J is 0
    assert dead.any()
    assert (J[dead] == 0).all()


def test_relu_nan_state_gives_nan_rows_not_dead_units():
    """A NaN pre-activation (a diverged run's state) is no evidence of a dead unit: its Jacobian row
    is NaN, so spectra and Lyapunov exponents come out NaN (located) instead of exactly singular."""
    cell = h.info("rnn_relu", 3, 4)
    g = torch.Generator().manual_seed(0)
    params = {n: torch.randn(*shape, generator=g, dtype=h.DT) for n, shape in
              [("weight_ih", (4, 3)), ("weight_hh", (4, 4)), ("bias_ih", (4,)), ("bias_hh", (4,))]}
    x = torch.randn(3, 2, 3, generator=g, dtype=h.DT)
    prev = torch.randn(3, 2, 4, generator=g, dtype=h.DT)
    prev[1, 0, 2] = float("nan")
    J = cell_jacobians(cell, params, x, (prev,))
    assert torch.isnan(J[1, 0]).all() and torch.isfinite(J[[0, 2]]).all() and torch.isfinite(J[1, 1]).all()


def _custom_step(W, U, V):
    """A two-state custom cell: h' = tanh(W h + U x) + 0.5 c·h, c' = sigmoid(V c) * h'."""

    def step(x, s):
        hh, cc = s
        h2 = torch.tanh(hh @ W.T + x @ U.T) + 0.5 * cc * hh
        return (h2, torch.sigmoid(cc @ V.T) * h2)

    return step


def test_custom_cell_uses_torch_func():
    g = torch.Generator().manual_seed(3)
    W, U, V = (torch.randn(3, n, generator=g, dtype=h.DT) * 0.6 for n in (3, 2, 3))
    step = _custom_step(W, U, V)
    tr, key, ref = h.make_trace("custom", F=2, H=3, step_fn=step, custom_states=("h", "c"), lengths=[5, 3, 5])
    J = jacobians(tr, key)
    assert J.shape == (5, 3, 6, 6)
    assert torch.allclose(J, _reference(ref), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind,opts", CASES + [("custom", {})], ids=[f"{k}-{o}" for k, o in CASES + [("custom", {})]])
def test_matvec_and_rmatvec_equal_dense_products(kind, opts):
    if kind == "custom":
        g = torch.Generator().manual_seed(4)
        step = _custom_step(*(torch.randn(3, n, generator=g, dtype=h.DT) for n in (3, 4, 3)))
        tr, key, _ = h.make_trace("custom", step_fn=step, custom_states=("h", "c"), lengths=[5, 1, 3])
    else:
        tr, key, _ = h.make_trace(kind, lengths=[5, 1, 3], **opts)
    lin = linearize_trace(tr, key)
    J = lin.dense()
    T, B, S = lin.shape
    V = torch.randn(T, B, S, 2, dtype=h.DT)
    assert torch.allclose(lin.matvec(V), J @ V, atol=1e-12)
    assert torch.allclose(lin.rmatvec(V), J.mT @ V, atol=1e-12)
    assert torch.allclose(lin.matvec(V[2], 2), J[2] @ V[2], atol=1e-12)
    assert torch.allclose(lin.flip().rmatvec(V[0], 0), J[-1].mT @ V[0], atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["rnn_tanh", "rnn_relu", "lstm", "gru", "mingru", "minlstm", "indrnn", "lru"]),
       T=st.integers(1, 4), B=st.integers(1, 3),
       F=st.integers(1, 4), H=st.integers(1, 5), proj=st.integers(0, 3), bias=st.booleans(), seed=st.integers(0, 99))
def test_cell_jacobians_any_size(kind, T, B, F, H, proj, bias, seed):
    proj = proj if kind == "lstm" and proj < H else 0
    cell = h.info(kind, F, H, bias=bias, proj=proj)
    p = h.make_params(kind, F, H, bias=bias, proj=proj, seed=seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, F, generator=g, dtype=h.DT)
    prev = tuple(torch.randn(T, B, cell.state_sizes[s], generator=g, dtype=h.DT) for s in cell.states)
    J = cell_jacobians(cell, p, x, prev)
    ref = h.autograd_jacobians(lambda xt, s: h.step(kind, p, xt, s), x, prev)
    assert torch.allclose(J, ref, atol=1e-10, rtol=0)


def test_float32_trace_gives_float32_and_dtype_option():
    tr, key, ref = h.make_trace("gru")
    lin = linearize(ref["cell"], {k: v.float() for k, v in ref["p"].items()}, ref["x"].float(),
                    tuple(p.float() for p in ref["prevs"]))
    assert lin.dense().dtype == torch.float32
    assert jacobians(tr, key, dtype=torch.float32).dtype == torch.float32


# ------------------------------------------------------------------ bad input: one-line errors
def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_trace_without_states():
    tr, key, ref = h.make_trace("rnn_tanh")
    norms = Trace(keep="norms")
    norms.add_unit(key.unit, ref["cell"], ref["mask"])
    norms.add_state(key, ref["grads"][0])
    with pytest.raises(TraceError) as e:
        jacobians(norms, key)
    _one_line(e, "keep='states'", str(key))


def test_unknown_key():
    tr, key, _ = h.make_trace("rnn_tanh")
    with pytest.raises(TraceError) as e:
        jacobians(tr, "nope/l0/d0/h")
    _one_line(e, "nope/l0/d0/h")
    with pytest.raises(GradflowError):
        jacobians(tr, 42)


def test_wrong_parameter_shape_names_parameter():
    tr, key, ref = h.make_trace("lstm", proj=2)
    p = dict(ref["p"])
    p["weight_hr"] = p["weight_hr"][:, :2]
    with pytest.raises(GradflowError) as e:
        cell_jacobians(ref["cell"], p, ref["x"], ref["prevs"])
    _one_line(e, "weight_hr", "(2, 2)", "(2, 3)")
    del p["weight_hr"]
    with pytest.raises(GradflowError) as e:
        cell_jacobians(ref["cell"], p, ref["x"], ref["prevs"])
    _one_line(e, "weight_hr", "proj_size=2")


def test_wrong_state_shape_and_kind():
    tr, key, ref = h.make_trace("gru")
    with pytest.raises(GradflowError) as e:
        cell_jacobians(ref["cell"], ref["p"], ref["x"], (ref["prevs"][0][:, :, :2],))
    _one_line(e, "previous state 'h'", "(5, 3, 3)")
    with pytest.raises(GradflowError) as e:
        cell_jacobians(ref["cell"], ref["p"], ref["x"][0], ref["prevs"])
    _one_line(e, "[T, B, F]")


def test_custom_cell_without_step_function(tmp_path):
    step = _custom_step(*(torch.eye(3, dtype=h.DT),) * 3)
    tr, key, _ = h.make_trace("custom", F=3, step_fn=step, custom_states=("h", "c"))
    loaded = Trace.load(tr.save(tmp_path / "t"))
    with pytest.raises(GradflowError) as e:
        jacobians(loaded, key)
    _one_line(e, "custom", "step function")


def test_public_api_reexported():
    for name in gradflow.analysis.__all__:
        assert getattr(gradflow, name) is getattr(gradflow.analysis, name)


@pytest.mark.parametrize("kind", ["rnn_tanh", "rnn_relu", "gru", "lstm", "minlstm", "lru"])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_apply_rows_in_place_matches_dense(kind, transpose, masked):
    """The sweep fast path (rows of J v or Jᵀ u written into ``out``, which may be the input) agrees
    with the dense Jacobians, masked steps being the identity."""
    lengths = [5, 3] if masked else None
    tr, key, _ = h.make_trace(kind, T=5, B=2, lengths=lengths)
    op = linearize_trace(tr, key, dtype=torch.float64)
    J = op.dense()
    S = J.shape[-1]
    R = torch.randn(3, 2, S, dtype=torch.float64)
    for k in range(5):
        want = torch.einsum("nbs,bst->nbt", R, J[k]) if transpose else torch.einsum("nbt,bst->nbs", R, J[k])
        torch.testing.assert_close(op.apply_rows(R, k, transpose), want)
        buf = R.clone()
        op.apply_rows(buf, k, transpose, out=buf)
        torch.testing.assert_close(buf, want)


@pytest.mark.parametrize("kind,opts", [("rnn_tanh", {}), ("rnn_relu", {}), ("gru", {}), ("lstm", {}),
                                       ("lstm", {"proj": 2})])
def test_transposed_products_through_the_row_major_copy_of_w_hh(kind, opts, monkeypatch):
    """For a large W_hh (at least 16 MiB: here every size), Jᵀ u reads a row-major copy of W_hhᵀ:
    rmatvec and the sweeps' apply_rows still equal the dense Jᵀ, masked steps included."""
    from gradflow.analysis import linear

    tr, key, _ = h.make_trace(kind, T=5, B=3, lengths=[5, 2, 4], **opts)
    assert linearize_trace(tr, key).weight_hh_t is None  # small: W_hh itself
    monkeypatch.setattr(linear, "_TRANSPOSED_MIN_BYTES", 0)
    lin = linearize_trace(tr, key, dtype=torch.float64)
    W = lin.weights["weight_hh"]
    assert lin.weight_hh_t.is_contiguous() and torch.equal(lin.weight_hh_t, W.T)
    # re-indexed steps or batch items keep the weights, and share the copy (no 32 MB copy per step)
    for derived in (lin.select(slice(1, 3)), lin.select_batch([0, 2]), lin.flip(), lin._at(2)):
        assert derived.weight_hh_t is lin.weight_hh_t
    assert lin.to(torch.float32).weight_hh_t.dtype == torch.float32  # new weights: a copy of its own
    J = lin.dense()
    T, B, S = lin.shape
    V = torch.randn(T, B, S, 2, dtype=h.DT)
    torch.testing.assert_close(lin.rmatvec(V), J.mT @ V, rtol=0, atol=1e-12)
    R = torch.randn(3, B, S, dtype=torch.float64)
    for k in range(T):
        want = torch.einsum("nbs,bst->nbt", R, J[k])
        torch.testing.assert_close(lin.apply_rows(R, k, True), want, rtol=0, atol=1e-12)
        buf = R.clone()
        lin.apply_rows(buf, k, True, out=buf)
        torch.testing.assert_close(buf, want, rtol=0, atol=1e-12)
