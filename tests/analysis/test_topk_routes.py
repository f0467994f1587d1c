"""The matrix-free routes beyond test_topk's per-kind cases: the k-column Lyapunov run is the leading
columns of the full run (every kind, streamed in chunks), graded and degenerate products, exactly
singular steps, no dense Jacobian formed, argument and device errors.

References: the dense full-frame QR route of product_singular_values (checked against explicit SVDs
and closed forms in test_products), closed forms, the full-frame Lyapunov sweep from the same frame.
"""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gradflow import GradflowError
from gradflow.analysis import (jacobians, linearize_trace, lyapunov_exponents, lyapunov_spectrum,
                               product_singular_values, product_spectrum, smallest_singular_values,
                               top_singular_values, topk)

from . import helpers as h

REL = 1e-6


def _custom_step(H, F, seed=7):
    """A two-state user cell: h' = tanh(W h + U x + V c), c' = 0.6 c + 0.4 tanh(h)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(H, H, generator=g, dtype=h.DT) * 1.2 / H ** 0.5
    U = torch.randn(H, F, generator=g, dtype=h.DT)
    V = torch.randn(H, H, generator=g, dtype=h.DT) * 0.5 / H ** 0.5

    def step(x, s):
        hh, c = s
        return torch.tanh(hh @ W.T + x @ U.T + c @ V.T), 0.6 * c + 0.4 * torch.tanh(hh)

    return step


# (kind, hidden size, extra make_trace options): every registered kind and a user cell; the joint
# state S is well above the frame of k=3 (k + 4 columns) so that the top-k route really is partial
KINDS = [
    ("rnn_tanh", 12, {}),
    ("rnn_relu", 12, {}),
    ("lstm", 6, {}),
    ("lstm", 7, {"proj": 4}),
    ("gru", 12, {}),
    ("mingru", 9, {}),
    ("minlstm", 9, {}),
    ("indrnn", 9, {}),
    ("lru", 6, {}),
    ("custom", 6, {"custom_states": ("h", "c")}),
]
CASES = [(kind, H, opts, direction, masked) for kind, H, opts in KINDS for direction in (0, 1)
         for masked in (False, True)]
IDS = [f"{c[0]}{'-proj' if c[2].get('proj') else ''}-d{c[3]}{'-masked' if c[4] else ''}" for c in CASES]


def _trace(kind, H, opts, direction, masked, T, B=3, seed=3):
    opts = dict(opts)
    if kind == "custom":
        opts["step_fn"] = _custom_step(H, 4)
    lengths = [T, T - 3, max(1, T // 3)][:B] if masked else None
    return h.make_trace(kind, T=T, B=B, H=H, F=4, scale=1.5, direction=direction, lengths=lengths, seed=seed, **opts)


def _assert_log_close(got, want, rel=REL):
    """ln σ agree to ``rel`` relative in σ (|Δ ln σ| ≤ rel), -inf (exactly singular) at the same places."""
    fin = torch.isfinite(want)
    assert torch.equal(fin, torch.isfinite(got))
    assert float((got - want)[fin].abs().max()) <= rel


def _assert_sigma_close(got, want, sigma1, rel=REL):
    """σ agree to ``rel`` relative, or to 1e-13·σ_1 for numerically zero ones (dead units)."""
    tol = rel * want + 1e-13 * sigma1
    assert bool(((got - want).abs() <= tol).all()), float(((got - want).abs() / want.clamp_min(1e-300)).max())


LYAP = [(kind, H, opts, direction, masked) for kind, H, opts in KINDS if kind != "custom"
        for direction in (0, 1) for masked in (False, True)] + [
    ("custom", 5, {"custom_states": ("h", "c")}, 0, False), ("custom", 5, {"custom_states": ("h", "c")}, 1, True)]


def _assert_columns_of(top, full):
    """Every exponent of the k-column run [B, k] is one of the full run's [B, S] (to REL): they are its
    leading k columns. (Sorted, they are its top k once the run is long enough for the finite-time
    estimates of columns k and k+1 not to cross.)"""
    for b in range(top.shape[0]):
        for v in top[b].tolist():
            if math.isinf(v):
                assert bool(torch.isneginf(full[b]).any())
                continue
            assert float((full[b] - v).abs().min()) <= REL * abs(v) + 1e-12, (v, full[b])


@pytest.mark.parametrize("kind,H,opts,direction,masked", LYAP,
                         ids=[f"{c[0]}{'-proj' if c[2].get('proj') else ''}-d{c[3]}{'-masked' if c[4] else ''}"
                              for c in LYAP])
def test_lyapunov_top_k_equal_full_spectrum(kind, H, opts, direction, masked):
    """A k-column run starts from the leading k columns of the full run's random frame (frame='random')
    and follows them exactly: streamed in chunks of 7 steps, on the factored products and on the
    explicit Jacobians alike. Over a long enough run its sorted exponents are the full run's top k."""
    T = 18 if kind == "custom" else 60
    tr, key, _ = _trace(kind, H, opts, direction, masked, T, B=2)
    full = lyapunov_spectrum(tr, key, warmup=T // 3, frame="random")
    top = lyapunov_spectrum(tr, key, warmup=T // 3, k=3, chunk=7)
    _assert_columns_of(top.exponents, full.exponents)
    assert torch.equal(top.steps, full.steps)
    J = jacobians(tr, key)
    J = J.flip(0) if direction == 1 else J
    mask = tr.mask(key).flip(0) if direction == 1 else tr.mask(key)
    if linearize_trace(tr, key).structure == "dense":
        dense = lyapunov_exponents(J, warmup=T // 3, k=3, mask=mask, chunk=11)
        torch.testing.assert_close(dense.exponents, top.exponents, rtol=REL, atol=1e-12)
    else:  # exact per-unit averages: the identity frame of the explicit Jacobians is invariant
        dense = lyapunov_exponents(J, warmup=T // 3, mask=mask, chunk=11)
        torch.testing.assert_close(dense.exponents[:, :3], top.exponents, rtol=REL, atol=1e-12)


@pytest.mark.parametrize("kind", ["rnn_tanh", "gru", "lstm"])
def test_lyapunov_top_k_is_the_top_of_a_converged_full_run(kind):
    H = 6 if kind == "lstm" else 12
    tr, key, _ = h.make_trace(kind, T=400, B=1, H=H, F=4, scale=1.5, seed=3)
    full = lyapunov_spectrum(tr, key, warmup=100, frame="random")
    top = lyapunov_spectrum(tr, key, warmup=100, k=3)
    torch.testing.assert_close(top.exponents, full.exponents[:, :3], rtol=REL, atol=1e-12)


@settings(max_examples=10, deadline=None)
@given(S=st.integers(8, 16), k=st.integers(1, 3), T=st.integers(1, 12), spread=st.floats(0.0, 3.0),
       seed=st.integers(0, 999))
@example(S=8, k=1, T=2, spread=1e-7, seed=0)  # a flat spectrum: passes move the estimate by < tol while 1e-7 off
def test_products_of_random_graded_maps(S, k, T, spread, seed):
    """J_t = Q_t diag(e^{spread·z}) Q'_tᵀ with random orthogonal factors: the products' top k from the
    matrix-free route equal the dense route's, whatever the spread of the spectrum (up to e^±36 per
    step) or the distance."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(2, T, 2, S, S, generator=g, dtype=h.DT)).Q
    z = torch.randn(T, 2, S, generator=g, dtype=h.DT) * spread
    J = (Q[0] * z.exp()[..., None, :]) @ Q[1].mT
    _assert_log_close(product_singular_values(J, k=k), product_singular_values(J)[..., :k], rel=1e-7)


def test_degenerate_and_singular_products():
    """s·(orthogonal): every σ of P_d is s^d (a fully degenerate spectrum); a rank-1 step makes all but
    one σ exactly 0 (-inf) from then on."""
    g = torch.Generator().manual_seed(5)
    Q = torch.linalg.qr(torch.randn(40, 1, 16, 16, generator=g, dtype=h.DT)).Q
    got = product_singular_values(0.5 * Q, k=4, distances=[1, 10, 40])
    want = torch.tensor([1.0, 10.0, 40.0], dtype=h.DT)[:, None, None] * math.log(0.5)
    torch.testing.assert_close(got, want.expand(3, 1, 4), rtol=1e-10, atol=1e-10)
    J = torch.randn(6, 1, 12, 12, generator=g, dtype=h.DT)
    J[3, 0, 1:] = 0  # rank 1 exactly
    got = product_singular_values(J, k=3)
    assert torch.isfinite(got[:3]).all() and torch.isfinite(got[3:, :, 0]).all()
    assert torch.isneginf(got[3:, :, 1:]).all()
    _assert_log_close(got, product_singular_values(J)[..., :3])


def test_matrix_free_products_form_no_square_matrix(monkeypatch):
    """The top-k route never calls the Linearization's dense(); it multiplies frames of k+p columns (the
    frames of several distances stacked into one call)."""
    from gradflow.analysis import Linearization

    tr, key, _ = h.make_trace("lstm", T=6, B=2, H=10)
    widths = []
    real = Linearization.apply_rows

    def spy(self, R, k, transpose, out=None):
        widths.append(R.shape[0])
        return real(self, R, k, transpose, out)

    monkeypatch.setattr(Linearization, "dense", lambda self, chunk=None: pytest.fail("dense() called"))
    monkeypatch.setattr(Linearization, "apply_rows", spy)
    product_spectrum(tr, key, k=2)
    lyapunov_spectrum(tr, key, k=2)
    m = topk.oversampled(2, 20)
    assert widths and m < 20 and all(w <= m or w % m == 0 for w in widths)


def test_lru_and_diagonal_kinds_top_k_are_exact_units():
    tr, key, ref = h.make_trace("lru", T=12, B=2, H=5, F=3)
    want = (-torch.exp(ref["p"]["nu_log"])).repeat(2).sort(descending=True).values
    got = product_spectrum(tr, key, k=4, distances=[1, 12])
    torch.testing.assert_close(got, torch.stack([want[:4], 12 * want[:4]])[:, None].expand(2, 2, 4),
                               atol=1e-12, rtol=0)


def test_bad_arguments_name_the_option():
    J = torch.randn(4, 1, 5, 5, dtype=h.DT)
    with pytest.raises(GradflowError, match="k=6 exceeds"):
        product_singular_values(J, k=6)
    with pytest.raises(GradflowError, match="k=0"):
        smallest_singular_values(J, 0)
    with pytest.raises(GradflowError, match=r"steps must be indices in 0\.\.3"):
        top_singular_values(J, 2, steps=[4])
    with pytest.raises(GradflowError, match="chunk=0"):
        lyapunov_exponents(J, chunk=0)
    with pytest.raises(GradflowError, match="frame='qr'"):
        lyapunov_exponents(J, frame="qr")
    with pytest.raises(GradflowError, match="device='tpu'"):
        product_singular_values(J, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(GradflowError, match="CUDA is not available"):
            top_singular_values(J, 2, device="cuda")


def test_device_cpu_explicit_equals_default():
    tr, key, _ = h.make_trace("gru", T=8, B=2, H=10)
    for fn in (lambda **d: product_spectrum(tr, key, k=2, **d),
               lambda **d: lyapunov_spectrum(tr, key, k=2, **d).exponents,
               lambda **d: top_singular_values(linearize_trace(tr, key), 2, **d),
               lambda **d: smallest_singular_values(linearize_trace(tr, key), 2, **d)):
        a, b = fn(), fn(device="cpu")
        assert a.device.type == "cpu" and torch.equal(a, b)
