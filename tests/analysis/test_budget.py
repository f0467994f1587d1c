"""The work budget of the plan: Golub–Kahan–Lanczos σ_max against dense SVDs, and every quantity run
over the first b sequences the plan gives it, equal to the same quantity computed on that subset."""

import numpy as np
import pytest
import torch

from gradflow.analysis import (AnalysisConfig, Linearization, analyze_trace, largest_singular_value, linearize_trace,
                               lyapunov_spectrum, lyapunov_table, plan_trace, product_spectrum, products_table,
                               singular_values)
from gradflow.errors import GradflowError

from . import helpers as h

# (kind, direction, lengths): the dense structures, both directions, with and without masks
CASES = [("rnn_tanh", 0, None), ("lstm", 1, [9, 6, 9, 4]), ("gru", 0, [9, 5, 8, 9]), ("gru", 1, None),
         ("lstm", 0, None)]


@pytest.mark.parametrize("kind,direction,lengths", CASES)
def test_lanczos_sigma_max_is_exact_at_full_rank_and_a_lower_bound_before(kind, direction, lengths):
    tr, key = h.make_trace(kind, T=9, B=4, H=5, direction=direction, lengths=lengths, seed=3, scale=1.5)[:2]
    lin = linearize_trace(tr, key, dtype=torch.float64)
    S = lin.shape[2]
    ref = singular_values(lin.dense())[..., 0]
    exact = largest_singular_value(lin, iterations=S, tol=0.0)
    torch.testing.assert_close(exact, ref, rtol=1e-10, atol=1e-12)
    few = largest_singular_value(lin, iterations=2, tol=0.0)
    assert bool((few <= ref * (1 + 1e-12)).all()) and bool((few > 0).all())
    # the chunked route gives the same values
    torch.testing.assert_close(largest_singular_value(lin, iterations=S, tol=0.0, chunk=2), exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("case", ["zero", "rank1", "identity"])
def test_lanczos_on_explicit_matrices(case):
    g = torch.Generator().manual_seed(0)
    S = 6
    if case == "zero":
        J = torch.zeros(2, 3, S, S, dtype=torch.float64)
    elif case == "rank1":
        u, v = torch.randn(2, 3, S, 1, generator=g, dtype=torch.float64), torch.randn(2, 3, 1, S, generator=g,
                                                                                       dtype=torch.float64)
        J = u @ v
    else:
        J = torch.eye(S, dtype=torch.float64).expand(2, 3, S, S) * 3.0
    got = largest_singular_value(J, iterations=S, tol=0.0)
    torch.testing.assert_close(got, torch.linalg.svdvals(J)[..., 0], rtol=1e-12, atol=1e-300)


def test_lanczos_bad_arguments_name_the_option():
    J = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with pytest.raises(GradflowError, match="iterations"):
        largest_singular_value(J, iterations=0)
    with pytest.raises(GradflowError, match="chunk"):
        largest_singular_value(J, chunk=0)


@pytest.mark.parametrize("kind,direction,lengths", [("lstm", 1, [9, 6, 9, 4]), ("gru", 0, None)])
def test_each_quantity_runs_over_the_planned_sequences(kind, direction, lengths, monkeypatch):
    """A plan taking 1-3 of 4 sequences per quantity (as a work budget gives at large S): the spectra
    summary is the mean over the first b_spectra sequences, the distributions only hold the first
    b_dist, and the products and Lyapunov tables equal those of the subset trace; J is formed only at
    the distribution steps, for b_dist sequences."""
    from dataclasses import replace

    tr, key = h.make_trace(kind, T=9, B=4, H=4, direction=direction, lengths=lengths, seed=5, scale=1.5)[:2]
    cfg = AnalysisConfig(dense_max=0, k=2, spectra_steps=3, max_rank=50)
    plan = replace(plan_trace(tr, cfg)[str(key)], b_spectra=3, b_dist=2, b_products=1, b_lyapunov=2)
    assert plan.spectra == "top-k" and plan.iterations == plan.S
    assert "σ_max at all 9 steps of 3 of 4 sequences" in plan.describe()
    formed = []
    real = Linearization.dense

    def spy(self, chunk=None):
        formed.append(tuple(self.shape[:2]))
        return real(self, chunk)

    monkeypatch.setattr(Linearization, "dense", spy)
    out = analyze_trace(tr, cfg, plans={str(key): plan})
    # the distributions: one J per planned step for b_dist sequences (at this tiny S the Lyapunov sweep also
    # forms its per-step J for its own b_lyapunov sequences, one step at a time)
    # (the jobs may run side by side, so in any order)
    dist = (len(plan.steps), plan.b_dist)
    assert formed.count(dist) == 1 and all(f == dist or f[1] == plan.b_lyapunov for f in formed)
    monkeypatch.setattr(Linearization, "dense", real)
    J = linearize_trace(tr, key, dtype=torch.float64).dense()
    sv = singular_values(J)
    mask = tr.mask(key)
    bs = plan.b_spectra
    ss = out["spectra_summary"]
    ss = ss[ss["key"] == str(key)].sort_values("t")
    want = [sv[t, :bs, 0][mask[t, :bs]].mean().item() for t in range(9)]
    np.testing.assert_allclose(ss["sigma_max"], want, rtol=1e-6)
    sp = out["spectra"]
    assert set(sp["b"]) <= set(range(plan.b_dist)) and set(sp["t"]) <= set(plan.steps)
    for r in sp.itertuples():
        assert r.sigma == pytest.approx(float(sv[r.t, r.b, r.rank - 1]), rel=1e-9)
    sub = tr.subset(slice(0, plan.b_products))
    ds = list(plan.distances)
    ref = products_table(product_spectrum(sub, key, distances=ds), key, ds)
    ref = ref[ref["rank"] <= plan.products].sort_values(["distance", "rank"])
    got = out["products"].sort_values(["distance", "rank"])
    full = products_table(product_spectrum(tr, key, distances=ds), key, ds)  # the mean over all 4 differs
    assert not np.allclose(full[full["rank"] <= plan.products].sort_values(["distance", "rank"])["log10_sigma"],
                           got["log10_sigma"])
    np.testing.assert_allclose(got["log10_sigma"], ref["log10_sigma"], rtol=1e-6, atol=1e-9)
    sub = tr.subset(slice(0, plan.b_lyapunov))
    ref = lyapunov_table(lyapunov_spectrum(sub, key, k=plan.lyapunov), key)
    np.testing.assert_allclose(out["lyapunov"]["exponent"], ref["exponent"], rtol=1e-10)


def _two_layer_trace():
    import gradflow
    from torch import nn

    torch.manual_seed(3)
    m = nn.LSTM(3, 6, num_layers=2).double()
    x = torch.randn(8, 3, 3, dtype=torch.float64)
    with gradflow.record(m, keep="states") as rec:
        out, _ = m(x)
        out[-1].pow(2).sum().backward()
    return rec.trace


def test_top_k_jobs_run_two_at_a_time_with_the_same_tables(monkeypatch):
    """On the top-k route the Jacobian jobs of the units run on two threads (one torch thread each,
    restored after); every table equals the one-at-a-time analysis."""
    from gradflow.analysis import pipeline

    tr = _two_layer_trace()
    cfg = AnalysisConfig(dense_max=0, k=3, spectra_steps=3)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    assert pipeline._workers(pipeline.plan_trace(tr, cfg), torch.device("cpu"), 6) == 2
    assert pipeline._workers(pipeline.plan_trace(tr, AnalysisConfig()), torch.device("cpu"), 6) == 1  # dense route
    seen = []
    real = pipeline._run_jobs
    monkeypatch.setattr(pipeline, "_run_jobs", lambda jobs, w: seen.append(w) or real(jobs, w))
    before = torch.get_num_threads()
    par = analyze_trace(tr, cfg)
    assert seen == [2] and torch.get_num_threads() == before
    monkeypatch.setattr(pipeline, "_workers", lambda *a: 1)
    seq = analyze_trace(tr, cfg)
    assert set(par) == set(seq)
    for name in seq:
        pd_testing = __import__("pandas").testing
        pd_testing.assert_frame_equal(par[name], seq[name], check_exact=False, rtol=1e-12)


def test_a_single_products_job_takes_the_idle_workers_share(monkeypatch):
    """With fewer products jobs than workers, each finishes its top-k distances on the idle workers'
    threads (one layer, two workers: two); the tables equal those of one thread. Two layers on two
    workers, one worker on the top-k route: one thread; small units keep the chain's own default."""
    import gradflow
    from gradflow.analysis import pipeline
    from torch import nn

    torch.manual_seed(3)
    m = nn.LSTM(3, 6).double()
    with gradflow.record(m, keep="states") as rec:
        out, _ = m(torch.randn(8, 3, 3, dtype=torch.float64))
        out[-1].pow(2).sum().backward()
    cfg = AnalysisConfig(dense_max=0, k=3, spectra_steps=3)
    monkeypatch.setattr(pipeline.os, "cpu_count", lambda: 2)
    top, dense = pipeline.plan_trace(rec.trace, cfg), pipeline.plan_trace(rec.trace, AnalysisConfig())
    assert pipeline._product_threads(2, 1, top) == 2
    assert pipeline._product_threads(2, 2, top) == 1
    assert pipeline._product_threads(1, 1, top) == 1
    assert pipeline._product_threads(1, 1, dense) is None
    seen, real = [], pipeline.product_singular_values
    monkeypatch.setattr(pipeline, "product_singular_values",
                        lambda *a, **kw: seen.append(kw["threads"]) or real(*a, **kw))
    par = analyze_trace(rec.trace, cfg)
    assert seen == [2]
    monkeypatch.setattr(pipeline, "_product_threads", lambda *a: 1)
    seq = analyze_trace(rec.trace, cfg)
    assert seen == [2, 1] and set(par) == set(seq)
    for name in seq:
        __import__("pandas").testing.assert_frame_equal(par[name], seq[name], check_exact=True)


def test_a_failing_job_raises_its_error_and_restores_the_threads():
    from gradflow.analysis import pipeline

    before = torch.get_num_threads()
    ran = []

    def boom():
        raise GradflowError("job 1 failed")

    with pytest.raises(GradflowError, match="job 1 failed"):
        pipeline._run_jobs([lambda: ran.append(0), boom, lambda: ran.append(2)], 2)
    assert torch.get_num_threads() == before
    assert pipeline._run_jobs([lambda: 1, lambda: 2, lambda: 3], 2) == [1, 2, 3]
