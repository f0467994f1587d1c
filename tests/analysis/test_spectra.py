"""Singular/eigen spectra, summaries, the matrix-free top-k route and random-matrix oracles."""

import math

import numpy as np
import pytest
import torch

from gradflow import GradflowError
from gradflow.analysis import (eigenvalue_moduli, jacobians, linearize_trace, singular_values, spectral_radius,
                               step_summary, top_singular_values)

from . import helpers as h


def test_singular_values_match_numpy_any_batch_shape():
    g = torch.Generator().manual_seed(0)
    for shape in [(4, 4), (3, 5, 5), (2, 3, 40, 40)]:
        J = torch.randn(*shape, generator=g, dtype=torch.float64)
        sv = singular_values(J, threads=2)
        ref = np.linalg.svd(J.numpy(), compute_uv=False)
        assert sv.shape == shape[:-1]
        assert np.allclose(sv.numpy(), ref, rtol=1e-12, atol=1e-12)
        assert (sv[..., :-1] >= sv[..., 1:]).all()


def test_thread_pool_route_equals_single_call():
    J = torch.randn(40, 32, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert torch.equal(singular_values(J, threads=2), singular_values(J, threads=1))
    assert torch.allclose(eigenvalue_moduli(J, threads=2), eigenvalue_moduli(J, threads=1))


def test_float32_refines_small_singular_values_in_float64():
    g = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(2, 30, 30, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -9, 30, dtype=torch.float64)
    J32 = (U * s) @ U.mT
    J32 = J32.float()
    exact = np.linalg.svd(J32.double().numpy(), compute_uv=False)  # of the float32 matrix itself
    sv = singular_values(J32)
    assert sv.dtype == torch.float32
    assert np.allclose(sv.double().numpy(), exact, rtol=1e-5, atol=0)
    crude = singular_values(J32, refine=0)  # plain float32 gesdd: no relative accuracy at 1e-9
    assert not np.allclose(crude.double().numpy(), exact, rtol=1e-2, atol=0)


def test_eigenvalue_moduli_and_radius():
    g = torch.Generator().manual_seed(2)
    J = torch.randn(3, 2, 7, 7, generator=g, dtype=torch.float64)
    mod = eigenvalue_moduli(J)
    ref = np.sort(np.abs(np.linalg.eigvals(J.numpy())), -1)[..., ::-1]
    assert np.allclose(mod.numpy(), ref, rtol=1e-10)
    assert torch.equal(spectral_radius(J), mod[..., 0])


def test_step_summary():
    J = torch.diag_embed(torch.tensor([[2.0, 0.5, 0.25], [1.5, 1.2, -3.0]], dtype=torch.float64))
    s = step_summary(J)
    assert torch.allclose(s["sigma_max"], torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert torch.allclose(s["sigma_min"], torch.tensor([0.25, 1.2], dtype=torch.float64))
    assert torch.allclose(s["frac_gt1"], torch.tensor([1 / 3, 1.0], dtype=torch.float64))
    assert torch.allclose(s["spectral_radius"], torch.tensor([2.0, 3.0], dtype=torch.float64))


def test_bad_jacobian_batches():
    with pytest.raises(GradflowError) as e:
        singular_values(torch.zeros(3, 4, 5))
    assert "(3, 4, 5)" in str(e.value) and "square" in str(e.value)
    J = torch.eye(3).expand(2, 4, 3, 3).clone()
    J[1, 2, 0, 1] = float("nan")
    with pytest.raises(GradflowError) as e:
        singular_values(J)
    msg = str(e.value)
    assert "\n" not in msg and "(1, 2)" in msg and "NaN/Inf" in msg
    sv = singular_values(J, on_nonfinite="nan")  # located, not dropped
    assert torch.isnan(sv[1, 2]).all() and torch.isfinite(sv[0]).all()
    assert torch.isnan(step_summary(J, on_nonfinite="nan")["sigma_max"][1, 2])
    with pytest.raises(GradflowError, match="on_nonfinite"):
        singular_values(J, on_nonfinite="drop")
    with pytest.raises(GradflowError, match="k=9"):
        top_singular_values(torch.zeros(1, 1, 3, 3), 9)


@pytest.mark.parametrize("kind,opts", [("lstm", {"proj": 3}), ("gru", {}), ("rnn_tanh", {})])
def test_top_k_matches_full_spectrum(kind, opts):
    tr, key, _ = h.make_trace(kind, T=4, B=2, H=12, F=3, scale=2.0, **opts)
    lin = linearize_trace(tr, key)
    full = singular_values(jacobians(tr, key))
    top = top_singular_values(lin, 4)
    assert top.shape == (4, 2, 4)
    assert torch.allclose(top, full[..., :4], rtol=1e-4, atol=0)
    top_dense = top_singular_values(lin.dense(), 3)
    assert torch.allclose(top_dense, full[..., :3], rtol=1e-4, atol=0)


def test_top_k_degenerate_spectrum():
    """Orthogonal s·Q: JᵀJ = s²I, the Krylov space is invariant after one block."""
    Q = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64)).Q
    top = top_singular_values((0.7 * Q).expand(2, 1, 20, 20), 5)
    assert torch.allclose(top, torch.full_like(top, 0.7), rtol=1e-10)


