"""Cells in Python loops, user cells and mixed models against probe references.

Each model's forward takes ``probe``: None (normal run, used under gradflow.record) or a callable
``probe(name, t, state) -> state`` that adds a zero tensor requiring grad to every state after each
step (the reference: dL/d probe = total dL/ds_t, computed with autograd.grad, no hooks).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import gradflow
from gradflow.trace import StateKey
from tests.reference import cell_step, fused_params


class Probes:
    def __init__(self):
        self.p = {}

    def __call__(self, path, t, states):
        out = []
        for name, s in zip(("h", "c"), states):
            q = torch.zeros_like(s, requires_grad=True)
            self.p[(path, name, t)] = q
            out.append(s + q)
        return tuple(out)

    def grads(self, loss):
        keys = list(self.p)
        gs = torch.autograd.grad(loss, [self.p[k] for k in keys], allow_unused=True)
        res = {}
        for (path, name, t), g in zip(keys, gs):
            res.setdefault((path, name), {})[t] = torch.zeros_like(self.p[(path, name, t)]) if g is None else g
        return {k: torch.stack([v[t] for t in sorted(v)]) for k, v in res.items()}


def make_cell(kind, F, H):
    if kind == "lstm":
        return nn.LSTMCell(F, H)
    if kind == "gru":
        return nn.GRUCell(F, H)
    return nn.RNNCell(F, H, nonlinearity=kind.split("_")[1])


class Stacked(nn.Module):
    """Stacked cells; with feedback=True the readout of the top layer is fed back as the next input."""

    def __init__(self, kind, layers, F, H, feedback=False):
        super().__init__()
        self.kind = kind
        self.cells = nn.ModuleList(make_cell(kind, F if i == 0 else H, H) for i in range(layers))
        self.readout = nn.Linear(H, F)
        self.feedback = feedback

    def forward(self, x, probe=None):
        T, B, _ = x.shape
        states = [None] * len(self.cells)
        ys = []
        inp = x[0]
        for t in range(T):
            for i, cell in enumerate(self.cells):
                s = cell(inp, states[i])
                s = s if isinstance(s, tuple) else (s,)
                if probe is not None:
                    s = probe(f"cells.{i}", t, s)
                states[i] = s if self.kind == "lstm" else s[0]
                inp = s[0]
            y = self.readout(inp)
            ys.append(y)
            inp = y if (self.feedback and t + 1 < T) else (x[t + 1] if t + 1 < T else None)
        return torch.stack(ys)


class IndRNNCell(nn.Module):
    """A user cell as a user would write it: h' = relu(W x + u ⊙ h + b)."""

    def __init__(self, F, H):
        super().__init__()
        self.inp = nn.Linear(F, H)
        self.u = nn.Parameter(torch.rand(H) * 1.5)

    def forward(self, x, h=None):
        if h is None:
            h = x.new_zeros(x.shape[0], self.u.shape[0])
        return torch.relu(self.inp(x) + self.u * h)


class TwoStateCell(nn.Module):
    """A user cell with a tuple state (fast, slow) returned as a dict-free tuple."""

    def __init__(self, F, H):
        super().__init__()
        self.a = nn.Linear(F + H, H)
        self.b = nn.Linear(H, H)

    def forward(self, x, state):
        fast, slow = state
        new_fast = torch.tanh(self.a(torch.cat([x, fast], -1)) + slow)
        new_slow = 0.9 * slow + 0.1 * torch.tanh(self.b(new_fast))
        return new_fast, new_slow


class UserLoop(nn.Module):
    def __init__(self, cell, F, H, states=1):
        super().__init__()
        self.cell = cell
        self.nstates = states
        self.head = nn.Linear(H, 1)
        self.H = H

    def forward(self, x, probe=None):
        T, B, _ = x.shape
        st = None if self.nstates == 1 else (x.new_zeros(B, self.H), x.new_zeros(B, self.H))
        outs = []
        for t in range(T):
            st = self.cell(x[t], st)
            s = st if isinstance(st, tuple) else (st,)
            if probe is not None:
                s = probe("cell", t, s)
            st = s if self.nstates > 1 else s[0]
            outs.append(self.head(s[0]))
        return torch.stack(outs)


class EncDec(nn.Module):
    """Fused GRU encoder, LSTMCell decoder started from the encoder's last state."""

    def __init__(self, F, H):
        super().__init__()
        self.enc = nn.GRU(F, H)
        self.dec = nn.LSTMCell(F, H)
        self.out = nn.Linear(H, F)

    def forward(self, x, y, probe=None):
        if probe is None:
            _, h = self.enc(x)
            h = h[0]
        else:  # explicit unroll of the encoder from its parameters (reference)
            p = fused_params(self.enc, 0, 0)
            h = x.new_zeros(x.shape[1], self.enc.hidden_size)
            for t in range(x.shape[0]):
                h = torch.stack([cell_step("gru", x[t, b], (h[b],), p)[0] for b in range(x.shape[1])])
                (h,) = probe("enc", t, (h,))
        s = (h, torch.zeros_like(h))
        outs = []
        for t in range(y.shape[0]):
            s = self.dec(y[t], s)
            if probe is not None:
                s = probe("dec", t, s)
            outs.append(self.out(s[0]))
        return torch.stack(outs)


@dataclasses.dataclass(frozen=True)
class CellCase:
    name: str
    build: object
    keys: tuple  # (trace module path, probe path, state)


