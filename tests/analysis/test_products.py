"""Products over distance and Lyapunov spectra: explicit products, closed-form oracles, no underflow."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradflow import GradflowError
from gradflow.analysis import (jacobians, lyapunov_exponents, lyapunov_spectrum, product_singular_values,
                               product_spectrum)

from . import helpers as h


def linear_step(W, U):
    return lambda x, s: (s[0] @ W.T + x @ U.T,)


def linear_trace(W, *, T=40, B=2, direction=0, lengths=None):
    H = W.shape[0]
    U = torch.ones(H, 2, dtype=h.DT) * 0.1
    return h.make_trace("custom", T=T, B=B, F=2, H=H, step_fn=linear_step(W, U), direction=direction,
                        lengths=lengths)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 6), B=st.integers(1, 2), S=st.integers(1, 5), seed=st.integers(0, 999))
def test_products_match_explicit_svd(T, B, S, seed):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, B, S, S, generator=g, dtype=h.DT)
    got = product_singular_values(J)
    P = torch.eye(S, dtype=h.DT).expand(B, S, S)
    for d in range(T):
        P = J[d] @ P
        sv = torch.linalg.svdvals(P)
        ok = sv > 1e-8 * sv[..., :1]  # where the explicit product still has relative accuracy
        assert torch.allclose(got[d][ok], sv.log()[ok], atol=1e-7, rtol=0)


def test_products_start_and_distances():
    g = torch.Generator().manual_seed(1)
    J = torch.randn(6, 1, 3, 3, generator=g, dtype=h.DT)
    got = product_singular_values(J, start=2, distances=[1, 3])
    assert torch.allclose(got[0], torch.linalg.svdvals(J[2]).log())
    assert torch.allclose(got[1], torch.linalg.svdvals(J[4] @ J[3] @ J[2]).log())


@pytest.mark.parametrize("direction", [0, 1])
def test_diagonal_linear_rnn_exponents_are_log_abs_d(direction):
    d = torch.tensor([0.9, -1.3, 0.2, 1e-3], dtype=h.DT)
    tr, key, _ = linear_trace(torch.diag(d), direction=direction)
    res = lyapunov_spectrum(tr, key, warmup=3)
    want = d.abs().log().sort(descending=True).values
    assert torch.allclose(res.exponents, want.expand(2, 4), atol=1e-12)
    assert res.exponents.shape == (2, 4) and res.steps.tolist() == [37.0, 37.0]
    assert (res.drift < 1e-12).all() and (res.stderr < 1e-12).all()


def test_orthogonal_times_s_no_underflow_at_any_length():
    """W = s·Q: every exponent is ln s; the products' singular values are all s^d — here down to
    e^-1198 (float64 underflows at e^-745) with nothing lost."""
    g = torch.Generator().manual_seed(2)
    Q = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=h.DT)).Q
    s, T = 0.05, 400
    J = (s * Q).expand(T, 2, 5, 5)
    res = lyapunov_exponents(J, warmup=10)
    assert torch.allclose(res.exponents, torch.full((2, 5), math.log(s), dtype=h.DT), atol=1e-12)
    ls = product_singular_values(J, distances=[1, 17, 400])
    want = torch.tensor([1, 17, 400], dtype=h.DT)[:, None, None] * math.log(s)
    assert torch.isfinite(ls).all()
    assert torch.allclose(ls, want.expand_as(ls), rtol=1e-12, atol=1e-9)


@settings(max_examples=10, deadline=None)
@given(lam=st.lists(st.floats(-4.0, 1.0), min_size=2, max_size=5), seed=st.integers(0, 999))
def test_graded_long_products_keep_every_rank(lam, seed):
    """J_k = Q_k diag(e^λ) Q_{k-1}ᵀ with random orthogonal Q_k: the product over d steps has singular
    values exactly e^{dλ}. Over 60 steps they span up to a factor e^300 (a float64 SVD resolves
    e^36) with arbitrary gaps, near-degenerate ranks included."""
    g = torch.Generator().manual_seed(seed)
    S, T = len(lam), 60
    Q = torch.linalg.qr(torch.randn(T + 1, S, S, generator=g, dtype=h.DT)).Q
    lam = torch.tensor(lam, dtype=h.DT)
    J = (Q[1:] * lam.exp()) @ Q[:-1].mT
    ls = product_singular_values(J[:, None], distances=[1, 25, 60])
    want = torch.tensor([1, 25, 60], dtype=h.DT)[:, None] * lam.sort(descending=True).values
    assert torch.allclose(ls[:, 0], want, rtol=1e-10, atol=1e-10)


def test_graded_refinement_stops_only_when_every_rank_is_resolved(monkeypatch):
    """An LSTM's product over 40 steps (S=96; ln σ from -3 down to -316, many ranks closer than 1 in
    ln σ): the refinement's early stop (decoupled, narrow blocks) gives every rank of the unshifted QR
    iteration run until its diagonal no longer moves (1e-15, up to 5000 steps). The earlier stop at
    60 steps with clusters cut at gaps of the unconverged diagonal was 4e-6 off here."""
    from gradflow.analysis import products

    tr, key, _ = h.make_trace("lstm", T=40, B=2, H=48, F=8, seed=1)
    got = product_spectrum(tr, key, distances=[10, 40])
    log_svd = products._log_svd
    monkeypatch.setattr(products, "_NARROW", -1.0)  # never narrow: stop on the converged diagonal only
    monkeypatch.setattr(products, "_log_svd", lambda ell, N: log_svd(ell, N, max_iter=5000, tol=1e-15))
    want = product_spectrum(tr, key, distances=[10, 40])
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
    fin = torch.isfinite(want)
    assert float(want[fin].min()) < -300
    assert float((got - want)[fin].abs().max()) <= 1e-10


def test_masked_steps_are_identity_and_not_counted():
    d = torch.tensor([0.5, 2.0], dtype=h.DT)
    tr, key, _ = linear_trace(torch.diag(d), T=12, B=2, lengths=[12, 5])
    res = lyapunov_spectrum(tr, key)
    assert res.steps.tolist() == [12.0, 5.0]
    assert torch.allclose(res.exponents, d.log().sort(descending=True).values.expand(2, 2), atol=1e-12)
    ls = product_spectrum(tr, key)
    assert torch.allclose(ls[-1, 1], 5 * d.log().sort(descending=True).values, atol=1e-10)


def test_top_k_exponents_with_random_frame():
    g = torch.Generator().manual_seed(4)
    J = torch.randn(300, 2, 6, 6, generator=g, dtype=h.DT) / math.sqrt(6)
    full = lyapunov_exponents(J, warmup=20)
    top = lyapunov_exponents(J, warmup=20, k=2)
    assert top.exponents.shape == (2, 2)
    assert torch.allclose(top.exponents, full.exponents[:, :2], atol=0.05)
    assert (full.stderr > 0).all() and (full.stderr < 0.1).all()
    assert full.running.shape[1:] == (2, 6) and torch.isfinite(full.drift).all()


def test_tanh_product_bounded_by_weight_power():
    tr, key, ref = h.make_trace("rnn_tanh", T=12, B=2, H=5, scale=2.0)
    smax_w = float(torch.linalg.matrix_norm(ref["p"]["weight_hh"], ord=2))
    ls = product_spectrum(tr, key)  # ||∂h_{d-1}/∂h_{-1}|| for d = 1..T
    d = torch.arange(1, 13, dtype=h.DT)[:, None]
    assert (ls[..., 0] <= d * math.log(smax_w) + 1e-10).all()
    for t0 in (3, 7):  # from a later start: ||∂h_T/∂h_t|| <= σ_max(W)^(T−t)
        ls = product_spectrum(tr, key, start=t0)
        assert (ls[..., 0] <= torch.arange(1, 13 - t0, dtype=h.DT)[:, None] * math.log(smax_w) + 1e-10).all()


def test_direction_one_runs_in_processing_order():
    tr, key, _ = h.make_trace("gru", T=6, B=2, direction=1)
    J = jacobians(tr, key)  # position order
    got = product_spectrum(tr, key, distances=[2])
    want = torch.linalg.svdvals(J[4] @ J[5]).log()  # step 0 = position 5, step 1 = position 4
    assert torch.allclose(got[0], want, atol=1e-10)


def test_bad_arguments():
    J = torch.randn(5, 1, 3, 3, dtype=h.DT)
    with pytest.raises(GradflowError, match="warmup=5"):
        lyapunov_exponents(J, warmup=5)
    with pytest.raises(GradflowError, match="k=4"):
        lyapunov_exponents(J, k=4)
    with pytest.raises(GradflowError, match="distances"):
        product_singular_values(J, distances=[3, 2])
    with pytest.raises(GradflowError, match=r"\[T, B, S, S\]"):
        lyapunov_exponents(torch.randn(5, 3, 3))
    with pytest.raises(GradflowError, match=r"mask must be \[T, B\]"):
        product_singular_values(J, mask=torch.ones(5, 2, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_lyapunov_batch_groups_in_parallel_equal_one_sweep(kind):
    """Batch items are swept in thread groups; the spectrum, its error bars and the running
    estimates equal the single sweep's (masked steps included) up to rounding: each group picks
    its own number of steps per QR."""
    tr, key, _ = h.make_trace(kind, T=40, B=5, lengths=[40, 31, 40, 25, 12], seed=3)
    one = lyapunov_spectrum(tr, key, warmup=5, threads=1)
    par = lyapunov_spectrum(tr, key, warmup=5, threads=3)
    for f in ("exponents", "stderr", "drift", "running", "steps"):
        torch.testing.assert_close(getattr(par, f), getattr(one, f), rtol=1e-8, atol=1e-8,
                                   equal_nan=True, msg=f)
    assert one.running.shape == (8, 5, one.exponents.shape[-1])
    J = torch.randn(30, 4, 3, 3, dtype=torch.float64) * 0.7  # explicit Jacobians too
    torch.testing.assert_close(lyapunov_exponents(J, threads=2).exponents, lyapunov_exponents(J, threads=1).exponents)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_products_batch_groups_in_parallel_equal_one_chain(kind):
    """The full-frame products sweep batch items in thread groups: each item's spectrum at every
    distance equals the single chain's (masked steps included); explicit Jacobians too."""
    tr, key, _ = h.make_trace(kind, T=30, B=5, lengths=[30, 21, 30, 15, 9], seed=3)
    one = product_spectrum(tr, key, distances=[1, 5, 30], threads=1)
    par = product_spectrum(tr, key, distances=[1, 5, 30], threads=3)
    assert torch.equal(torch.isfinite(one), torch.isfinite(par))
    torch.testing.assert_close(par, one, rtol=0, atol=1e-12)
    J = torch.randn(20, 4, 6, 6, dtype=torch.float64) * 0.7
    torch.testing.assert_close(product_singular_values(J, threads=2), product_singular_values(J, threads=1),
                               rtol=0, atol=1e-12)
    with pytest.raises(GradflowError, match="threads"):
        product_singular_values(J, threads=0)
    tr, key, _ = h.make_trace("indrnn", T=6, B=2)  # diagonal: checked before the exact per-unit route
    with pytest.raises(GradflowError, match="threads"):
        product_spectrum(tr, key, threads=0)


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn_tanh"])
@pytest.mark.parametrize("dense_elems", [1 << 21, 40])  # 40: the dense route forms one step at a time
def test_lyapunov_of_a_linearization_equals_that_of_its_dense_jacobians(kind, dense_elems, monkeypatch):
    """The factored (J v) and the dense (J Q with J_t formed, used for GRU full spectra) routes give
    the spectrum of the explicit Jacobians, masked steps included."""
    from gradflow.analysis import linearize_trace, products

    monkeypatch.setattr(products, "_DENSE_ELEMS", dense_elems)
    tr, key, _ = h.make_trace(kind, T=30, B=3, lengths=[30, 22, 9], seed=5)
    op = linearize_trace(tr, key, dtype=torch.float64)
    mask = tr.mask(key)
    got = lyapunov_exponents(op, warmup=2, mask=mask, threads=1)
    ref = lyapunov_exponents(op.dense(), warmup=2, mask=mask, threads=1)
    torch.testing.assert_close(got.exponents, ref.exponents, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.steps, ref.steps)


