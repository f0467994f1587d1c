"""plan_unit: the route, distribution steps and chunk chosen from S, T, B, structure and the budget."""

import pytest

from gradflow.analysis import AnalysisConfig, distribution_steps, log_distances, plan_unit
from gradflow.errors import GradflowError

D = AnalysisConfig()

# (S, T, B, structure, config changes) -> (route, k, n steps, products, lyapunov), and the sequences
# (b_spectra, b_dist, b_products, b_lyapunov) and Lanczos iterations the work budget gives
CASES = [
    ((64, 50, 16, "dense", {}), ("dense", 64, 50, 64, 64), (16, 16, 16, 16, 0)),  # small: everything, every step
    # dense, but T·B SVDs are not cheap: 6.4·T/S steps; the budget takes 5 sequences' SVDs at every step
    ((128, 500, 16, "dense", {}), ("dense", 128, 25, 128, 128), (5, 5, 7, 9, 0)),
    ((128, 500, 16, "dense", {"spectra_steps": 10}), ("dense", 128, 10, 128, 128), (5, 5, 7, 9, 0)),
    # matrix-free: at least 4 steps; products lower k to 4 to fit one sequence
    ((1024, 500, 16, "dense", {}), ("top-k", 32, 4, 4, 32), (2, 1, 1, 1, 12)),
    ((1024, 5000, 16, "dense", {}), ("top-k", 32, 31, 4, 32), (2, 1, 1, 1, 12)),  # per-step budget: same choices
    ((1024, 500, 16, "dense", {"k": 8, "spectra_steps": 2}), ("top-k", 8, 2, 4, 8), (2, 2, 1, 7, 12)),
    ((1024, 500, 16, "dense", {"lyapunov": False, "products": False}), ("top-k", 32, 4, 0, 0), (2, 1, 16, 16, 12)),
    ((2048, 500, 16, "dense", {}), ("top-k", 32, 4, 4, 8), (1, 1, 1, 1, 7)),  # fewer iterations and directions
    ((1024, 2000, 16, "diagonal", {}), ("exact", 1024, 2000, 1024, 1024), (16, 16, 16, 16, 0)),  # diagonal: exact
    ((200, 40, 4, "dense", {"dense_max": 256}), ("dense", 200, 4, 200, 200), (1, 1, 1, 2, 0)),  # 160 SVDs of 200²: not cheap
    ((40, 40, 4, "dense", {"dense_max": 0, "k": 40}), ("dense", 40, 40, 40, 40), (4, 4, 4, 4, 0)),  # k = S: dense
]


@pytest.mark.parametrize("args,expect,seqs", CASES, ids=[str(a) for a, _, _ in CASES])
def test_plan_choices(args, expect, seqs):
    S, T, B, structure, changes = args
    p = plan_unit("m/l0/d0/h", S=S, T=T, B=B, structure=structure, config=D.replace(**changes))
    assert (p.spectra, p.k, len(p.steps), p.products, p.lyapunov) == expect
    assert (p.b_spectra, p.b_dist, p.b_products, p.b_lyapunov, p.iterations) == seqs
    assert 1 <= p.chunk <= T and p.peak <= p.memory
    assert p.steps[0] == 0 and p.steps[-1] == T - 1
    text = p.describe()
    assert text.startswith("m/l0/d0/h: ") and "\n" not in text
    def of(b, word=" of"):
        return f"{word} {b} of {B} sequences" if b < B else ""

    if p.spectra == "top-k":
        assert (f"σ_max at all {T} steps{of(p.b_spectra)} (Lanczos, ≤ {p.iterations} iterations, "
                f"a lower bound); all {S} singular values at {len(p.steps)} of {T} steps{of(p.b_dist)} "
                f"(dense), the top {p.k} stored") in text
    if p.products and p.products < S:
        assert f"products top {p.products} of {S}{of(p.b_products, ' over')}" in text
    j = p.to_json()
    assert j["text"] == text and j["steps"] == list(p.steps) and j["b_lyapunov"] == p.b_lyapunov


def test_chunk_follows_the_budget():
    small = plan_unit("u", S=1024, T=2000, B=16, structure="dense", config=D.replace(memory="300MB"))
    big = plan_unit("u", S=1024, T=2000, B=16, structure="dense", config=D.replace(memory="1GB"))
    assert 1 <= small.chunk < big.chunk < 2000 and small.peak <= 3e8 and big.peak <= 1e9
    # the chunk's working set is linear in B and independent of T: doubling T keeps the chunk
    longer = plan_unit("u", S=1024, T=4000, B=16, structure="dense", config=D.replace(memory="1GB"))
    assert abs(longer.chunk - big.chunk) <= 0.02 * big.chunk
    assert plan_unit("u", S=8, T=10, B=2, structure="dense", config=D.replace(chunk=3)).chunk == 3


@pytest.mark.parametrize("changes,match", [
    ({"memory": "10MB"}, r"^m/l0/d0/h: the analysis needs about .* even one timestep at a time \(S=1024, T=500, "
                         r"B=16\), over the memory budget of 10 MB; raise it \(--memory / memory= / \[analysis\] "
                         r"memory\) or lower batch_limit or k$"),
    ({"chunk": 500, "memory": "200MB"}, r"^m/l0/d0/h: chunk=500 needs about .* \(S=1024, T=500, B=16\), over the "
                                        r"memory budget of 200 MB; lower chunk or raise memory"),
])
def test_over_budget_is_one_line(changes, match):
    with pytest.raises(GradflowError, match=match):
        plan_unit("m/l0/d0/h", S=1024, T=500, B=16, structure="dense", config=D.replace(**changes))


@pytest.mark.parametrize("T,n,expect", [(5, 10, (0, 1, 2, 3, 4)), (10, 4, (0, 3, 6, 9)), (10, 1, (9,)),
                                        (500, 64, None)])
def test_distribution_steps(T, n, expect):
    s = distribution_steps(T, n)
    if expect is not None:
        assert s == expect
    assert len(s) == min(n, T) and list(s) == sorted(set(s))


def test_log_distances():
    assert log_distances(1) == (1,) and log_distances(500)[0] == 1 and log_distances(500)[-1] == 500


def test_the_kinds_matvec_cost_sets_the_sequences():
    """A GRU's J v reads all three gate blocks of W_hh (6·H² flops, three times the default 2·S²):
    the budget then affords fewer sequences, and plan_trace passes the kind's own cost."""
    import torch
    from torch import nn

    import gradflow
    from gradflow.analysis import plan_trace

    S, T, B = 256, 500, 16
    plain = plan_unit("m/l0/d0/h", S=S, T=T, B=B, structure="dense", config=D)
    gru = plan_unit("m/l0/d0/h", S=S, T=T, B=B, structure="dense", config=D, matvec_flops=6.0 * S * S)
    # Lanczos σ_max over one sequence: T·(2·12·mv + 4·S·12²) flops against T·WORK_FLOPS
    assert (plain.b_spectra, gru.b_spectra) == (16, 12)
    assert gru.b_products <= plain.b_products and gru.b_lyapunov <= plain.b_lyapunov
    torch.manual_seed(0)
    m = nn.GRU(3, S)
    with gradflow.record(m, keep="states") as rec:
        out, _ = m(torch.randn(6, B, 3))
        out.sum().backward()
    p = next(iter(plan_trace(rec.trace, D).values()))
    assert p.b_spectra == 12
