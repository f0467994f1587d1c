"""The stated chance-level baselines, reproduced by the constant / memoryless predictors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gradflow.tasks import get_task


def _onehot_logits(labels: np.ndarray, C: int, big: float = 1e4) -> torch.Tensor:
    """Logits putting probability 1 on ``labels`` (float64, exact log-softmax 0)."""
    out = torch.full(labels.shape + (C,), -big, dtype=torch.float64)
    out.scatter_(-1, torch.from_numpy(labels)[..., None], 0.0)
    return out


# classification tasks read out after the last step: (name, options, stated chance accuracy, stated ln)
READOUT_LAST = [
    ("checksum", dict(T=20), 1 / 4, math.log(4)),
    ("checksum", dict(T=20, n_classes=2, noise=0.3), 1 / 2, math.log(2)),
    ("checksum", dict(T=5, n_key=2, n_classes=3), 1 / 3, math.log(3)),
    ("irrelevant_tokens", dict(T=12, n_informative=1), 1 / 2, math.log(2)),
    ("irrelevant_tokens", dict(T=12, n_informative=3, n_classes=3), 1 / 3, math.log(3)),
    ("segments", dict(T=12, n_segments=3), 1 / 4, math.log(4)),
    ("agreement", dict(T=12, distance=3), 1 / 2, math.log(2)),
    ("temporal_order", dict(T=20), 1 / 4, math.log(4)),
    ("temporal_order", dict(T=20, bits=3), 1 / 8, math.log(8)),
]


@pytest.mark.parametrize("name,opts,acc,ce", READOUT_LAST, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_classification_chance(name, opts, acc, ce):
    task = get_task(name, **opts)
    assert task.chance_metric == pytest.approx(acc, rel=1e-12)
    assert task.chance_loss == pytest.approx(ce, rel=1e-12)
    b = task.sample(6000, seed=5)
    # the constant (uniform) predictor has cross-entropy ln K exactly
    uniform = torch.zeros(b.B, task.output_size, dtype=torch.float64)
    assert float(task.loss(uniform, b.y)) == pytest.approx(ce, rel=1e-9)
    # the best memoryless predictor (sees only the readout token): majority label per last token,
    # fitted on one batch and scored on another, stays at chance
    fit, test = task.sample(6000, seed=6), b
    table = {}
    for tok, lab in zip(fit.x[-1].tolist(), fit.y.tolist()):
        table.setdefault(tok, []).append(lab)
    guess = {tok: np.bincount(v).argmax() for tok, v in table.items()}
    pred = np.array([guess.get(tok, 0) for tok in test.x[-1].tolist()])
    assert abs((pred == test.y.numpy()).mean() - acc) < 0.03


@pytest.mark.parametrize("T,n_symbols,n_copy", [(1, 8, 10), (50, 8, 10), (100, 8, 10), (9, 3, 4)])
def test_copy_memory_memoryless_baseline(T, n_symbols, n_copy):
    task = get_task("copy_memory", T=T, n_symbols=n_symbols, n_copy=n_copy)
    if (n_symbols, n_copy) == (8, 10):
        assert task.chance_loss == pytest.approx(10 * math.log(8) / (T + 20), rel=1e-12)
    b = task.sample(16, seed=0)
    L, C = task.length, task.output_size
    logits = _onehot_logits(np.zeros((L, b.B), dtype=np.int64), C)  # blanks with probability 1
    logits[T + n_copy:] = -1e4
    logits[T + n_copy:, :, 1:] = 0.0  # then uniform over the symbols
    assert float(task.loss(logits, b.y)) == pytest.approx(task.chance_loss, rel=1e-9)
    assert task.chance_metric == pytest.approx(1 / n_symbols)


@pytest.mark.parametrize("variant,zero_first,mse,acc", [
    ("arjovsky", True, 1 / 6, 1 / 6),
    ("hochreiter", False, 1 / 24, 0.16 - 0.16 ** 2 / 4),
    ("hochreiter", True, 19 / 480, 0.9 * 0.1536 + 0.1 * 0.16),
])
def test_adding_constant_predictor(variant, zero_first, mse, acc):
    task = get_task("adding", T=60, variant=variant, zero_first=zero_first)
    assert task.chance_loss == pytest.approx(mse, rel=1e-12)
    assert task.chance_metric == pytest.approx(acc, rel=1e-12)
    b = task.sample(200_000, seed=2)
    const = torch.full_like(b.y, 1.0 if variant == "arjovsky" else 0.5)
    # Monte Carlo: 200k samples -> standard error of the MSE well under 1%
    assert float(task.loss(const, b.y)) == pytest.approx(mse, rel=0.015)
    assert task.metric(const, b.y) == pytest.approx(acc, rel=0.025 if variant == "hochreiter" else 0.015)
    # the constant is the best one: shifting it makes the MSE worse
    assert float(task.loss(const + 0.05, b.y)) > float(task.loss(const, b.y))


def test_char_lm_unigram_baseline_exact(tmp_path):
    p = tmp_path / "ab.txt"
    p.write_text("ab" * 200)
    task = get_task("char_lm", T=10, path=str(p))
    assert task.chars == "ab" and task.chance_metric == pytest.approx(1.0, rel=1e-12)
    b = task.sample(32, seed=0)
    logits = task.unigram_logits().expand(10, 32, 2)
    assert task.metric(logits, b.y) == pytest.approx(1.0, rel=1e-12)  # every window is half a, half b


def test_char_lm_unigram_baseline_stdlib():
    task = get_task("char_lm", T=200, max_chars=300_000)
    assert 3.5 < task.chance_metric < 6.0  # unigram entropy of Python source, bits/char
    b = task.sample(400, seed=0)
    logits = task.unigram_logits().expand(200, 400, task.vocab_size)
    assert task.metric(logits, b.y) == pytest.approx(task.chance_metric, rel=0.03)
    # one-hot of the right next char is perfect
    assert task.metric(_onehot_logits(b.y.numpy(), task.vocab_size), b.y) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("name,opts,kind", [
    ("stocks", dict(T=24), "constant"),
    ("stocks", dict(T=24, transform="log_level"), "persistence"),
    ("eeg", dict(T=30), "persistence"),
    ("membrane", dict(T=60), "persistence"),
])
@pytest.mark.parametrize("holdout", [0.2, 0])
def test_forecast_memoryless_baseline(name, opts, kind, holdout):
    """The baseline is measured on the part the evaluation batch comes from: the held-out tail."""
    task = get_task(name, **opts, holdout=holdout)
    assert task.baseline_kind == kind
    s = task.series()
    s = s[len(s) - int(round(holdout * len(s))) if holdout else 0:]
    b = task.sample_eval(3000, seed=0)
    if kind == "persistence":
        pred = b.x
    else:
        pred = torch.full_like(b.y, float(s[1:].mean()))
    # windows weight the part's ends less than its middle: agreement within 15%
    assert task.metric(pred, b.y) == pytest.approx(task.chance_metric, rel=0.15)
    # exact over every one-step pair of that part
    exact = ((s[1:] - (s[:-1] if kind == "persistence" else s[1:].mean(axis=0))) ** 2).mean()
    assert task.chance_loss == pytest.approx(exact, rel=1e-12)
