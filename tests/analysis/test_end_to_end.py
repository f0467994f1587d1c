"""Traces recorded by gradflow.record(keep='states') on real nn.RNN/LSTM/GRU modules and gradflow's own
minGRU, minLSTM, IndRNN and LRU layers."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import gradflow
from gradflow.analysis import direct_gradients, jacobians, joint_gradient
from gradflow.kinds.indrnn import IndRNN
from gradflow.kinds.lru import LRU
from gradflow.kinds.mingru import MinGRU
from gradflow.kinds.minlstm import MinLSTM
from tests.reference import cell_output, fused_params

from . import helpers as h

MODELS = [
    ("lstm", lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2)),
    ("lstm", lambda: nn.LSTM(3, 4, bias=False)),
    ("gru", lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True)),
    ("rnn_relu", lambda: nn.RNN(3, 4, nonlinearity="relu")),
    ("rnn_tanh", lambda: nn.RNN(3, 4, bidirectional=True, bias=False)),
    ("mingru", lambda: MinGRU(3, 4, num_layers=2, bidirectional=True)),
    ("minlstm", lambda: MinLSTM(3, 4, bias=False)),
    ("indrnn", lambda: IndRNN(3, 4, num_layers=2)),
    ("lru", lambda: LRU(3, 4, num_layers=2, bidirectional=True, r_min=0.5, r_max=0.99)),
]


def module_params(m, layer, direction):
    return {n: v.detach() for n, v in fused_params(m, layer, direction).items()}


@pytest.mark.parametrize("kind,make", MODELS, ids=[f"{k}{i}" for i, (k, _) in enumerate(MODELS)])
@pytest.mark.parametrize("packed", [False, True])
def test_recorded_jacobians_and_total_derivative(kind, make, packed):
    torch.manual_seed(0)
    m = make().double()
    T, B = 5, 3
    x = torch.randn(T, B, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 4])
    with gradflow.record(m, keep="states") as rec:
        if packed:
            out, _ = m(pack_padded_sequence(x, lengths, enforce_sorted=False))
            out, _ = pad_packed_sequence(out, total_length=T)
        else:
            out, _ = m(x)
        w = torch.randn_like(out)
        (w * out).sum().backward()
    tr = rec.trace
    D = 2 if m.bidirectional else 1
    top = m.num_layers - 1
    for key in tr.keys(state="h"):
        p = module_params(m, key.layer, key.direction)
        step = lambda xt, s, p=p: h.step(kind, p, xt, s)  # noqa: E731
        prevs = tuple(tr.prev_states(k) for k in ([key, key.with_state("c")] if kind == "lstm" else [key]))
        want = h.autograd_jacobians(step, tr.inputs(key), prevs)
        mask = tr.mask(key)
        want[~mask] = torch.eye(want.shape[-1], dtype=want.dtype)
        J = jacobians(tr, key)
        assert torch.allclose(J, want, atol=1e-10, rtol=0), key
        if key.layer != top:
            continue
        # the top layer's only direct gradient is w (its output block) pulled back through the output
        # (w itself where the output is the state): δ_t = direct_t + J_next(t)ᵀ δ_next(t)
        P = tr.grad(key).shape[-1]
        O = out.shape[-1] // D
        S = tr.states(key).clone().requires_grad_()
        y = cell_output(kind, tr.inputs(key), (S,), p, getattr(m, "activation", None))
        wb = w[..., key.direction * O:(key.direction + 1) * O] * mask[..., None]
        direct = torch.zeros_like(joint_gradient(tr, key))
        direct[..., :P] = torch.autograd.grad((wb * y).sum(), S)[0]
        assert torch.allclose(direct_gradients(tr, key)[mask], direct[mask], atol=1e-10)
        delta = torch.nan_to_num(joint_gradient(tr, key))
        for t in range(T):
            nxt = t + 1 if key.direction == 0 else t - 1
            back = J[nxt].mT @ delta[nxt][..., None] if 0 <= nxt < T else 0.0
            rebuilt = direct[t] + (back[..., 0] * mask[nxt][:, None] if 0 <= nxt < T else 0.0)
            assert torch.allclose(rebuilt[mask[t]], delta[t][mask[t]], atol=1e-10), (key, t)
    assert len(tr.keys(state="h")) == m.num_layers * D


class LSTMCellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.LSTMCell(3, 4)

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], 4)
        outs = []
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], (h, c))
            outs.append(h)
        return torch.stack(outs)


def _mgu_loop():
    from gradflow.models.custom import CellLoop, MGUCell

    return CellLoop(MGUCell, 3, 4, num_layers=2)


@pytest.mark.parametrize("make", [LSTMCellLoop, _mgu_loop], ids=["LSTMCell-loop", "custom-MGU"])
def test_cells_in_a_python_loop(make):
    """Cell modules called step by step (built-in LSTMCell: closed form; a registered custom cell:
    torch.func on the recorded step function), checked against autograd of the module itself."""
    torch.manual_seed(1)
    m = make().double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with gradflow.record(m, keep="states") as rec:
        out = m(x)
        w = torch.randn_like(out)
        (w * out).sum().backward()
    tr = rec.trace
    for key in tr.keys(state="h"):
        mod = m.get_submodule(key.module)
        keys = [k for k in tr.keys() if k.unit == key.unit]

        def step(xt, s, mod=mod, n=len(keys)):
            new = mod(xt, tuple(s) if n > 1 else s[0])
            return tuple(new) if isinstance(new, tuple) else (new,)

        want = h.autograd_jacobians(step, tr.inputs(key), tuple(tr.prev_states(k) for k in keys))
        J = jacobians(tr, key)
        assert torch.allclose(J, want, atol=1e-10, rtol=0), key
    top = tr.keys(state="h")[-1]
    g = direct_gradients(tr, top)
    assert torch.allclose(g[..., :4], w, atol=1e-10) and (g[..., 4:] == 0).all()
