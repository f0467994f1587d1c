"""first_nonfinite locates an injected Inf exactly (module, layer, direction, state, t, b)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import gradflow
from gradflow.integrations.faults import first_nonfinite, nonfinite_count

T, B, F = 8, 3, 2


def _weighted_loss(out, t0, b0):
    w = torch.ones(out.shape[0], out.shape[1], 1, dtype=out.dtype)
    w[t0, b0] = math.inf
    return (w * out).sum()


@pytest.mark.parametrize("t0,b0", [(5, 1), (0, 2), (T - 1, 0)])
def test_inf_loss_weight_bidirectional_lstm(t0, b0):
    torch.manual_seed(0)
    m = nn.LSTM(F, 4, num_layers=2, bidirectional=True)
    with gradflow.record(m) as rec:
        out, _ = m(torch.randn(T, B, F))
        _weighted_loss(out, t0, b0).backward()
    rec.trace.meta["step"] = 7
    f = first_nonfinite(rec.trace)
    # the direct gradient of the top layer's output at (t0, b0) is infinite; in direction 0 the
    # backward reaches t0 after T-1-t0 steps, in direction 1 after t0
    d = 0 if T - 1 - t0 <= t0 else 1
    assert (f["module"], f["layer"], f["direction"], f["state"], f["t"], f["b"]) == ("", 1, d, "h", t0, b0)
    assert f["batch_items"] == [b0] and not math.isfinite(f["value"]) and f["step"] == 7
    assert f["count"] == nonfinite_count(rec.trace) > 1  # it spread to earlier steps and the lower layer


def test_two_modules_with_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.GRU(F, 4)
            self.dec = nn.RNN(4, 3)

        def forward(self, x):
            return self.dec(self.enc(x)[0])[0]

    torch.manual_seed(0)
    net = Net()
    with gradflow.record(net) as rec:
        _weighted_loss(net(torch.randn(T, B, F)), 3, 2).backward()
    # enc is reached too (same t), but dec is nearer the loss
    f = first_nonfinite(rec.trace, order=net)
    assert (f["module"], f["layer"], f["direction"], f["t"], f["b"]) == ("dec", 0, 0, 3, 2)
    assert first_nonfinite(rec.trace, order=["dec", "enc"])["module"] == "dec"
    assert first_nonfinite(rec.trace, order=["enc"])["module"] == "enc"


def test_finite_and_masked_steps_are_not_faults():
    torch.manual_seed(0)
    m = nn.GRU(F, 4)
    x = pack_padded_sequence(torch.randn(T, B, F), torch.tensor([T, 5, 2]), enforce_sorted=False)
    with gradflow.record(m) as rec:
        out, h = m(x)
        h.sum().backward()
    assert bool(rec.trace.norm(rec.trace.keys()[0]).isnan().any())  # masked steps are NaN
    assert first_nonfinite(rec.trace) is None and nonfinite_count(rec.trace) == 0


def test_cell_loop():
    torch.manual_seed(0)
    cell = nn.LSTMCell(F, 4)
    h = c = torch.zeros(B, 4)
    outs = []
    with gradflow.record(cell) as rec:
        for x in torch.randn(T, B, F):
            h, c = cell(x, (h, c))
            outs.append(h)
        _weighted_loss(torch.stack(outs), 4, 0).backward()
    f = first_nonfinite(rec.trace)
    assert (f["module"], f["state"], f["t"], f["b"]) == ("", "h", 4, 0)