@pytest.mark.parametrize("d", [[3.0, 3.0, 3.0, 2.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
                               [1.0] * 10, [2.0, 1e-3, 1e-3, 1e-3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
def test_top_k_repeated_and_zero_singular_values(d):
    """U diag(d) Vᵀ with repeated values and a null space (k past the rank): every copy is found
    (Lanczos restarts on breakdown), zeros come out as zeros."""
    gen = torch.Generator().manual_seed(1)
    U = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64)).Q
    J = (U @ torch.diag(torch.tensor(d, dtype=torch.float64)) @ V.T).expand(3, 2, 10, 10)
    top = top_singular_values(J, 8)
    want = torch.tensor(d, dtype=torch.float64)[:8].expand(3, 2, 8)
    assert torch.allclose(top, want, rtol=1e-10, atol=1e-12), (top - want).abs().max()


def test_tanh_step_bounded_by_recurrent_weight():
    tr, key, ref = h.make_trace("rnn_tanh", T=8, B=3, H=6, scale=2.5)
    smax_w = torch.linalg.matrix_norm(ref["p"]["weight_hh"], ord=2)
    sv = singular_values(jacobians(tr, key))
    assert (sv[..., 0] <= smax_w * (1 + 1e-12)).all()


def test_random_matrix_oracles(seed=0):
    """iid N(0, g²/N), N = 512: spectral radius ≈ g (circular law; the finite-N edge sits ~2% out),
    σ_max ≈ 2g (quarter-circle edge), both within a few percent; the top-k route agrees."""
    N, g = 512, 1.3
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(1, 1, N, N, generator=gen, dtype=torch.float64) * g / math.sqrt(N)
    rho = float(spectral_radius(W))
    smax = float(singular_values(W)[..., 0])
    assert abs(rho / g - 1) < 0.05
    assert abs(smax / (2 * g) - 1) < 0.03
    assert abs(float(top_singular_values(W, 1)) / smax - 1) < 1e-4


@pytest.mark.parametrize("kind", ["mingru", "minlstm", "indrnn", "lru"])
def test_diagonal_kinds_spectra_unit_by_unit_equal_dense_svd(kind):
    """spectra_tables takes a diagonal kind's singular values from its per-unit factors without forming
    J_t; they equal the SVD (and the eigenvalue moduli) of the dense Jacobians, masked steps left out."""
    from gradflow.analysis import eigenvalue_moduli, spectra_tables

    tr, key, _ = h.make_trace(kind, T=5, B=3, H=4, F=3, lengths=[5, 2, 4], scale=1.5)
    lin = linearize_trace(tr, key)
    assert lin.structure in ("diagonal", "complex_diagonal")
    J = jacobians(tr, key)
    spectra, summary = spectra_tables(tr, key)
    mask = tr.mask(key)
    sv = torch.linalg.svdvals(J)
    got = torch.tensor(spectra.sort_values(["t", "b", "rank"])["sigma"].to_numpy()).view(-1, J.shape[-1])
    torch.testing.assert_close(got, sv[mask], atol=1e-12, rtol=0)
    radius = eigenvalue_moduli(J)[..., 0]
    want = torch.stack([radius[t][mask[t]].mean() for t in range(5)])
    torch.testing.assert_close(torch.tensor(summary["spectral_radius"].to_numpy()), want, atol=1e-12, rtol=0)
