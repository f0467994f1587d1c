"""Every task generator: shapes, dtypes, determinism under a seed, token classes, labels = targets(x)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradflow.tasks import get_task, list_tasks

B = 5

# (name, options, x shape, y shape); T is the input length
SETTINGS = [
    ("checksum", dict(T=20), (20, B), (B,)),
    ("checksum", dict(T=30, n_key=3, noise=0.5, n_classes=3), (30, B), (B,)),
    ("irrelevant_tokens", dict(T=25, n_informative=3), (25, B), (B,)),
    ("segments", dict(T=17, n_segments=4), (17, B), (B,)),
    ("segments", dict(T=5, n_segments=1), (5, B), (B,)),
    ("agreement", dict(T=16, distance=15), (16, B), (B,)),
    ("adding", dict(T=40), (40, B, 2), (B, 1)),
    ("adding", dict(T=40, variant="hochreiter"), (40, B, 2), (B, 1)),
    ("copy_memory", dict(T=7), (27, B), (27, B)),
    ("copy_memory", dict(T=1, n_copy=3, n_symbols=4), (7, B), (7, B)),
    ("temporal_order", dict(T=30), (30, B), (B,)),
    ("temporal_order", dict(T=30, bits=3), (30, B), (B,)),
    ("char_lm", dict(T=40), (40, B), (40, B)),
    ("stocks", dict(T=24), (24, B, 1), (24, B, 1)),
    ("stocks", dict(T=12, symbols=("^GSPC", "IBM", "AAPL"), transform="log_level"), (12, B, 3), (12, B, 3)),
    ("eeg", dict(T=30), (30, B, 4), (30, B, 4)),
    ("membrane", dict(T=60), (60, B, 1), (60, B, 1)),
]


def test_every_task_has_a_setting():
    assert {s[0] for s in SETTINGS} == set(list_tasks())


@pytest.mark.parametrize("name,opts,xshape,yshape", SETTINGS, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_shapes_and_dtypes(name, opts, xshape, yshape):
    task = get_task(name, **opts)
    b = task.sample(B, seed=3)
    assert tuple(b.x.shape) == xshape and tuple(b.y.shape) == yshape
    assert task.length == xshape[0] == b.T
    if task.input_kind == "tokens":
        assert b.x.dtype == torch.int64
        assert int(b.x.min()) >= 0 and int(b.x.max()) < task.vocab_size
        assert len(xshape) == 2
    else:
        assert b.x.dtype == torch.float32 and xshape[2] == task.n_features
        assert torch.isfinite(b.x).all() and torch.isfinite(b.y).all()
    if task.loss_name == "cross_entropy":
        assert b.y.dtype == torch.int64 and int(b.y.min()) >= 0 and int(b.y.max()) < task.output_size
    if b.classes is not None:
        assert b.classes.shape == xshape[:2] and b.classes.dtype == np.int64
        assert b.classes.min() >= 0 and b.classes.max() < len(task.class_names)
    # readout "last" -> one target per sequence; "all" -> one per step
    assert (len(yshape) - (task.input_kind == "real")) == (1 if task.readout == "last" else 2)


@pytest.mark.parametrize("name,opts,xshape,yshape", SETTINGS, ids=lambda v: str(v) if isinstance(v, str) else None)
def test_deterministic_under_seed(name, opts, xshape, yshape):
    task = get_task(name, **opts)
    a, b, c = task.sample(B, seed=11), task.sample(B, seed=11), task.sample(B, seed=12)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    if a.classes is not None:
        assert np.array_equal(a.classes, b.classes)
    # an equal task built afresh samples the same batch
    assert torch.equal(get_task(name, **opts).sample(B, seed=11).x, a.x)


@pytest.mark.parametrize("name,opts,xshape,yshape", [s for s in SETTINGS if hasattr(get_task(s[0], **s[1]), "targets")],
                         ids=lambda v: str(v) if isinstance(v, str) else None)
def test_labels_are_the_targets_of_the_inputs(name, opts, xshape, yshape):
    task = get_task(name, **opts)
    b = task.sample(64, seed=0)
    y = task.targets(b.x.numpy())
    np.testing.assert_allclose(np.asarray(y, dtype=np.float64).reshape(b.y.shape), b.y.numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["checksum", "irrelevant_tokens", "segments", "agreement", "temporal_order",
                                  "copy_memory"])
def test_labels_are_balanced(name):
    task = get_task(name)
    y = task.sample(4000, seed=1).y.numpy()
    if task.readout == "all":
        y = y[-1]
    freq = np.bincount(y, minlength=task.output_size) / len(y)
    classes = freq[freq > 0]
    assert len(classes) == round(1 / task.chance_metric)
    np.testing.assert_allclose(classes, task.chance_metric, atol=0.035)


def test_forecast_windows_are_shifted_series():
    for name in ("stocks", "eeg", "membrane", "char_lm"):
        task = get_task(name, T=10)
        b = task.sample(8, seed=0)
        assert torch.equal(b.x[1:], b.y[:-1]), name


def test_stock_regimes_mark_the_bear_markets():
    task = get_task("stocks", T=12)
    months = task.prices().index[1:]  # returns start one month after the first price
    bear = task.regimes()
    assert len(bear) == len(task.series()) == len(months)
    by_month = dict(zip(map(str, months), bear))
    assert by_month["2002-09"] == 1 and by_month["2009-02"] == 1  # dot-com and 2008 troughs
    assert by_month["1995-06"] == 0 and by_month["2017-06"] == 0
    assert str(task.prices().index[0]) == "1990-01" and str(task.prices().index[-1]) == "2022-06"


# ------------------------------------------------------------------------- held-out evaluation
def _ab_text(tmp_path, n=500):
    """'a' for the first 80% of the characters, 'b' for the last 20%: the split is visible in the data."""
    p = tmp_path / "ab.txt"
    p.write_text("a" * (n - n // 5) + "b" * (n // 5))
    return str(p)


@pytest.mark.parametrize("holdout,cut", [(0.2, 96), (0.5, 60)])
def test_window_starts_split_the_series(holdout, cut):
    """n = 120 steps, windows of T+1 = 11: training windows [s, s+10] end before the cut, held-out
    ones start at or after it; the last possible start is n - T - 1 = 109."""
    from gradflow.tasks.real import _window_starts

    g = np.random.default_rng(0)
    tr = _window_starts(120, 10, holdout, "train", g, 5000)
    ev = _window_starts(120, 10, holdout, "eval", g, 5000)
    assert tr.min() == 0 and tr.max() == cut - 11
    assert ev.min() == cut and ev.max() == 109
    both = _window_starts(120, 10, 0, "eval", g, 5000)  # holdout 0: everything, as before
    assert both.min() == 0 and both.max() == 109


def test_char_lm_trains_and_evaluates_on_disjoint_text(tmp_path):
    task = get_task("char_lm", T=20, path=_ab_text(tmp_path))
    a, b = task.encode("a")[0], task.encode("b")[0]
    train = task.sample(256, seed=0)
    assert (train.x.numpy() == a).all() and (train.y.numpy() == a).all()  # never reaches the held-out b's
    ev = task.sample_eval(256, seed=0)
    assert (ev.x.numpy() == b).all() and (ev.y.numpy() == b).all()
    from gradflow.errors import TaskError

    with pytest.raises(TaskError, match="split='test' must be 'train' or 'eval'"):
        task.sample(4, seed=0, split="test")
    same = get_task("char_lm", T=20, path=_ab_text(tmp_path), holdout=0)
    assert (same.sample(256, seed=0).y.numpy() == b).any()  # in sample: windows reach the end


@pytest.mark.parametrize("name", ["stocks", "eeg", "membrane"])
def test_forecast_eval_windows_come_from_the_held_out_part(name):
    task = get_task(name, T=12)
    s = task.series()
    cut = len(s) - int(round(0.2 * len(s)))
    ev, tr = task.sample_eval(64, seed=1), task.sample(64, seed=1)
    for batch, lo, hi in ((ev, cut, len(s)), (tr, 0, cut)):
        part = s[lo:hi]
        for b in range(4):  # every window is a contiguous piece of its part of the series
            w = batch.x[:, b].double().numpy()
            hits = [i for i in range(len(part) - 12) if np.allclose(part[i:i + 12], w, atol=1e-6)]
            assert hits, (name, lo)


@pytest.mark.parametrize("opts,words", [
    (dict(holdout=1.0), "holdout must be a number in [0, 1)"),
    (dict(holdout=-0.1), "holdout must be a number in [0, 1)"),
    (dict(holdout="0.2"), "holdout must be a number in [0, 1)"),
    (dict(T=200), "each part needs at least T+1 = 201"),
])
def test_bad_holdout_is_one_clear_line(opts, words):
    from gradflow.errors import TaskError

    with pytest.raises(TaskError) as ei:
        get_task("eeg", **opts)
    assert words in str(ei.value) and "\n" not in str(ei.value) and "eeg" in str(ei.value)


def test_final_pass_evaluates_on_held_out_text(tmp_path):
    from gradflow.training import Schedule, train_task

    torch.set_num_threads(1)
    r = train_task("char_lm", "gru", task_options={"T": 16, "path": _ab_text(tmp_path)},
                   model_options={"hidden": 8}, steps=2, batch=4, eval_batch=8, schedule=Schedule(steps=(100,)),
                   progress=False)
    key = r.trace.keys(state="h")[0]
    x = r.trace.inputs(key)  # one-hot characters seen by the recurrent layer
    assert (x.argmax(-1) == r.task.encode("b")[0]).all()
