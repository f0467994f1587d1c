"""The batched adjoint: G[s, t] against one backward pass per source, δ recursion, log-space norms."""

import pytest
import torch

from gradflow import GradflowError
from gradflow.analysis import (adjoint_log_norms, direct_gradients, gradient_matrix, jacobians, joint_gradient,
                               total_log10_norms)

from . import helpers as h

CASES = [("rnn_tanh", {}, 0), ("gru", {}, 1), ("lstm", {"proj": 2}, 0), ("lstm", {}, 1), ("rnn_relu", {}, 0),
         ("mingru", {}, 1), ("minlstm", {}, 0), ("indrnn", {}, 0), ("lru", {}, 1)]


@pytest.mark.parametrize("kind,opts,direction", CASES, ids=[f"{k}-{o}-d{d}" for k, o, d in CASES])
def test_gradient_matrix_equals_separate_backward_passes(kind, opts, direction):
    lengths = [6, 4, 6]
    tr, key, ref = h.make_trace(kind, T=6, B=3, H=3, direction=direction, lengths=lengths, loss="all", **opts)
    states = ref["cell"].states
    for i, name in enumerate(states):
        G_ref, direct = h.separate_backward_passes(ref, direction=direction, lengths=lengths, state=i)
        for d in (direct, None):  # explicit direct gradients, and derived from the trace
            G = gradient_matrix(tr, key.with_state(name), direct=d)
            ok = torch.isfinite(G_ref) & (G_ref > 0)
            assert torch.equal(torch.isnan(G.log10), torch.isnan(G_ref))
            assert torch.allclose(G.log10[ok], G_ref[ok].log10(), atol=1e-9, rtol=0)
            assert torch.isneginf(G.log10[G_ref == 0]).all()


@pytest.mark.parametrize("kind,opts,direction", CASES, ids=[f"{k}-{o}-d{d}" for k, o, d in CASES])
def test_total_derivative_recursion(kind, opts, direction):
    """δ_t = direct_t + J_next(t)ᵀ δ_next(t) on the recorded trace, direct = w_t for a per-step loss."""
    lengths = [6, 3, 5]
    tr, key, ref = h.make_trace(kind, T=6, B=3, H=3, direction=direction, lengths=lengths, loss="all", **opts)
    _, direct_ref = h.separate_backward_passes(ref, direction=direction, lengths=lengths)
    direct = direct_gradients(tr, key)
    m = ref["mask"]
    assert torch.allclose(direct[m], direct_ref[m], atol=1e-12)
    J = jacobians(tr, key)
    delta = joint_gradient(tr, key)
    nxt = (slice(1, None), slice(None, -1)) if direction == 0 else (slice(None, -1), slice(1, None))
    Jn, dn = J[nxt[0]], torch.nan_to_num(delta[nxt[0]])
    rebuilt = direct[nxt[1]] + (Jn.mT @ dn[..., None])[..., 0]
    assert torch.allclose(rebuilt[m[nxt[1]]], delta[nxt[1]][m[nxt[1]]], atol=1e-12)


@pytest.mark.parametrize("kind,direction", [("lstm", 0), ("gru", 1)])
def test_log_space_norms_equal_recorded_norms(kind, direction):
    tr, key, ref = h.make_trace(kind, T=7, B=2, direction=direction, lengths=[7, 4])
    for k in (key, key.with_state("c")) if kind == "lstm" else (key,):
        got = total_log10_norms(tr, k)
        want = tr.log10_norm(k)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert torch.allclose(got[ok], want[ok], atol=1e-10)
    derived = total_log10_norms(tr, key, direct="derived")
    ok = ~torch.isnan(derived)
    assert torch.allclose(derived[ok], tr.log10_norm(key)[ok], atol=1e-8)


def test_underflow_is_finite_in_log_space():
    tr, key, exact = h.float32_linear_trace()
    recorded = tr.norm(key)
    assert (recorded[:5] == 0).all() and (recorded[-3:] > 0).all()  # float32 underflow to exactly 0
    got = total_log10_norms(tr, key)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, exact, atol=1e-5)  # float32 Jacobians: ~1e-7 relative per step


def test_adjoint_log_norms_tensor_level_and_errors():
    J = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    g = torch.randn(4, 2, 3, dtype=torch.float64)
    out = adjoint_log_norms(J, g)
    assert out.shape == (4, 4, 2) and torch.isnan(out[0, 1]).all() and torch.isfinite(out[3, 0]).all()
    v = J[3].mT @ g[3][..., None]
    v = J[2].mT @ v
    assert torch.allclose(out[3, 1], v[..., 0].norm(dim=-1).log(), atol=1e-12)
    with pytest.raises(GradflowError, match=r"\(4, 2, 3\)"):
        adjoint_log_norms(J, g[:, :, :2])
    tr, key, _ = h.make_trace("gru")
    with pytest.raises(GradflowError, match="direct"):
        total_log10_norms(tr, key, direct="first")


def test_float32_sweep_is_close_and_underflow_free():
    tr, key, _ = h.make_trace("rnn_tanh", T=90, B=2, H=3, loss="all", scale=0.4)
    G64 = gradient_matrix(tr, key)
    G32 = gradient_matrix(tr, key, dtype=torch.float32)
    fin = torch.isfinite(G64.log10)
    assert torch.equal(fin, torch.isfinite(G32.log10))
    assert float(G64.log10[fin].min()) < -45  # below float32's range: kept by the log scales
    assert torch.allclose(G32.log10[fin], G64.log10[fin], atol=1e-4, rtol=0)
    with pytest.raises(GradflowError, match="dtype"):
        gradient_matrix(tr, key, dtype=torch.float16)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
def test_gradient_matrix_default_precision_follows_the_recorded_states(model_dtype):
    import gradflow

    torch.manual_seed(0)
    rnn = torch.nn.GRU(3, 4).to(model_dtype)
    x = torch.randn(12, 2, 3, dtype=model_dtype)
    with gradflow.record(rnn, keep="states") as rec:
        rnn(x)[0].pow(2).sum().backward()
    key = rec.trace.keys()[0]
    default = gradient_matrix(rec.trace, key)
    same = gradient_matrix(rec.trace, key, dtype=model_dtype)
    assert torch.equal(default.log10.isnan(), same.log10.isnan())
    torch.testing.assert_close(default.log10, same.log10, rtol=0, atol=0, equal_nan=True)
    if model_dtype == torch.float32:  # and it is close to the float64 sweep
        G64 = gradient_matrix(rec.trace, key, dtype=torch.float64)
        fin = torch.isfinite(G64.log10)
        assert torch.allclose(default.log10[fin], G64.log10[fin], atol=1e-5, rtol=0)