@pytest.mark.parametrize("direction", [0, 1])
def test_lru_lyapunov_exponents_are_log_abs_lambda(direction):
    """The LRU is linear with constant J = |λ|·rotation per unit: its exponents are ln|λ_j| = −exp(ν_j),
    each twice (Re and Im coordinate), exactly; so are the singular values of its products, d·ln|λ_j|."""
    tr, key, ref = h.make_trace("lru", T=30, B=2, H=4, F=3, direction=direction, lengths=[30, 17])
    want = (-torch.exp(ref["p"]["nu_log"])).repeat(2).sort(descending=True).values
    res = lyapunov_spectrum(tr, key, warmup=3)
    torch.testing.assert_close(res.exponents, want.expand(2, 8), atol=1e-13, rtol=0)
    # warm-up: the first 3 processed steps, which direction 1 takes from item 1's padding
    assert res.steps.tolist() == ([27.0, 14.0] if direction == 0 else [27.0, 17.0])
    assert (res.stderr[0] < 1e-12).all()
    top = lyapunov_spectrum(tr, key, k=3)
    torch.testing.assert_close(top.exponents, want[:3].expand(2, 3), atol=1e-13, rtol=0)
    ls = product_spectrum(tr, key, distances=[1, 5, 17])
    for i, d in enumerate([1, 5, 17]):
        valid = [d, min(d, 17) if direction == 0 else max(0, d - 13)]  # item 1's steps that exist
        torch.testing.assert_close(ls[i], torch.stack([n * want for n in valid]), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["mingru", "minlstm", "indrnn", "lru"])
