"""The recorder's buffer pool: reuse across backward passes never aliases live data.

The pool only takes buffers of 1 MiB or more; these tests lower that threshold to 0 so that every
buffer of the tiny reference cases goes through it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gradflow
from gradflow.recording import kernels
from gradflow.trace import StateKey
from tests.recording.test_fused import CASES, Case, build, forward, make_data, reference, tolerance


@pytest.fixture
def pool_everything(monkeypatch):
    monkeypatch.setattr(kernels.Workspace, "MIN_BYTES", 0)


def _states(case):
    return ("h", "c") if case.kind == "lstm" else ("h",)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(
    f"{f.name}={getattr(c, f.name)}" for f in dataclasses.fields(c) if getattr(c, f.name) != f.default) or "default")
def test_recorded_loop_matches_reference_every_pass(case, pool_everything):
    """Three passes with different data inside one open record(): the later passes run on reused
    buffers, and every pass's δ_t still equals its own reference."""
    m = build(case)
    datas = [make_data(case, seed=case.seed + 1 + 7 * k) for k in range(3)]
    outs, pools, got = [], [], []

    def copy(tr):  # copies taken, the trace (and the buffers it holds) dropped
        got.append({k: tr.grad(k).clone() for k in tr.keys()})

    with gradflow.record(m, keep="full", keep_traces=False, callback=copy) as rec:
        for d in datas:
            out, _, loss = forward(m, case, d)
            loss.backward()
            outs.append(out.detach().clone())
            pools.append(rec._workspace.nbytes)
    assert pools[0] > 0 and pools[2] == pools[1], f"pool sizes {pools}: buffers were not reused"
    tol = tolerance(case)
    D = 2 if case.bidirectional else 1
    for k, (d, grads) in enumerate(zip(datas, got)):
        _, ref = reference(m, d)
        with torch.no_grad():
            torch.testing.assert_close(outs[k], forward(m, case, d)[0], **tol)
        for layer in range(case.layers):
            for di in range(D):
                for s in _states(case):
                    key = StateKey("", layer, di, s)
                    torch.testing.assert_close(grads[key], ref[(layer, di, s)].to(grads[key].dtype),
                                               equal_nan=True, **tol, msg=f"pass {k} {key}")


def _lstm(seed=0):
    torch.manual_seed(seed)
    return nn.LSTM(3, 4, num_layers=2).double()


def test_outputs_held_by_the_caller_are_not_reused(pool_everything):
    m = _lstm()
    x1, x2 = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    with gradflow.record(m):
        out1, (h1, c1) = m(x1)
        out1.sum().backward()
        kept = out1.detach().clone()
        out2, _ = m(x2)
        out2.sum().backward()
        out3, _ = m(x2)
        out3.sum().backward()
    torch.testing.assert_close(out1, kept)
    assert out1.data_ptr() not in (out2.data_ptr(), out3.data_ptr())


def test_outputs_can_be_modified_in_place(pool_everything):
    """Pooled outputs are not autograd views: in-place ops on them work as on the fused path."""
    m = _lstm()
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def step():
        m.zero_grad()
        out, _ = m(x)
        out.mul_(2).relu_()
        out.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = step()
    with gradflow.record(m):
        for _ in range(2):
            recorded = step()
    for n in plain:
        torch.testing.assert_close(recorded[n], plain[n], msg=n)


def test_two_graphs_alive_at_once_and_retain_graph(pool_everything):
    """Two forwards before one backward, then a retained graph run twice: each needs its own
    buffers while its graph lives."""
    m = _lstm()
    xa, xb = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)

    def loss():
        return m(xa)[0].pow(2).sum() + m(xb)[0].sin().sum()

    m.zero_grad()
    loss().backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    with gradflow.record(m, keep="full") as rec:
        l1 = loss()
        l1.backward(retain_graph=True)
        l1.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, 2 * plain[n], msg=n)
    assert len(rec.traces) == 2
    for key in rec.traces[0].keys():
        torch.testing.assert_close(rec.traces[1].grad(key), rec.traces[0].grad(key), msg=str(key))


def test_traces_kept_in_full_stay_intact_over_many_passes(pool_everything):
    """keep='full' traces hold their gradient buffers: the pool must neither reuse them nor stop
    working once more buffers are held than it keeps blocks for."""
    m = _lstm()
    xs = [torch.randn(5, 2, 3, dtype=torch.float64) for _ in range(12)]
    copies = []
    with gradflow.record(m, keep="full") as rec:
        for x in xs:
            m(x)[0].pow(2).sum().backward()
            copies.append({k: rec.trace.grad(k).clone() for k in rec.trace.keys()})
    for tr, cp in zip(rec.traces, copies):
        for k, g in cp.items():
            torch.testing.assert_close(tr.grad(k), g, rtol=0, atol=0)


def test_workspace_hands_out_a_block_again_only_when_free():
    ws = kernels.Workspace()
    like = torch.empty(0)
    a = ws.empty((512, 1024), like)  # 2 MiB
    b = ws.empty((512, 1024), like)
    assert a.data_ptr() != b.data_ptr()
    pa = a.data_ptr()
    view = a[3]
    del a
    assert ws.empty((512, 1024), like).data_ptr() not in (pa, b.data_ptr())  # a view still holds the block
    del view
    c = ws.empty((256, 1024), like)  # half the size: the smallest free block within 2x
    assert c.data_ptr() == pa and c.shape == (256, 1024)
    assert ws.empty((10,), like).data_ptr() not in (pa, b.data_ptr())  # small: not pooled
    d = ws.empty((512, 512), torch.empty(0, dtype=torch.float64))  # bytes, whatever the dtype
    assert d.dtype == torch.float64 and d.data_ptr() not in (pa, b.data_ptr())
    ws.clear()
    assert ws.nbytes == 0


def test_recorder_drops_its_pool_on_exit(pool_everything):
    m = _lstm()
    rec = gradflow.record(m)
    with rec:
        m(torch.randn(5, 2, 3, dtype=torch.float64))[0].sum().backward()
        assert rec._workspace.nbytes > 0
    assert rec._workspace is None
