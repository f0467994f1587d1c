"""Recording never makes a result silently wrong and differs from plain torch only where it must (issue 12,
items 2, 9, 10): double backward through a recorded fused module raises every time, copying/saving a
recorded model gives a plain model, empty batches and meta tensors behave as in torch, and the calls of a
cell are its separate loops."""

from __future__ import annotations

import copy
import dataclasses
import gc
import io
import pickle
import weakref

import pytest
import torch
from torch import nn

import gradflow
from gradflow.errors import GradflowError, UnsupportedModuleError
from gradflow.trace import StateKey
from tests.recording.test_cells import Probes
from tests.recording.test_fused import KINDS, Case, build
from tests.recording.test_lifecycle import assert_clean, global_hooks, snapshot


# ---------------------------------------------------------------------- item 2: double backward
def _penalty_grads(m, x, loss_kind, how):
    """A gradient-penalty step: L + Σ_p ||dL/dp||², its parameter gradients left in .grad."""
    out = m(x)[0]
    loss = out.sum() if loss_kind == "constant" else (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).pow(2).sum()
    params = [p for p in m.parameters()]
    if how == "grad":
        gs = torch.autograd.grad(loss, params, create_graph=True)
        (loss + sum(g.pow(2).sum() for g in gs)).backward()
    else:
        loss.backward(create_graph=True)
        pen = sum(p.grad.pow(2).sum() for p in params)
        for p in params:  # keep d(L + pen)/dp from both terms: the first-order grad is in .grad already
            p.grad = p.grad.detach()
        pen.backward()


class CellLoop(nn.Module):
    """An nn.*Cell run over the sequence in a Python loop (ordinary autograd: double backward works)."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        s, outs = None, []
        for t in range(x.shape[0]):
            s = self.cell(x[t], s)
            outs.append(s[0] if isinstance(s, tuple) else s)
        return torch.stack(outs), s


FUSED = [Case(kind=k) for k in KINDS] + [Case(kind="lstm", layers=2, bidirectional=True)]
CELLS = {"lstmcell": lambda: nn.LSTMCell(3, 4), "grucell": lambda: nn.GRUCell(3, 4),
         "rnncell": lambda: nn.RNNCell(3, 4)}


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("how", ["grad", "backward"])
@pytest.mark.parametrize("loss_kind", ["constant", "general"])
@pytest.mark.parametrize("case", FUSED, ids=lambda c: f"{c.kind}-L{c.layers}{'-bi' if c.bidirectional else ''}")
def test_double_backward_through_fused_module_raises_every_time(case, loss_kind, how):
    """The penalty term would be dropped (constant dL/d out) or fail later with torch's message: instead the
    first create_graph backward through the recording kernel raises one GradflowError naming create_graph,
    and leaves no parameter gradient in the recorded module."""
    m = build(case)
    x = torch.randn(case.T, case.B, case.F, dtype=case.dtype)
    with gradflow.record(m, keep="full") as rec:
        with pytest.raises(UnsupportedModuleError, match=r"module '<root>'.*create_graph=True") as err:
            _penalty_grads(m, x, loss_kind, how)
        assert "\n" not in str(err.value)
        assert all(p.grad is None for p in m.parameters())
        # the recorder goes on recording ordinary backward passes
        out = m(x)[0]
        out.pow(2).sum().backward()
        assert rec.trace.shape(StateKey("", state="h")) == (case.T, case.B)
    # outside record() the module is plain torch again: double backward works where torch supports it
    if case.kind in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        m.zero_grad()
        _penalty_grads(m, x, loss_kind, how)
        assert all(p.grad is not None for p in m.parameters())


def test_double_backward_after_exit_of_a_graph_built_inside_raises():
    """The graph built inside record() holds the recording kernel after exit too: still no silent drop."""
    m = build(Case(kind="lstm"))
    x = torch.randn(5, 3, 3, dtype=torch.float64)
    with gradflow.record(m):
        out = m(x)[0]
    with pytest.raises(UnsupportedModuleError, match="create_graph=True"):
        torch.autograd.grad(out.sum(), list(m.parameters()), create_graph=True)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_double_backward_message_names_the_module_path():
    m = nn.Sequential(nn.Linear(3, 3), nn.GRU(3, 4)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with gradflow.record(m):
        out = m(x)[0]
        with pytest.raises(UnsupportedModuleError, match=r"module '1'.*create_graph=True"):
            out.sum().backward(create_graph=True)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("how", ["grad", "backward"])
@pytest.mark.parametrize("loss_kind", ["constant", "general"])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_double_backward_through_recorded_cells_is_exact(name, loss_kind, how):
    """Cells run torch's own autograd: the gradient penalty's parameter gradients equal the plain model's."""
    torch.manual_seed(0)
    m = CellLoop(CELLS[name]()).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    _penalty_grads(m, x, loss_kind, how)
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    with gradflow.record(m):
        _penalty_grads(m, x, loss_kind, how)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, plain[n], rtol=1e-12, atol=1e-12, msg=n)