def test_diagonal_kinds_use_no_qr_and_equal_the_qr_route(kind):
    """A diagonal kind's products and Lyapunov exponents are per-unit sums of ln|d_t| (no QR): they
    equal the QR route on its dense Jacobians, with masked steps, warm-up and a k < S frame."""
    from gradflow.analysis import linearize_trace, products

    tr, key, _ = h.make_trace(kind, T=25, B=3, H=4, lengths=[25, 19, 8], seed=2, scale=1.5)
    op = linearize_trace(tr, key, dtype=torch.float64)
    mask = tr.mask(key)
    assert op.structure != "dense"
    calls = []
    real_qr = products._qr
    products._qr = lambda Z: calls.append(1) or real_qr(Z)
    try:
        got = lyapunov_exponents(op, warmup=2, mask=mask)
        got_k = lyapunov_exponents(op, warmup=2, mask=mask, k=2)
        ps = product_singular_values(op, mask=mask, distances=[1, 4, 25])
    finally:
        products._qr = real_qr
    assert not calls
    J = op.dense()
    ref = lyapunov_exponents(J, warmup=2, mask=mask, threads=1)
    for f in ("exponents", "stderr", "drift", "running", "steps"):
        torch.testing.assert_close(getattr(got, f), getattr(ref, f), rtol=1e-9, atol=1e-9, equal_nan=True, msg=f)
    fin = torch.isfinite(ref.exponents[:, :2])
    torch.testing.assert_close(got_k.exponents[fin], ref.exponents[:, :2][fin], rtol=1e-9, atol=1e-9)
    ref_ps = product_singular_values(J, mask=mask, distances=[1, 4, 25])
    ok = torch.isfinite(ref_ps)
    assert torch.equal(ok, torch.isfinite(ps))
    torch.testing.assert_close(ps[ok], ref_ps[ok], rtol=0, atol=1e-8)


