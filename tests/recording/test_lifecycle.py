"""Hooks are global state: nothing is left after record() exits; errors are one line and name things."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradflow
from gradflow.errors import GradflowError, NoRecurrentModuleError, TraceError, UnsupportedModuleError

HOOK_DICTS = [
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
]


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        self.cell = nn.GRUCell(8, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        out, _ = self.lstm(x)
        h = None
        for t in range(out.shape[0]):
            h = self.cell(out[t], h)
        return self.head(h)


def snapshot(model):
    return {
        name: ({d: dict(getattr(m, d, {})) for d in HOOK_DICTS}, "forward" in m.__dict__)
        for name, m in model.named_modules()
    }


def global_hooks():
    from torch.nn.modules import module as M

    return (len(M._global_forward_hooks), len(M._global_forward_pre_hooks), len(M._global_backward_hooks))


def assert_clean(model, before):
    after = snapshot(model)
    assert after == before
    for name, m in model.named_modules():
        assert "forward" not in m.__dict__, name
        for d in HOOK_DICTS:
            assert not getattr(m, d, {}), (name, d)


@pytest.mark.parametrize("failure", ["none", "forward", "backward", "interrupt"])
def test_no_hook_left_behind(failure):
    torch.manual_seed(0)
    m = Mixed()
    before = snapshot(m)
    g0 = global_hooks()
    x = torch.randn(5, 2, 3)

    class Boom(Exception):
        pass

    def body():
        with gradflow.record(m, keep="states") as rec:
            if failure == "forward":
                m(torch.randn(5, 2, 7))  # wrong feature size: raises inside the unroll
            y = m(x)
            if failure == "backward":
                y.register_hook(lambda g: (_ for _ in ()).throw(Boom()))
            if failure == "interrupt":
                raise KeyboardInterrupt
            y.sum().backward()
        return rec

    if failure == "none":
        rec = body()
        assert len(rec.trace.keys()) == 4 * 2 + 1
    else:
        with pytest.raises((Boom, KeyboardInterrupt, GradflowError, RuntimeError)):
            body()
    assert_clean(m, before)
    assert global_hooks() == g0
    # the model runs its fused path again and backward works without recording
    out, _ = m.lstm(x)
    out.sum().backward()


def test_graph_built_inside_backwarded_after_exit_records_nothing():
    m = nn.GRU(3, 4)
    with gradflow.record(m) as rec:
        out, _ = m(torch.randn(4, 2, 3))
    out.sum().backward()
    assert rec.traces == []
    with pytest.raises(TraceError, match="no backward pass"):
        rec.trace


def test_one_trace_per_backward_and_norms_only():
    m = nn.LSTM(3, 4)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with gradflow.record(m, keep="norms") as rec:
        for _ in range(3):
            opt.zero_grad()
            out, _ = m(torch.randn(6, 2, 3))
            out[-1].sum().backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
    assert len(rec.traces) == 3
    tr = rec.trace
    assert all(tr.state_record(k)["grad"] is None and tr.state_record(k)["state"] is None for k in tr.keys())
    with pytest.raises(TraceError, match="keep='norms'"):
        tr.grad("<root>/l0/d0/h")
    assert tr.norm("<root>/l0/d0/h").shape == (6, 2)


def test_no_grad_runs_fused_path_and_records_nothing():
    m = nn.LSTM(3, 4)
    with gradflow.record(m) as rec:
        with torch.no_grad():
            out, _ = m(torch.randn(5, 2, 3))
    assert out.grad_fn is None and rec.traces == []


def test_siamese_calls_are_separate_keys():
    m = nn.GRU(3, 4)
    a, b = torch.randn(5, 2, 3), torch.randn(7, 2, 3)
    with gradflow.record(m, keep="full") as rec:
        (m(a)[1] - m(b)[1]).pow(2).sum().backward()
    keys = [str(k) for k in rec.trace.keys()]
    assert keys == ["<root>/l0/d0/h", "<root>/l0/d0/h/call1"]
    assert rec.trace.shape("<root>/l0/d0/h/call1") == (7, 2)


def test_errors_are_one_line_and_name_things():
    with pytest.raises(NoRecurrentModuleError, match="Linear has no recurrent module"):
        gradflow.record(nn.Linear(2, 2))
    m = Mixed()
    with pytest.raises(UnsupportedModuleError, match="module 'head' \\(Linear\\)"):
        gradflow.record(m, modules=["head"])
    with pytest.raises(GradflowError, match="no module 'lstmm'.*did you mean 'lstm'"):
        gradflow.record(m, modules=["lstmm"])
    with pytest.raises(GradflowError, match="keep='everything'"):
        gradflow.record(m, keep="everything")

    class MyLSTM(nn.LSTM):
        def forward(self, x, hx=None):
            return super().forward(x * 2, hx)

    with pytest.raises(UnsupportedModuleError, match="module 'rnn' \\(MyLSTM\\) overrides forward"):
        holder = nn.Module()
        holder.rnn = MyLSTM(2, 2)
        with gradflow.record(holder):
            pass
    assert "forward" not in holder.rnn.__dict__
    with pytest.raises(UnsupportedModuleError, match="input feature size 7 != input_size 3"):
        with gradflow.record(m):
            m(torch.randn(5, 2, 7))
    for exc in [NoRecurrentModuleError, UnsupportedModuleError]:
        assert issubclass(exc, GradflowError)


def test_modules_selection():
    m = Mixed()
    with gradflow.record(m, modules=["cell"], keep="norms") as rec:
        m(torch.randn(4, 2, 3)).sum().backward()
    assert {k.module for k in rec.trace.keys()} == {"cell"}
    with gradflow.record(m, modules=m.lstm) as rec:
        m(torch.randn(4, 2, 3)).sum().backward()
    assert {k.module for k in rec.trace.keys()} == {"lstm"}


def test_nonfinite_gradients_are_located():
    m = nn.RNN(2, 3)
    x = torch.randn(4, 2, 2)
    w = torch.ones(4, 2, 3)
    w[2, 1, 0] = float("inf")
    with gradflow.record(m, keep="full") as rec:
        out, _ = m(x)
        (out * w).sum().backward()
    bad = rec.trace.nonfinite()
    assert set(map(tuple, bad[["t", "b"]].values.tolist())) >= {(2, 1)}
    assert (bad["t"] <= 2).all()  # nothing after the Inf's position is affected


def test_callback_and_keep_traces_false():
    got = []
    m = nn.GRU(2, 3)
    with gradflow.record(m, callback=got.append, keep_traces=False) as rec:
        m(torch.randn(3, 1, 2))[0].sum().backward()
    assert len(got) == 1 and rec.traces == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    m = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 3)
    with gradflow.record(m, keep="full") as rec:
        m(x)[0].sum().backward()
    mc = m.cuda()
    with gradflow.record(mc, keep="full") as recc:
        mc(x.cuda())[0].sum().backward()
    for k in rec.trace.keys():
        torch.testing.assert_close(recc.trace.grad(k), rec.trace.grad(k), rtol=1e-4, atol=1e-5)


def test_recording_continues_after_a_failed_backward():
    m = nn.GRU(2, 3)

    class Boom(Exception):
        pass

    with gradflow.record(m) as rec:
        out, _ = m(torch.randn(4, 2, 2))
        out.register_hook(lambda g: (_ for _ in ()).throw(Boom()))
        with pytest.raises((Boom, RuntimeError)):
            out.sum().backward()
        out, _ = m(torch.randn(5, 2, 2))
        out.sum().backward()
    assert len(rec.traces) == 1 and rec.trace.shape("<root>/l0/d0/h") == (5, 2)
