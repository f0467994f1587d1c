"""The measured claims of issue 4, on small models with fixed seeds (CPU, one thread).

Each test trains; the settings are listed as data. Learning rates are per cell (each one that
trains that cell within this budget). Seed 0 throughout. Over other seeds, in exploration: the tanh
RNN solved the binary checksum at T = 20 in 3 of 3 seeds (0-2) but at T = 100 only in 2 of 6 (0-5;
Adam rescales its vanishing gradients), while the LSTM (forget bias 5) and GRU solved T = 100 in 3
of 3 (0-2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradflow.training import Clip, Schedule, clipping_experiment, train_task

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------- checksum
CHECKSUM_TASK = dict(n_classes=2, noise=0.5)  # binary label in the first token, half the filler noise
CELLS = {  # cell -> (model options, Adam learning rate)
    "rnn_tanh": (dict(hidden=32), 0.01),
    "lstm": (dict(hidden=32, forget_bias=5.0), 0.003),
    "gru": (dict(hidden=32), 0.05),
}
LENGTHS = (20, 50, 100)


@pytest.fixture(scope="module")
def checksum_runs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = {}
    for T in LENGTHS:
        for cell, (mopts, lr) in CELLS.items():
            runs[cell, T] = train_task(
                "checksum", cell, task_options=dict(T=T, **CHECKSUM_TASK), model_options=mopts, steps=400,
                batch=32, lr=lr, seed=0, schedule=Schedule(steps=(0,)), eval_batch=256, progress=False)
    torch.set_num_threads(threads)
    return runs


def test_checksum_rnn_falls_to_chance_while_gated_cells_stay_near_100(checksum_runs):
    acc = {k: r.eval_metric for k, r in checksum_runs.items()}
    print("\nchecksum eval accuracy:", {f"{c}@T={T}": round(a, 3) for (c, T), a in acc.items()})
    chance = checksum_runs["rnn_tanh", 20].task.chance_metric
    assert chance == 0.5
    assert acc["rnn_tanh", 20] >= 0.99
    assert acc["rnn_tanh", 100] <= chance + 0.05
    assert acc["rnn_tanh", 20] >= acc["rnn_tanh", 50] >= acc["rnn_tanh", 100]
    for cell in ("lstm", "gru"):
        for T in LENGTHS:
            assert acc[cell, T] >= 0.98, (cell, T)


def test_checksum_rnn_gradient_at_the_first_step_vanishes(checksum_runs):
    def log_delta(run, t):  # median over the evaluation batch of log10 ||dL/dh_t||
        n = run.trace.norm("rnn/l0/d0/h")
        return float(torch.log10(n[t]).median())

    rnn, gru = checksum_runs["rnn_tanh", 100], checksum_runs["gru", 100]
    d0 = {c: log_delta(checksum_runs[c, 100], 0) for c in CELLS}
    print("\nlog10 ||delta_0|| at T=100:", {c: round(v, 1) for c, v in d0.items()})
    assert d0["rnn_tanh"] < d0["gru"] - 3  # orders of magnitude below
    # relative to the gradient at the last step (which the loss sets directly): the RNN's decays,
    # the GRU's does not
    assert log_delta(rnn, 0) - log_delta(rnn, 99) < -6
    assert log_delta(gru, 0) - log_delta(gru, 99) > -2
    # the same is in gradnorms.csv's table (step 0, before training) and it is finite
    g = rnn.gradnorms
    assert set(g["step"]) == {0} and (g["frac_nonfinite"] == 0).all()


# ---------------------------------------------------------------------------------- irrelevant tokens
def test_gru_update_gate_skips_irrelevant_tokens():
    run = train_task("irrelevant_tokens", "gru", task_options=dict(T=30, n_informative=1),
                     model_options=dict(hidden=32), steps=300, batch=32, lr=0.01, seed=0, schedule=Schedule(),
                     eval_batch=512, progress=False)
    assert run.eval_metric >= 0.98
    tr, key = run.trace, "rnn/l0/d0/h"
    x, h, p = tr.inputs(key).double(), tr.prev_states(key).double(), tr.params(key)
    H = h.shape[-1]
    z_rows = slice(H, 2 * H)  # PyTorch gate order r, z, n; h_t = (1 - z) * n + z * h_{t-1}
    z = torch.sigmoid(x @ p["weight_ih"][z_rows].double().T + p["bias_ih"][z_rows].double()
                      + h @ p["weight_hh"][z_rows].double().T + p["bias_hh"][z_rows].double())
    # the evaluation batch and its token classes (0 informative, 1 irrelevant)
    batch = run.task.sample(512, np.random.default_rng([0, 1]))
    assert torch.equal(x.argmax(-1), batch.x)
    cls = torch.from_numpy(batch.classes)
    z_inf, z_irr = float(z.mean(-1)[cls == 0].mean()), float(z.mean(-1)[cls == 1].mean())
    print(f"\nGRU update gate: informative {z_inf:.3f}, irrelevant {z_irr:.3f}")
    assert z_irr > z_inf + 0.1
    # unit by unit: most units hold their state more on irrelevant tokens
    per_unit = z[cls == 1].mean(0) - z[cls == 0].mean(0)
    assert float((per_unit > 0).double().mean()) >= 0.75


# ---------------------------------------------------------------------------------- clipping
def test_clipping_rescues_the_exploding_regime(tmp_path):
    cmp = clipping_experiment(root=tmp_path)  # ReLU RNN, N(0, 4/H) recurrent matrix, checksum T=30, SGD
    s = cmp.summary().set_index("run")
    print("\n" + s.to_string())
    plain, clipped = cmp.runs["rnn_relu"], cmp.runs["rnn_relu+clip_norm"]
    # without clipping: diverges, or stalls at chance
    assert plain.status == "diverged" or plain.eval_metric <= plain.task.chance_metric + 0.1
    # with clipping by norm: trains
    assert clipped.status == "finished" and clipped.solved
    m = clipped.metrics
    np.testing.assert_allclose(m["grad_norm_after"], np.minimum(m["grad_norm_before"], 1.0), rtol=1e-6)
    assert m["clipped"].mean() > 0.3 and m["grad_norm_before"].max() > 100
    # identical start: same seed, same first batch, same initial loss and gradient
    assert plain.metrics["loss"][0] == m["loss"][0]
    assert plain.metrics["grad_norm_before"][0] == m["grad_norm_before"][0]
    # per-timestep norms before/after clipping, both runs, at the recorded steps
    ct = cmp.clip_timesteps
    assert set(ct["run"]) == {"rnn_relu", "rnn_relu+clip_norm"}
    first = ct[(ct["run"] == "rnn_relu+clip_norm") & (ct["step"] == 0)].pivot(index="t", columns="when",
                                                                              values="log10_norm")
    shift = math.log10(1.0 / m["grad_norm_before"][0])
    np.testing.assert_allclose(first["after"] - first["before"], shift, atol=1e-9)
    assert (tmp_path / "noclip" / "run.json").exists() and (tmp_path / "clip" / "trace" / "arrays.npz").exists()