@pytest.mark.parametrize("kind,H", [("lstm", 32), ("rnn_tanh", 128), ("gru", 128)])
def test_householder_form_sweep_equals_per_step_qr(kind, H):
    """Full frames of S ≥ 64 (LSTM) or 128 are kept as Householder reflectors between blocks (geqrf, then
    J_t Q by ormqr): the spectrum equals one qr(J_t @ Q) per step on the dense Jacobians (checked against
    autograd in test_lyapunov_of_a_linearization_equals_that_of_its_dense_jacobians), masked steps,
    warm-up and chunks included."""
    from gradflow.analysis import linearize_trace, products

    tr, key, ref = h.make_trace(kind, T=30, B=3, H=H, lengths=[30, 22, 9], seed=5)
    op = linearize_trace(tr, key, dtype=torch.float64)
    S = op.shape[2]
    assert products._dense_steps_cheap(op, S)
    J = op.dense()
    mask = tr.mask(key)
    Q = torch.eye(S, dtype=h.DT).expand(3, S, S).clone()
    tot = torch.zeros(3, S, dtype=h.DT)
    for t in range(30):
        Jt = torch.where(mask[t][:, None, None], J[t], torch.eye(S, dtype=h.DT))
        Q, R = torch.linalg.qr(Jt @ Q)
        tot += R.diagonal(dim1=-2, dim2=-1).abs().log() * (mask[t] & (t >= 2))[:, None]
    want = (tot / (mask[2:].sum(0))[:, None]).sort(-1, descending=True).values
    for chunk in (None, 7):
        got = lyapunov_spectrum(tr, key, warmup=2, chunk=chunk, threads=1)
        torch.testing.assert_close(got.exponents, want, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got.steps, mask[2:].sum(0).to(h.DT))
