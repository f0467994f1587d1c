"""Labels on hand-made sequences, and one-line errors for impossible settings."""

from __future__ import annotations

import numpy as np
import pytest

from gradflow.errors import TaskError
from gradflow.tasks import get_task


def col(*tokens):
    return np.array(tokens, dtype=np.int64)[:, None]


# (task, options, tokens, expected label)
CHECKSUM = dict(T=6, n_classes=4, n_key=2)  # keys 0..3, blank 4, noise 5..8
IRREL = dict(T=6, n_classes=3)  # informative 0..2, irrelevant 3..6
SEG = dict(T=10, n_classes=4)  # symbols 0..3, reset 4
TO = dict(T=20)  # A=0, B=1, distractors 2..5

HAND_MADE = [
    ("checksum", CHECKSUM, col(3, 2, 4, 4, 4, 4), (3 + 2) % 4),
    ("checksum", CHECKSUM, col(3, 2, 5, 8, 4, 6), (3 + 2) % 4),  # noise tokens change nothing
    ("checksum", CHECKSUM, col(0, 1, 4, 4, 4, 4), 1),
    ("irrelevant_tokens", IRREL, col(3, 2, 5, 2, 6, 3), (2 + 2) % 3),
    ("irrelevant_tokens", IRREL, col(1, 4, 4, 4, 4, 4), 1),
    ("irrelevant_tokens", IRREL, col(4, 0, 4, 1, 2, 5), (0 + 1 + 2) % 3),
    ("segments", SEG, col(1, 2, 3, 4, 2, 0, 4, 3, 1, 1), 3),
    ("segments", SEG, col(0, 0, 4, 2, 2, 4, 3, 1, 1, 1), 3),
    ("segments", SEG, col(2, 1, 1, 1, 1, 1, 1, 1, 1, 1), 2),  # one segment
    ("temporal_order", TO, col(2, 3, 0, 4, 5, 2, 3, 4, 5, 2, 1, 3, 2, 2, 3, 4, 5, 2, 3, 4), 0b01),
    ("temporal_order", TO, col(2, 3, 2, 1, 5, 2, 3, 4, 5, 2, 2, 0, 2, 2, 3, 4, 5, 2, 3, 4), 0b10),
    ("temporal_order", dict(T=20, bits=3), col(2, 3, 1, 4, 5, 2, 0, 4, 5, 2, 3, 3, 2, 1, 3, 4, 5, 2, 3, 4), 0b101),
]


@pytest.mark.parametrize("name,opts,x,label", HAND_MADE)
def test_hand_made_labels(name, opts, x, label):
    task = get_task(name, **opts)
    assert task.targets(x).tolist() == [label]


@pytest.mark.parametrize("sentence,label", [
    ("then so cat which ate a lot of food", 0),
    ("then so cats which ate a lot of food", 1),
    ("still today cats that saw the tree near the house", 1),  # singular attractors
    ("still today child who liked friends with big cars", 0),  # plural attractors
    ("children who saw trees behind the old house quickly ate", 1),
])
def test_agreement_hand_made(sentence, label):
    words = sentence.split()
    task = get_task("agreement", T=len(words), distance=len(words) - 1 - next(
        i for i, w in enumerate(words) if w in ("cat", "cats", "child", "children")))
    x = task.encode(words)
    assert task.targets(x).tolist() == [label]
    assert task.decode(x) == words
    cls = task.token_classes(x)[:, 0]
    names = [task.class_names[c] for c in cls]
    assert names.count("subject") == 1
    assert all(n == "attractor" for n, w in zip(names, words) if w.rstrip("s") in ("tree", "house", "car", "friend"))


def test_segments_label_depends_only_on_the_current_segment():
    task = get_task("segments", T=30, n_segments=3)
    b = task.sample(50, seed=0)
    x = b.x.numpy().copy()
    last = np.where(x == 4, np.arange(30)[:, None], -1).max(axis=0)
    for j in range(x.shape[1]):  # scramble everything before the last marker
        prefix = x[: last[j], j]
        symbols = prefix != 4
        prefix[symbols] = (prefix[symbols] + 1 + j) % 4
    assert np.array_equal(task.targets(x), b.y.numpy())


def test_adding_hand_made():
    arj = get_task("adding", T=4)
    x = np.array([[0.3, 1], [0.9, 0], [0.2, 1], [0.5, 0]], dtype=np.float64)[:, None, :]
    assert arj.targets(x).tolist() == pytest.approx([0.5])
    hs = get_task("adding", T=22, variant="hochreiter")
    x = np.zeros((22, 1, 2))
    x[:, 0, 0] = np.linspace(-1, 1, 22)
    x[0, 0, 1] = x[-1, 0, 1] = -1
    x[3, 0, 1] = x[7, 0, 1] = 1
    assert hs.targets(x).tolist() == pytest.approx([0.5 + (x[3, 0, 0] + x[7, 0, 0]) / 4])


