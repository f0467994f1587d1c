"""Matrix-free top-k (and bottom-k) equal the dense computation, for every registered cell kind.

The reference is independent of gradflow's linearizations: per-step Jacobians of the explicit step
(``tests/analysis/helpers.step`` / ``tests/reference.py``) by torch.autograd.functional.jacobian,
masked steps set to the identity, put in processing order; products multiplied out in float64 and
factored by ``torch.linalg.svdvals``; Lyapunov sums of ln|R_ii| of a step-by-step QR sweep (one QR
per step, from the same start frame). Cases are data: (kind, options) × direction × masked or not.
"""

import math

import pytest
import torch

from gradflow import GradflowError
from gradflow import kinds
from gradflow.analysis import (linearize_trace, lyapunov_exponents, lyapunov_spectrum, product_singular_values,
                               product_spectrum, smallest_singular_values, top_singular_values)

from . import helpers as h

T, B, F = 6, 2, 3
K = 2  # top k; S ≥ 8 so that the k-column frames (k + 4 columns) are narrower than S: the matrix-free route
DISTANCES = [1, 3, 6]
RTOL = 1e-6


def _custom_step():
    """A nonlinear user cell with two states (no closed form: JVP/VJP through the step)."""
    g = torch.Generator().manual_seed(7)
    W = torch.randn(8, 8, generator=g, dtype=h.DT) * 0.6
    U = torch.randn(4, 4, generator=g, dtype=h.DT) * 0.6
    V = torch.randn(4, F, generator=g, dtype=h.DT)

    def step(x, s):
        a, b = s
        a2 = torch.tanh(torch.cat([a, b], -1) @ W.T)[..., :4] + x @ V.T
        b2 = torch.sigmoid(b @ U.T) * b + 0.3 * torch.tanh(a2)
        return (a2, b2)

    return step


# (kind, make_trace options): state size S = 8 for each
CASES = [
    ("rnn_tanh", {"H": 8, "scale": 2.0}),
    ("rnn_relu", {"H": 8, "scale": 1.5}),
    ("lstm", {"H": 4, "scale": 2.0}),
    ("lstm", {"H": 5, "proj": 3, "scale": 2.0}),  # S = 3 + 5
    ("gru", {"H": 8, "scale": 2.0}),
    ("mingru", {"H": 8, "scale": 1.5}),
    ("minlstm", {"H": 8, "scale": 1.5}),
    ("indrnn", {"H": 8, "scale": 1.5}),
    ("lru", {"H": 4}),
    ("custom", {"H": 4, "custom_states": ("a", "b")}),
]
LENGTHS = [None, [T, 4]]  # unmasked; packed (the second sequence ends after 4 steps)
IDS = [f"{k}{'-proj' if 'proj' in o else ''}" for k, o in CASES]


def test_every_registered_kind_has_a_case():
    assert set(kinds.names()) <= {k for k, _ in CASES}


def _trace(kind, opts, direction, lengths):
    opts = dict(opts)
    if kind == "custom":
        opts["step_fn"] = _custom_step()
    return h.make_trace(kind, T=T, B=B, F=F, direction=direction, lengths=lengths, **opts)


def _reference_jacobians(ref, direction):
    """[T, B, S, S] in processing order, identity at masked steps (autograd of the explicit step)."""
    J = h.autograd_jacobians(ref["step"], ref["x"], ref["prevs"])
    S = J.shape[-1]
    J[~ref["mask"]] = torch.eye(S, dtype=h.DT)
    return J.flip(0) if direction == 1 else J, J


def _close(got, want, rtol=RTOL):
    assert got.shape == want.shape, (got.shape, want.shape)
    assert torch.allclose(got, want, rtol=rtol, atol=1e-12), (got - want).abs().max()


@pytest.fixture(scope="module", params=[(c, d, m) for c in range(len(CASES)) for d in (0, 1) for m in range(2)],
                ids=lambda p: f"{IDS[p[0]]}-dir{p[1]}-{'masked' if p[2] else 'full'}")
