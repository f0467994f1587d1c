"""The recording kernels run their CPU backward with subnormals flushed to zero (FTZ/DAZ) in the
calling thread and its OpenMP team, and put every thread's setting back on exit, even on error."""

from __future__ import annotations

import contextlib
import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

import gradflow
from gradflow.kinds import _kernel
from gradflow.kinds._subnormal import flushed, is_flushing, team_flushing

from ..reference import reference_fused

F32_MIN = float(np.finfo(np.float32).tiny)  # the smallest normal float32, 1.2e-38


@contextlib.contextmanager
def threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def vanishing(kind, H=6, T=60):
    """A float32 fused module whose δ_t shrinks ~10× per step, so it crosses the subnormal band
    (1.2e-38 .. 1.4e-45) between distances ~38 and ~45 and reaches 0 before the first step."""
    torch.manual_seed(0)
    m = getattr(nn, kind)(3, H)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "weight_hh" in name:
                q = torch.linalg.qr(torch.randn(H, H)).Q
                p.copy_(torch.cat([0.1 * q] * (p.shape[0] // H)))
            elif "weight_ih" in name:
                p.mul_(0.3)
        if kind != "RNN":  # GRU z ≈ 0, LSTM f ≈ 0: no slow path through z·h_{t-1} or f·c_{t-1}
            m.bias_ih_l0[H: 2 * H].fill_(-12.0)
    return m, torch.randn(T, 2, 3)


CASES = ["RNN", "GRU", "LSTM"]


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_recorded_deltas_flush_where_they_would_be_subnormal(kind, n_threads):
    m, x = vanishing(kind)
    T, B = x.shape[:2]
    w = torch.zeros(T, B, m.hidden_size)
    w[-1] = torch.randn(B, m.hidden_size)  # the loss reads the last step only
    zeros = torch.zeros(1, B, m.hidden_size, dtype=torch.float64)
    ref = copy.deepcopy(m).double()
    _, exact = reference_fused(ref, x.double(), torch.full((B,), T), zeros, zeros, w.double(), zeros, zeros)
    exact = exact[(0, 0, "h")]  # float64: no underflow at these sizes
    with threads(n_threads), gradflow.record(m, keep="states") as rec:
        out, _ = m(x)
        (out * w).sum().backward()
    got = rec.trace.grad(rec.trace.keys()[0]).double()
    a = got.abs()
    assert ((a == 0) | (a >= F32_MIN)).all(), "a recorded δ is subnormal"
    big = exact.abs() >= 1e-30
    assert big.any() and (exact.abs() < F32_MIN).any()  # the case does cross the band
    torch.testing.assert_close(got[big], exact[big], rtol=2e-4, atol=0)
    assert (got[exact.abs() < F32_MIN / 2**24] == 0).all()
    # the parameter gradients are the fused module's to float32 accuracy
    fused = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    out, _ = m(x)
    (out * w).sum().backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("main_before", [False, True])
def test_every_thread_gets_its_setting_back(main_before):
    m, x = vanishing("LSTM", T=20)
    with threads(2):
        team_flushing()  # the team exists (a thread created later copies the creating thread's setting)
        torch.set_flush_denormal(main_before)
        try:
            before = team_flushing()
            assert before[threading.get_native_id()] == main_before and len(before) == 2
            with gradflow.record(m, keep="states"):
                out, _ = m(x)
                seen = []
                out.register_hook(lambda g: seen.append(team_flushing()) or g)  # outside the kernel
                (out[-1] ** 2).sum().backward()
            assert seen == [before]
            assert team_flushing() == before and is_flushing() == main_before
        finally:
            torch.set_flush_denormal(False)


def test_setting_is_put_back_when_the_backward_raises(monkeypatch):
    m, x = vanishing("GRU", T=10)

    def boom(*a, **k):
        assert all(team_flushing().values())  # inside the kernel's backward: every thread flushes
        raise RuntimeError("boom")

    monkeypatch.setattr(_kernel, "recurrent_grad", boom)
    with threads(2):
        before = team_flushing()
        assert not any(before.values())
        with pytest.raises(RuntimeError, match="boom"):
            with gradflow.record(m, keep="states"):
                out, _ = m(x)
                out.sum().backward()
        assert team_flushing() == before


def test_flushed_context_restores_on_error_and_can_be_disabled():
    with threads(2):
        assert not any(team_flushing().values())
        with pytest.raises(KeyboardInterrupt):
            with flushed():
                assert all(team_flushing().values())
                raise KeyboardInterrupt
        assert not any(team_flushing().values())
        with flushed(enabled=False):
            assert not any(team_flushing().values())
