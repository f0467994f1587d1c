"""Building blocks of the training loop: schedule, clipping, the gradnorms and clip_timesteps rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradflow.errors import SpecError
from gradflow.trace import CellInfo, StateKey, Trace
from gradflow.training import (
    Clip,
    Schedule,
    TrainConfig,
    _log_quantiles,
    clip_gradients,
    clip_timestep_rows,
    gradnorm_rows,
)


# ------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("schedule,expected", [
    (Schedule.every_n(25), [0, 25, 50, 75, 100]),
    (Schedule.log_spaced(4), [0, 1, 2, 3, 6, 10, 18, 32, 56, 100]),
    (Schedule.log_spaced(1), [0, 1, 10, 100]),
    (Schedule(every=40, steps=(7, 99)), [0, 7, 40, 80, 99]),
    (Schedule.never(), []),
])
def test_schedule(schedule, expected):
    assert [s for s in range(101) if schedule(s)] == expected


def test_log_schedule_matches_brute_force():
    for p in (2, 3, 5, 10):
        want = {0} | {round(10 ** (k / p)) for k in range(0, 5 * p + 1)}
        got = {s for s in range(20_001) if Schedule.log_spaced(p)(s)}
        assert got == {s for s in want if s <= 20_000}


@pytest.mark.parametrize("make,fragment", [
    (lambda: Clip("norms", 1.0), "clip mode 'norms'"),
    (lambda: Clip("norm"), "needs a positive threshold"),
    (lambda: Clip("value", -1.0), "needs a positive threshold"),
    (lambda: Clip("none", 1.0), "takes no threshold"),
    (lambda: Schedule(every=-1), "every must be an integer >= 0"),
    (lambda: TrainConfig(steps=0), "steps must be an integer >= 1"),
    (lambda: TrainConfig(optimizer="adagrad"), "optimizer 'adagrad'"),
    (lambda: TrainConfig(lr=float("nan")), "learning rate"),
    (lambda: TrainConfig(seed=-2), "seed must be"),
    (lambda: TrainConfig(optimizer="adam", momentum=0.9).make_optimizer([torch.zeros(1, requires_grad=True)]),
     "momentum applies to sgd and rmsprop"),
])
def test_setting_errors(make, fragment):
    with pytest.raises(SpecError) as exc:
        make()
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_config_accepts_mappings():
    cfg = TrainConfig(clip={"mode": "norm", "threshold": 2.0}, schedule={"every": 5})
    assert cfg.clip == Clip("norm", 2.0) and cfg.schedule == Schedule(every=5)
    assert cfg.describe()["clip"] == {"mode": "norm", "threshold": 2.0}


# ------------------------------------------------------------------------------------ clipping
def _params(*grads):
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(len(g)))
        p.grad = torch.tensor(g, dtype=torch.float32)
        ps.append(p)
    return ps


# (gradients per parameter, clip, expected clipped gradients, clipped?)
CLIPS = [
    ([[3.0, 0.0], [4.0]], Clip("norm", 1.0), [[0.6, 0.0], [0.8]], True),
    ([[3.0, 0.0], [4.0]], Clip("norm", 5.0), [[3.0, 0.0], [4.0]], False),
    ([[3.0, 0.0], [4.0]], Clip("norm", 10.0), [[3.0, 0.0], [4.0]], False),
    ([[3.0, -0.5], [4.0]], Clip("value", 1.0), [[1.0, -0.5], [1.0]], True),
    ([[0.3, -0.5], [0.4]], Clip("value", 1.0), [[0.3, -0.5], [0.4]], False),
    ([[3.0, -0.5], [4.0]], Clip(), [[3.0, -0.5], [4.0]], False),
]


@pytest.mark.parametrize("grads,clip,want,fired", CLIPS)
def test_clip_gradients(grads, clip, want, fired):
    ps = _params(*grads)
    out = clip_gradients(ps, clip)
    raw = np.concatenate([np.array(g, dtype=np.float64) for g in grads])
    new = np.concatenate([np.array(w, dtype=np.float64) for w in want])
    for p, w in zip(ps, want):
        np.testing.assert_allclose(p.grad.numpy(), w, rtol=1e-6)
    assert out["clipped"] is fired
    assert out["grad_norm_before"] == pytest.approx(np.linalg.norm(raw), rel=1e-7)
    assert out["grad_norm_after"] == pytest.approx(np.linalg.norm(new), rel=1e-6)
    assert out["cosine"] == pytest.approx(raw @ new / np.linalg.norm(raw) / np.linalg.norm(new), rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0, 1e4])
def test_norm_clipping_gives_min_of_norm_and_threshold(seed, c):
    g = torch.Generator().manual_seed(seed)
    ps = _params(*(torch.randn(n, generator=g).mul(10.0 ** (seed - 2)).tolist() for n in (7, 30, 1)))
    out = clip_gradients(ps, Clip("norm", c))
    assert out["grad_norm_after"] == pytest.approx(min(out["grad_norm_before"], c), rel=1e-6)
    assert out["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_nonfinite_gradient_is_left_alone():
    ps = _params([1.0, float("inf")], [2.0])
    out = clip_gradients(ps, Clip("norm", 1.0))
    assert math.isinf(out["grad_norm_before"]) and not out["clipped"]


# ------------------------------------------------------------------------------------ tables
@pytest.mark.parametrize("seed", range(4))
def test_log_quantiles_match_numpy_on_finite_rows(seed):
    x = np.random.default_rng(seed).normal(size=(6, 1 + 3 * seed))
    np.testing.assert_allclose(_log_quantiles(x), np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95], axis=1).T, rtol=1e-12)


def test_log_quantiles_with_zeros_and_missing():
    row = np.array([[-np.inf, -np.inf, 1.0, 2.0, np.nan, 3.0]])  # 5 values, 2 of them zero norms
    q = _log_quantiles(row)[0]
    # positions q*(5-1) = 0.2, 1, 2, 3, 3.8 in [-inf, -inf, 1, 2, 3]
    assert np.isneginf(q[0]) and np.isneginf(q[1])
    np.testing.assert_allclose(q[2:], [1.0, 2.0, 2.8])
    assert np.isnan(_log_quantiles(np.full((1, 3), np.nan))).all()


def _trace(norms: dict, masks: dict | None = None) -> Trace:
    tr = Trace("norms")
    for key, n in norms.items():
        n = torch.as_tensor(n, dtype=torch.float64)
        m = torch.ones(n.shape, dtype=torch.bool) if masks is None else masks[key]
        tr.add_unit(key.unit, CellInfo("rnn_tanh", 1, 1), m)
        # a gradient whose norm over the last axis is n: put it in a single coordinate
        tr.add_state(key, torch.where(m, n, torch.nan)[..., None])
    return tr


def test_gradnorm_rows_by_hand():
    k0, k1 = StateKey("rnn", 0, 0, "h"), StateKey("rnn", 0, 1, "h")
    n0 = [[1.0, 10.0, 100.0, 1000.0], [0.0, 0.0, 1.0, float("nan")], [float("inf"), 1.0, 1.0, 1.0]]
    n1 = [[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0], [1e-40, 1e-40, 1e-40, 1e-40]]
    mask1 = torch.tensor([[True] * 4, [True, True, False, False], [True] * 4])
    tr = _trace({k0: n0, k1: n1}, {k0: torch.ones(3, 4, dtype=torch.bool), k1: mask1})
    rows = gradnorm_rows(tr, "r", 7)
    assert len(rows) == 6
    by = {(r["key"], r["t"]): r for r in rows}
    r = by[("rnn/l0/d0/h", 0)]
    assert r["distance"] == 2 and r["n"] == 4 and r["frac_zero"] == 0 and r["frac_nonfinite"] == 0
    assert r["q50"] == pytest.approx(1.5) and r["mean_log10"] == pytest.approx(1.5)
    assert r["q05"] == pytest.approx(0.15) and r["q95"] == pytest.approx(2.85)
    r = by[("rnn/l0/d0/h", 1)]
    assert r["frac_zero"] == 0.5 and r["frac_nonfinite"] == 0.25 and np.isneginf(r["q25"])
    assert r["mean_log10"] == 0.0  # only the positive finite norm 1.0
    r = by[("rnn/l0/d0/h", 2)]
    assert r["frac_nonfinite"] == 0.25 and r["q50"] == 0.0
    r = by[("rnn/l0/d1/h", 1)]
    assert r["distance"] == 1 and r["n"] == 2 and r["q50"] == pytest.approx(math.log10(2))
    r = by[("rnn/l0/d1/h", 2)]
    assert r["distance"] == 2 and r["q50"] == pytest.approx(-40) and r["frac_zero"] == 0
    assert {r["step"] for r in rows} == {7} and {r["run"] for r in rows} == {"r"}


def test_clip_timestep_rows_by_hand():
    k = StateKey("rnn")
    tr = _trace({k: [[3.0, 4.0], [1.0, 0.0]]})
    rows = clip_timestep_rows(tr, "r", 3, before=10.0, after=1.0)
    got = {(r["t"], r["when"]): r["log10_norm"] for r in rows}
    assert got[(0, "before")] == pytest.approx(math.log10(5.0))
    assert got[(0, "after")] == pytest.approx(math.log10(0.5))
    assert got[(1, "before")] == pytest.approx(0.0) and got[(1, "after")] == pytest.approx(-1.0)
    same = clip_timestep_rows(tr, "r", 3, before=2.0, after=2.0)
    assert all(r["log10_norm"] == got[(r["t"], "before")] for r in same)