def case(request):
    c, direction, m = request.param
    kind, opts = CASES[c]
    tr, key, ref = _trace(kind, opts, direction, LENGTHS[m])
    Jstep, Jpos = _reference_jacobians(ref, direction)
    mask_step = ref["mask"].flip(0) if direction == 1 else ref["mask"]
    return {"trace": tr, "key": key, "ref": ref, "J": Jstep, "Jpos": Jpos, "mask": mask_step, "kind": kind}


def test_per_step_top_and_bottom_k_equal_dense_svd(case):
    lin = linearize_trace(case["trace"], case["key"])
    sv = torch.linalg.svdvals(case["Jpos"])
    _close(top_singular_values(lin, K), sv[..., :K])
    _close(smallest_singular_values(lin, K), sv[..., -K:])
    steps = [0, 3, 5]
    _close(top_singular_values(lin, K, steps=steps, device="cpu"), sv[steps, :, :K])
    _close(smallest_singular_values(lin, K, steps=steps, device="cpu"), sv[steps, :, -K:])


def _explicit_products(J):
    P = torch.eye(J.shape[-1], dtype=h.DT).expand(J.shape[1], -1, -1)
    out = []
    for d in range(1, J.shape[0] + 1):
        P = J[d - 1] @ P
        if d in DISTANCES:
            out.append(torch.linalg.svdvals(P).log())
    return torch.stack(out)


def test_product_top_k_equals_explicit_products(case):
    want = _explicit_products(case["J"])[..., :K]
    got = product_spectrum(case["trace"], case["key"], distances=DISTANCES, k=K)
    _close(got, want)
    full = product_spectrum(case["trace"], case["key"], distances=DISTANCES)  # k=None: every rank
    _close(full[..., :K], want)
    # the same from explicit Jacobians in processing order with the trace's mask
    got2 = product_singular_values(case["J"], distances=DISTANCES, mask=case["mask"], k=K, device="cpu")
    _close(got2, want)
    if case["trace"].keys()[0].direction == 0:  # start > 0
        sub = _explicit_products(case["J"][2:])[:2, :, :K]
        _close(product_singular_values(case["J"], distances=DISTANCES[:2], start=2, k=K), sub)


def _qr_sweep(J, mask, Q):
    """Σ ln|R_ii| / (valid steps) of one QR per step, sorted descending."""
    tot = torch.zeros(J.shape[1], Q.shape[-1], dtype=h.DT)
    Q = Q.expand(J.shape[1], *Q.shape[-2:]).clone()
    for t in range(J.shape[0]):
        Q, R = torch.linalg.qr(J[t] @ Q)
        tot += R.diagonal(dim1=-2, dim2=-1).abs().log() * mask[t][:, None]
    return (tot / mask.sum(0)[:, None]).sort(-1, descending=True).values


def test_lyapunov_top_k_equals_explicit_qr_sweep(case):
    J, mask = case["J"], case["mask"]
    S = J.shape[-1]
    full = _qr_sweep(J, mask, torch.eye(S, dtype=h.DT))
    res = lyapunov_spectrum(case["trace"], case["key"], device="cpu")
    _close(res.exponents, full)
    got = lyapunov_spectrum(case["trace"], case["key"], k=K, chunk=3).exponents
    if case["kind"] in ("mingru", "minlstm", "indrnn", "lru"):
        _close(got, full[:, :K])  # exact per unit: the k units of largest average
    else:  # same random start frame as lyapunov_exponents(seed=0): the first k columns of a random S×S frame
        g = torch.Generator().manual_seed(0)
        Q0 = torch.linalg.qr(torch.randn(S, S, generator=g, dtype=h.DT)[:, :K]).Q
        _close(got, _qr_sweep(J, mask, Q0))
        if case["kind"] == "gru":  # explicit Jacobians (DenseOperator) swept two steps at a time
            _close(lyapunov_exponents(J, k=K, mask=mask, chunk=2).exponents, _qr_sweep(J, mask, Q0))


def test_long_products_top_k_at_extreme_spreads():
    """A graded linear map (σ from e^2 down to e^-3 per step), 300 steps: ln σ spans ±900, far beyond
    float64; the top k come out exact (the explicit product would over/underflow)."""
    S, k = 10, 3
    lam = torch.linspace(2.0, -3.0, S, dtype=h.DT)
    g = torch.Generator().manual_seed(3)
    Qo = torch.linalg.qr(torch.randn(S, S, generator=g, dtype=h.DT)).Q
    W = Qo @ torch.diag(lam.exp()) @ Qo.T  # symmetric: P_d = W^d, σ = e^{d λ}
    J = W.expand(300, 1, S, S)
    got = product_singular_values(J, distances=[1, 10, 300], k=k)
    want = torch.stack([d * lam[:k] for d in (1, 10, 300)])[:, None]
    _close(got, want, rtol=1e-9)