def _stacked(kind, layers, feedback=False):
    return lambda: Stacked(kind, layers, 3, 4, feedback)


CASES = [
    CellCase("rnn_tanh", _stacked("rnn_tanh", 1), (("cells.0", "cells.0", "h"),)),
    CellCase("rnn_relu", _stacked("rnn_relu", 1), (("cells.0", "cells.0", "h"),)),
    CellCase("gru-stacked", _stacked("gru", 2), (("cells.0", "cells.0", "h"), ("cells.1", "cells.1", "h"))),
    CellCase("lstm-stacked", _stacked("lstm", 2), tuple((f"cells.{i}", f"cells.{i}", s) for i in range(2) for s in "hc")),
    CellCase("lstm-feedback", _stacked("lstm", 1, True), (("cells.0", "cells.0", "h"), ("cells.0", "cells.0", "c"))),
    CellCase("gru-feedback", _stacked("gru", 2, True), (("cells.0", "cells.0", "h"), ("cells.1", "cells.1", "h"))),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cells_match_reference(case):
    torch.manual_seed(0)
    m = case.build().double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    w = torch.randn(5, 2, 3, dtype=torch.float64)
    pr = Probes()
    ref = pr.grads((w * m(x, probe=pr)).sum())
    with gradflow.record(m, keep="full") as rec:
        (w * m(x)).sum().backward()
    for path, ppath, s in case.keys:
        torch.testing.assert_close(rec.trace.grad(StateKey(path, state=s)), ref[(ppath, s)], rtol=1e-10, atol=1e-12)
    assert len(rec.trace.keys()) == len(case.keys)


@pytest.fixture
def registered():
    gradflow.register_cell(IndRNNCell, states=("h",))
    gradflow.register_cell(TwoStateCell, states=("fast", "slow"))
    yield
    gradflow.unregister_cell(IndRNNCell)
    gradflow.unregister_cell(TwoStateCell)


@pytest.mark.parametrize("two", [False, True])
def test_custom_cell_matches_reference(registered, two):
    torch.manual_seed(1)
    m = (UserLoop(TwoStateCell(3, 4), 3, 4, states=2) if two else UserLoop(IndRNNCell(3, 4), 3, 4)).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    pr = Probes()
    ref = pr.grads(m(x, probe=pr).pow(2).sum())
    with gradflow.record(m, keep="states") as rec:
        m(x).pow(2).sum().backward()
    names = ("fast", "slow") if two else ("h",)
    for pname, name in zip(("h", "c"), names):
        key = StateKey("cell", state=name)
        torch.testing.assert_close(rec.trace.grad(key), ref[("cell", pname)], rtol=1e-10, atol=1e-12)
    key = StateKey("cell", state=names[0])
    info = rec.trace.cell(key)
    assert info.kind == "custom" and info.states == names
    # the step function reproduces the recorded states from the recorded inputs and previous states
    step = rec.trace.step_function(key)
    x_t = rec.trace.inputs(key)[2]
    prev = tuple(rec.trace.prev_states(StateKey("cell", state=n))[2] for n in names)
    new = step(x_t, prev)
    for n, v in zip(names, new):
        torch.testing.assert_close(v, rec.trace.states(StateKey("cell", state=n))[2])


def test_custom_cell_decorator_and_bad_registration():
    @gradflow.register_cell(states=("h",))
    class C(nn.Module):
        def forward(self, x, h):
            return x if h is None else x + h

    try:
        m = UserLoop(C(), 3, 3)
        assert gradflow.find_recurrent(m)[0][0] == "cell"
    finally:
        gradflow.unregister_cell(C)
    with pytest.raises(gradflow.GradflowError, match="states must be distinct"):
        gradflow.register_cell(IndRNNCell, states=("h", "h"))
    with pytest.raises(gradflow.GradflowError, match="nn.Module subclass"):
        gradflow.register_cell(int)


def test_encoder_decoder():
    torch.manual_seed(2)
    m = EncDec(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    y = torch.randn(4, 2, 3, dtype=torch.float64)
    pr = Probes()
    ref = pr.grads(m(x, y, probe=pr).pow(2).sum())
    with gradflow.record(m, keep="full") as rec:
        m(x, y).pow(2).sum().backward()
    assert [str(k) for k in rec.trace.keys()] == ["enc/l0/d0/h", "dec/l0/d0/h", "dec/l0/d0/c"]
    torch.testing.assert_close(rec.trace.grad("enc/l0/d0/h"), ref[("enc", "h")], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rec.trace.grad("dec/l0/d0/h"), ref[("dec", "h")], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rec.trace.grad("dec/l0/d0/c"), ref[("dec", "c")], rtol=1e-10, atol=1e-12)


def test_lstmcell_c_excludes_same_step_h_path():
    """A plain hook on LSTMCell's c output would also see the path through h_t = o·tanh(c_t)."""
    torch.manual_seed(3)
    cell = nn.LSTMCell(2, 3).double()
    x = torch.randn(1, 2, dtype=torch.float64)
    with gradflow.record(cell, keep="full") as rec:
        h, c = cell(x)
        h.sum().backward()  # loss reads h only: dL/dc_t (c as its own coordinate) is 0
    assert torch.all(rec.trace.grad("<root>/l0/d0/c") == 0)
    assert torch.all(rec.trace.grad("<root>/l0/d0/h") == 1)