def test_adding_marker_positions():
    b = get_task("adding", T=30).sample(2000, seed=0)
    m = b.x[..., 1].numpy()
    assert (m.sum(axis=0) == 2).all()
    assert (m[:15].sum(axis=0) == 1).all() and (m[15:].sum(axis=0) == 1).all()
    h = get_task("adding", T=30, variant="hochreiter").sample(2000, seed=0)
    mk = h.x[..., 1].numpy()
    assert ((mk == 1).sum(axis=0) == 2).all()
    first = (mk == 1).argmax(axis=0)
    assert first.max() < 10 and set(first.tolist()) == set(range(10))
    assert ((mk[:14] == 1).sum(axis=0) == 2).all()  # both among the first T/2 - 1
    assert (mk[-1] == -1).all()
    assert ((mk[0] == -1) | (mk[0] == 1)).all()
    # the first pair marked while the other mark lies beyond the first ten: it was X1's pick -> X1 = 0
    x1_first = (mk[0] == 1) & ((mk[10:] == 1).sum(axis=0) == 1)
    assert x1_first.sum() > 50 and (h.x[0, x1_first, 0] == 0).all()
    assert (h.x[0, mk[0] != 1, 0] != 0).all()


def test_copy_memory_layout():
    task = get_task("copy_memory", T=5, n_copy=3, n_symbols=4)
    b = task.sample(2, seed=0)
    x, y = b.x[:, 0].tolist(), b.y[:, 0].tolist()
    syms = x[:3]
    assert all(1 <= s <= 4 for s in syms)
    assert x[3:] == [0] * 4 + [5] + [0] * 3  # T-1 blanks, delimiter, n_copy blanks
    assert y == [0] * 8 + syms


def test_temporal_order_windows():
    task = get_task("temporal_order", T=100)
    assert task.windows == [(10, 20), (50, 60)]
    assert get_task("temporal_order", T=100, bits=3).windows == [(10, 20), (33, 43), (66, 76)]
    b = task.sample(3000, seed=0)
    rel = b.x.numpy() < 2
    assert (rel.sum(axis=0) == 2).all()
    t = np.nonzero(rel.T)[1].reshape(-1, 2)
    assert set(t[:, 0]) == set(range(10, 20)) and set(t[:, 1]) == set(range(50, 60))


# ------------------------------------------------------------------------------------------ errors
def _empty(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("")
    return str(p)


ERRORS = [
    (lambda tmp: get_task("chcksum"), "did you mean 'checksum'"),
    (lambda tmp: get_task("copy"), "did you mean 'copy_memory'"),
    (lambda tmp: get_task("copy_memory", T=0), "T must be an integer >= 1"),
    (lambda tmp: get_task("copy_memory", T=-3), "T must be an integer >= 1"),
    (lambda tmp: get_task("agreement", T=10, distance=10), "distance=10 does not fit in a sequence of T=10"),
    (lambda tmp: get_task("agreement", T=10, distance=50), "distance=50"),
    (lambda tmp: get_task("char_lm", path=str(tmp / "missing.txt")), "missing.txt does not exist"),
    (lambda tmp: get_task("char_lm", path=_empty(tmp)), "empty.txt is empty"),
    (lambda tmp: get_task("char_lm", path=str(tmp)), "is a directory"),
    (lambda tmp: get_task("checksum", n_clases=4), "did you mean 'n_classes'"),
    (lambda tmp: get_task("checksum", T=20, noise=1.5), "noise must be a probability"),
    (lambda tmp: get_task("segments", T=7, n_segments=3), "needs T >= 8"),
    (lambda tmp: get_task("temporal_order", T=4), "T=4 is too short"),
    (lambda tmp: get_task("temporal_order", T=5, bits=3), "T=5 is too short"),
    (lambda tmp: get_task("temporal_order", bits=4), "bits must be 2 or 3"),
    (lambda tmp: get_task("adding", variant="hochreiter", T=10), "T must be an integer >= 22"),
    (lambda tmp: get_task("adding", variant="pascanu"), "variant='pascanu'"),
    (lambda tmp: get_task("stocks", symbols=("GOOG",)), "did you mean 'GOOGL'"),
    (lambda tmp: get_task("eeg", T=800), "fewer than T+1"),
    (lambda tmp: get_task("checksum").sample(0, seed=0), "batch must be an integer >= 1"),
    (lambda tmp: get_task("checksum").sample(4, seed=-1), "seed must be"),
]


@pytest.mark.parametrize("make,fragment", ERRORS)
def test_one_line_errors(make, fragment, tmp_path):
    with pytest.raises(TaskError) as exc:
        make(tmp_path)
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg


def test_stocks_refuses_a_series_with_a_gap(monkeypatch):
    import gradflow.tasks.real as real

    m = real._stocks_monthly().copy()
    m.iloc[100:103, m.columns.get_loc("IBM")] = float("nan")
    monkeypatch.setattr(real, "_stocks_monthly", lambda: m)
    monkeypatch.setattr(real, "_SERIES", {})
    with pytest.raises(TaskError, match="IBM have gaps"):
        get_task("stocks", symbols=("^GSPC", "IBM"))
    assert len(get_task("stocks", symbols=("DELL",), T=12).prices()) == 70  # DELL quotes from 2016-09
