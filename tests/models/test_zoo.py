"""The cell zoo: parameter counts against the closed form, initialisations, shapes, errors, recording."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradflow
from gradflow.errors import TaskError
from gradflow.models import count_parameters, expected_param_count, get_model, list_cells, model_for_task
from gradflow.tasks import get_task

# (cell, input F, hidden H, layers, outputs C, hand-computed total)
# fused: per layer G*H*(F_l + H) + 2*G*H, G = 1 (RNN), 4 (LSTM), 3 (GRU); MGU: 2*H*(F_l + H) + 2*H
COUNTS = [
    ("rnn_tanh", 3, 5, 1, 2, 1 * 5 * (3 + 5) + 2 * 5 + 5 * 2 + 2),
    ("rnn_relu", 3, 5, 2, 2, (5 * 8 + 10) + (5 * 10 + 10) + 12),
    ("irnn", 7, 4, 1, 1, 4 * 11 + 8 + 4 + 1),
    ("lstm", 3, 5, 1, 2, 4 * 5 * 8 + 2 * 4 * 5 + 12),
    ("lstm", 3, 5, 3, 2, (4 * 5 * 8 + 40) + 2 * (4 * 5 * 10 + 40) + 12),
    ("gru", 3, 5, 1, 2, 3 * 5 * 8 + 2 * 3 * 5 + 12),
    ("gru", 10, 16, 2, 4, (3 * 16 * 26 + 96) + (3 * 16 * 32 + 96) + 16 * 4 + 4),
    ("mgu", 3, 5, 1, 2, 2 * 5 * 8 + 2 * 5 + 12),
    ("mgu", 3, 5, 2, 2, (2 * 5 * 8 + 10) + (2 * 5 * 10 + 10) + 12),
    # minGRU: 2H·F_l + 2H; minLSTM: 3H·F_l + 3H; IndRNN: H·F_l + H (u) + H (b);
    # LRU (N = H): 3N (ν, θ, γ) + 2N·F_l (B) + 2H·N (C) + H·F_l (D)
    ("mingru", 3, 5, 1, 2, 2 * 5 * 3 + 10 + 12),
    ("mingru", 3, 5, 2, 2, (2 * 5 * 3 + 10) + (2 * 5 * 5 + 10) + 12),
    ("minlstm", 3, 5, 1, 2, 3 * 5 * 3 + 15 + 12),
    ("indrnn", 3, 5, 2, 2, (5 * 3 + 5 + 5) + (5 * 5 + 5 + 5) + 12),
    ("lru", 3, 5, 1, 2, 15 + 2 * 5 * 3 + 2 * 5 * 5 + 5 * 3 + 12),
    ("lru", 3, 5, 2, 2, (15 + 30 + 50 + 15) + (15 + 50 + 50 + 25) + 12),
]


@pytest.mark.parametrize("cell,F,H,L,C,total", COUNTS)
def test_parameter_counts(cell, F, H, L, C, total):
    m = get_model(cell, input_size=F, output_size=C, hidden=H, layers=L)
    counts = count_parameters(m)
    assert counts["total"] == total == expected_param_count(cell, F, H, L, C)
    assert counts["recurrent"] == expected_param_count(cell, F, H, L)
    assert counts["readout"] == H * C + C
    assert m.describe()["n_params"] == total


def test_every_cell_is_counted():
    assert {c[0] for c in COUNTS} == set(list_cells())


@pytest.mark.parametrize("cell", ["rnn_tanh", "lstm", "gru", "mgu"])
@pytest.mark.parametrize("gain", [0.5, 1.0, 1.7])
def test_orthogonal_and_identity_init(cell, gain):
    m = get_model(cell, input_size=3, output_size=2, hidden=6, layers=2, init="orthogonal", gain=gain, seed=0)
    blocks = m.recurrent_blocks()
    assert len(blocks) == 2 * {"rnn_tanh": 1, "lstm": 4, "gru": 3, "mgu": 2}[cell]
    for W in blocks:
        torch.testing.assert_close(W @ W.T, gain ** 2 * torch.eye(6), atol=1e-5, rtol=0)
    m = get_model(cell, input_size=3, output_size=2, hidden=6, layers=2, init="identity", gain=gain)
    for W in m.recurrent_blocks():
        assert torch.equal(W, gain * torch.eye(6))


@pytest.mark.parametrize("gain", [0.8, 2.0])
def test_gaussian_init(gain):
    H = 200
    m = get_model("rnn_relu", input_size=2, output_size=1, hidden=H, init="gaussian", gain=gain, seed=1)
    W = m.rnn.weight_hh_l0.detach().double()
    assert float(W.mean()) == pytest.approx(0.0, abs=4 * gain / math.sqrt(H) / H)
    assert float(W.std()) == pytest.approx(gain / math.sqrt(H), rel=0.03)
    radius = float(np.abs(np.linalg.eigvals(W.numpy())).max())  # circular law: spectral radius ~ gain
    assert radius == pytest.approx(gain, rel=0.1)


def test_default_init_is_pytorchs():
    H = 8
    m = get_model("gru", input_size=3, output_size=2, hidden=H, seed=0)
    W = m.rnn.weight_hh_l0.detach()
    assert float(W.abs().max()) <= 1 / math.sqrt(H) and m.init == "default"


def test_irnn_and_forget_bias():
    m = get_model("irnn", input_size=3, output_size=2, hidden=5, layers=2)
    assert m.init == "identity" and m.rnn.nonlinearity == "relu"
    for layer in range(2):
        assert torch.equal(getattr(m.rnn, f"weight_hh_l{layer}"), torch.eye(5))
        assert not getattr(m.rnn, f"bias_ih_l{layer}").any() and not getattr(m.rnn, f"bias_hh_l{layer}").any()
    m = get_model("lstm", input_size=3, output_size=2, hidden=5, layers=2, forget_bias=2.0, seed=0)
    for layer in range(2):
        b = getattr(m.rnn, f"bias_ih_l{layer}") + getattr(m.rnn, f"bias_hh_l{layer}")
        assert torch.equal(b[5:10], torch.full((5,), 2.0))  # gate order i, f, g, o
        assert not torch.equal(b[:5], torch.full((5,), 2.0))


# (cell, task, readout, output shape)
SHAPES = [
    ("rnn_tanh", ("checksum", dict(T=7)), (4, 4)),
    ("lstm", ("copy_memory", dict(T=3)), (23, 4, 9)),
    ("gru", ("adding", dict(T=9)), (4, 1)),
    ("mgu", ("eeg", dict(T=6)), (6, 4, 4)),
    ("irnn", ("temporal_order", dict(T=20, bits=3)), (4, 8)),
    ("mingru", ("checksum", dict(T=7)), (4, 4)),
    ("minlstm", ("copy_memory", dict(T=3)), (23, 4, 9)),
    ("indrnn", ("adding", dict(T=9)), (4, 1)),
    ("lru", ("eeg", dict(T=6)), (6, 4, 4)),
]


@pytest.mark.parametrize("cell,task,shape", SHAPES)
def test_model_for_task_shapes(cell, task, shape):
    t = get_task(task[0], **task[1])
    m = model_for_task(t, cell, hidden=8, layers=2, dropout=0.1, seed=0)
    b = t.sample(4, seed=0)
    out = m(b.x)
    assert tuple(out.shape) == shape
    assert torch.isfinite(t.loss(out, b.y))
    m.eval()
    assert torch.equal(m(b.x), m(b.x))  # dropout is off in eval mode


def test_seed_reproduces_init_and_leaves_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = get_model("lstm", input_size=3, output_size=2, hidden=4, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = get_model("lstm", input_size=3, output_size=2, hidden=4, seed=5)
    c = get_model("lstm", input_size=3, output_size=2, hidden=4, seed=6)
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
        assert not torch.equal(p, r), n


ERRORS = [
    (dict(cell="lstn"), "did you mean 'lstm'"),
    (dict(cell="tanh"), "did you mean 'rnn_tanh'"),
    (dict(cell="gru", forget_bias=1.0), "forget_bias applies to cell='lstm' only"),
    (dict(cell="gru", gain=2.0), "needs init='orthogonal'"),
    (dict(cell="gru", init="orthogonl"), "did you mean 'orthogonal'"),
    (dict(cell="irnn", init="gaussian"), "use cell='rnn_relu'"),
    (dict(cell="gru", readout="first"), "readout='first'"),
    (dict(cell="gru", hidden=0), "hidden must be an integer >= 1"),
    (dict(cell="gru", dropout=1.0), "dropout must be in [0, 1)"),
    (dict(cell="gru", init="gaussian", gain=-1.0), "gain must be a positive number"),
    (dict(cell="mingru", init="orthogonal"), "init='orthogonal' does not apply"),
    (dict(cell="indrnn", init="gaussian", gain=2.0), "inits: default, identity"),
    (dict(cell="gru", r_max=0.9), "r_max applies to cell='lru' only"),
    (dict(cell="lru", r_min=0.9, r_max=0.5), "0 <= r_min < r_max <= 1"),
    (dict(cell="lru", activation="relu"), "activation='relu' is not one of gelu, none"),
    (dict(cell="lru", max_phase=0.0), "max_phase=0.0 must be > 0"),
]


@pytest.mark.parametrize("opts,fragment", ERRORS)
def test_one_line_errors(opts, fragment):
    opts = dict(opts)
    cell = opts.pop("cell")
    with pytest.raises(TaskError) as exc:
        get_model(cell, input_size=3, output_size=2, **opts)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_model_for_task_refuses_sizes():
    with pytest.raises(TaskError, match="set by the task"):
        model_for_task(get_task("checksum"), "gru", output_size=3)


# ------------------------------------------------------------------------------------ recording
@pytest.mark.parametrize("cell,keys", [
    ("rnn_tanh", ["rnn/l0/d0/h", "rnn/l1/d0/h"]),
    ("irnn", ["rnn/l0/d0/h", "rnn/l1/d0/h"]),
    ("lstm", ["rnn/l0/d0/h", "rnn/l0/d0/c", "rnn/l1/d0/h", "rnn/l1/d0/c"]),
    ("gru", ["rnn/l0/d0/h", "rnn/l1/d0/h"]),
    ("mgu", ["rnn.cells.0/l0/d0/h", "rnn.cells.1/l0/d0/h"]),
    ("mingru", ["rnn/l0/d0/h", "rnn/l1/d0/h"]),
    ("minlstm", ["rnn/l0/d0/h", "rnn/l1/d0/h"]),
    ("indrnn", ["rnn/l0/d0/h", "rnn/l1/d0/h"]),
    ("lru", ["rnn/l0/d0/h", "rnn/l1/d0/h"]),
])
def test_every_cell_is_recorded(cell, keys):
    t = get_task("checksum", T=9)
    m = model_for_task(t, cell, hidden=6, layers=2, seed=0)
    b = t.sample(3, seed=0)
    with gradflow.record(m, keep="norms") as rec:
        t.loss(m(b.x), b.y).backward()
    assert sorted(str(k) for k in rec.trace.keys()) == sorted(keys)
    for k in rec.trace.keys():
        n = rec.trace.norm(k)
        assert n.shape == (9, 3) and torch.isfinite(n).all() and float(n.max()) > 0
    if cell == "lstm":  # c_{T-1} reaches the loss only through h_{T-1} of its own step: excluded
        assert not rec.trace.norm("rnn/l0/d0/c")[-1].any()


def test_mgu_recorded_gradient_is_the_total_derivative():
    """dL/dh_t recorded for the custom cell equals h_t.grad of an explicit unroll (float64)."""
    torch.manual_seed(0)
    t = get_task("adding", T=6)
    m = model_for_task(t, "mgu", hidden=4, seed=0).double()
    b = t.sample(3, seed=0)
    x, y = b.x.double(), b.y.double()
    with gradflow.record(m, keep="full") as rec:
        t.loss(m(x), y).backward()
    got = rec.trace.grad("rnn.cells.0/l0/d0/h")
    cell = m.rnn.cells[0]
    h = torch.zeros(3, 4, dtype=torch.float64)
    hs = []
    for step in range(6):
        h = cell(x[step], h)
        h.retain_grad()
        hs.append(h)
    t.loss(m.head(h), y).backward()
    want = torch.stack([s.grad for s in hs])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert float(want[0].abs().max()) > 0


@pytest.mark.parametrize("r_min,r_max,phase", [(0.0, 1.0, 2 * math.pi), (0.9, 0.999, math.pi / 10)])
def test_lru_ring_initialisation(r_min, r_max, phase):
    """Orvieto et al.'s ring init: |λ| = exp(−exp(ν)) in [r_min, r_max], uniform in the ring's area
    (|λ|² uniform), phase exp(θ) in [0, max_phase], γ = √(1 − |λ|²)."""
    m = get_model("lru", input_size=2, output_size=1, hidden=400, r_min=r_min, r_max=r_max, max_phase=phase, seed=0)
    assert m.describe()["options"] == {"r_min": r_min, "r_max": r_max, "max_phase": phase, "activation": "gelu"}
    assert m.describe()["kind"] == "lru"
    mod = torch.exp(-torch.exp(m.rnn.nu_log_l0.detach().double()))
    assert float(mod.min()) >= r_min and float(mod.max()) <= r_max
    r2 = (mod ** 2 - r_min ** 2) / (r_max ** 2 - r_min ** 2)  # U(0, 1) under the ring init
    assert float(r2.mean()) == pytest.approx(0.5, abs=0.05)
    th = torch.exp(m.rnn.theta_log_l0.detach().double())
    assert float(th.min()) >= 0 and float(th.max()) <= phase and float(th.mean()) == pytest.approx(phase / 2, rel=0.1)
    torch.testing.assert_close(torch.exp(m.rnn.gamma_log_l0.detach().double()), torch.sqrt(1 - mod ** 2),
                               rtol=1e-5, atol=1e-6)


def test_indrnn_recurrent_weights_and_identity_init():
    m = get_model("indrnn", input_size=3, output_size=2, hidden=50, layers=2, seed=0)
    for u in m.recurrent_blocks():
        assert u.shape == (50,) and float(u.min()) >= 0 and float(u.max()) <= 1
    m = get_model("indrnn", input_size=3, output_size=2, hidden=5, layers=2, init="identity", gain=0.9)
    for u in m.recurrent_blocks():
        assert torch.equal(u, torch.full((5,), 0.9))