def test_smallest_singular_values_resolve_small_sigma_min():
    """σ from 1 down to 1e-6: the bottom k at 1e-6 relative (Rayleigh–Ritz on J Q, not on JᵀJ)."""
    S = 30
    g = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(S, S, generator=g, dtype=h.DT)).Q
    V = torch.linalg.qr(torch.randn(S, S, generator=g, dtype=h.DT)).Q
    s = torch.logspace(0, -6, S, dtype=h.DT)
    J = (U @ torch.diag(s) @ V.T).expand(2, 1, S, S)
    _close(smallest_singular_values(J, 3), s[-3:].expand(2, 1, 3), rtol=1e-8)


@pytest.mark.parametrize("fn,args", [
    (top_singular_values, (2,)), (smallest_singular_values, (2,)),
])
def test_device_and_steps_errors(fn, args):
    J = torch.randn(3, 1, 4, 4, dtype=h.DT)
    with pytest.raises(GradflowError, match="steps must be indices in 0..2"):
        fn(J, *args, steps=[5])
    with pytest.raises(GradflowError, match="not a device"):
        fn(J, *args, device="nowhere")
    if not torch.cuda.is_available():
        with pytest.raises(GradflowError, match="CUDA is not available"):
            fn(J, *args, device="cuda")


def test_products_and_lyapunov_device_errors():
    J = torch.randn(3, 1, 4, 4, dtype=h.DT)
    for call in (lambda d: product_singular_values(J, k=2, device=d), lambda d: lyapunov_exponents(J, device=d)):
        with pytest.raises(GradflowError, match="not a device"):
            call("nowhere")
    with pytest.raises(GradflowError, match="k=5 exceeds the state size S=4"):
        product_singular_values(J, k=5)
    assert math.isfinite(float(product_singular_values(J, k=1, device="cpu")[0, 0, 0]))


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_product_top_k_finishes_in_threads_equal_one_thread(kind, monkeypatch):
    """The distances left unsettled by the shared rounds are finished on several threads, each with
    its own chunk cache (chunks of 2 steps: the threads would evict each other's): the result equals
    the one-thread result (to rounding), masked steps included, and the explicit products."""
    import threading

    from gradflow.analysis import topk
    from gradflow.analysis.streaming import chunked_linearization

    tr, key, _ = h.make_trace(kind, T=12, B=3, H=4 if kind == "lstm" else 8, lengths=[12, 7, 10], seed=4)  # S = 8
    ds = [1, 2, 5, 9, 12]
    finished, real = [], topk._finish

    def spy(*args, **kwargs):
        finished.append(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(topk, "_finish", spy)
    op = chunked_linearization(tr, key, chunk=2, dtype=torch.float64)
    one = product_singular_values(op, distances=ds, mask=op.step_mask, k=K, threads=1)
    assert len(finished) >= 2  # the case exercises the finishes
    finished.clear()
    from gradflow.analysis.streaming import ChunkedLinearization

    users, locate = {}, ChunkedLinearization._locate

    def spy_locate(self, k):
        users.setdefault(id(self._cache), set()).add(threading.get_ident())
        return locate(self, k)

    monkeypatch.setattr(ChunkedLinearization, "_locate", spy_locate)
    par = product_singular_values(op, distances=ds, mask=op.step_mask, k=K, threads=3)
    assert len(finished) >= 2 and threading.get_ident() not in finished  # ... on the pool's threads
    assert all(len(t) == 1 for t in users.values())  # no chunk cache is shared by two threads
    assert torch.equal(torch.isfinite(par), torch.isfinite(one))
    torch.testing.assert_close(par, one, rtol=0, atol=1e-12)
    J = linearize_trace(tr, key, dtype=torch.float64).dense()
    full = product_singular_values(J, distances=ds, mask=op.step_mask)[..., :K]
    _close(par, full)
