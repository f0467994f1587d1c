"""Scenarios behind the classic "why gates help" explanations, as token classification tasks.

Each task labels a sequence from a few informative tokens; a memoryless predictor (one that sees
only the token at the readout step) is at chance because the readout token never carries the label.
``targets(x)`` computes the labels of any [T, B] (or [T]) token array, so hand-made sequences can be
checked; ``sample`` draws random sequences and labels them with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import TaskError
from .base import Batch, Task, _positive_int, rng, tokens_batch

__all__ = ["Checksum", "IrrelevantTokens", "Segments", "Agreement"]


def _as_tb(x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise TaskError(f"token array must be [T, B] or [T], got shape {a.shape}")
    return a.astype(np.int64)


class _Classification(Task):
    n_classes: int

    @property
    def output_size(self) -> int:
        return self.n_classes

    @property
    def chance_loss(self) -> float:
        return math.log(self.n_classes)

    @property
    def chance_metric(self) -> float:
        return 1.0 / self.n_classes


@dataclass(frozen=True)
class Checksum(_Classification):
    """Checksum: the first ``n_key`` tokens decide the label, read out after the last step.

    Tokens ``0..K-1`` are key symbols (K = ``n_classes``), ``K`` is the blank filler and
    ``K+1..K+n_noise`` are noise symbols. Positions ``[0, n_key)`` hold uniform key symbols; every
    later position holds the blank, or with probability ``noise`` a uniform noise symbol. Label =
    ``sum(x[:n_key]) mod K``. The scenario "an early observation decides the outcome" of the classic
    vanishing-gradient argument (Bengio, Simard & Frasconi 1994; Hochreiter & Schmidhuber 1997).
    Chance: accuracy 1/K, cross-entropy ln K (the label is independent of every later token).
    Token classes: 0 key, 1 blank, 2 noise.
    """

    name = "checksum"
    source = "Bengio, Simard & Frasconi 1994, IEEE TNN 5(2); Hochreiter & Schmidhuber 1997, Neural Comput. 9(8)"
    class_names = ("key", "blank", "noise")

    T: int = 50
    n_classes: int = 4
    n_key: int = 1
    noise: float = 0.0
    n_noise: int = 4

    def __post_init__(self):
        _positive_int(self.name, "n_classes", self.n_classes, 2)
        _positive_int(self.name, "n_key", self.n_key, 1)
        _positive_int(self.name, "n_noise", self.n_noise, 1)
        _positive_int(self.name, "T", self.T, self.n_key)
        if not (0.0 <= float(self.noise) <= 1.0):
            raise TaskError(f"checksum: noise must be a probability in [0, 1], got {self.noise!r}")

    @property
    def vocab_size(self) -> int:
        return self.n_classes + 1 + self.n_noise

    def targets(self, x) -> np.ndarray:
        a = _as_tb(x)
        return a[: self.n_key].sum(axis=0) % self.n_classes

    def token_classes(self, x) -> np.ndarray:
        a = _as_tb(x)
        c = np.where(a == self.n_classes, 1, 2)
        c[: self.n_key] = 0
        return c

    def sample(self, batch: int, seed=None) -> Batch:
        g = rng(seed)
        B = _positive_int(self.name, "batch", batch)
        K = self.n_classes
        x = np.full((self.T, B), K, dtype=np.int64)
        x[: self.n_key] = g.integers(0, K, size=(self.n_key, B))
        rest = self.T - self.n_key
        noisy = g.random((rest, B)) < self.noise
        noise = g.integers(K + 1, K + 1 + self.n_noise, size=(rest, B))
        x[self.n_key:] = np.where(noisy, noise, K)
        return tokens_batch(x, self.targets(x), self.token_classes(x))


@dataclass(frozen=True)
class IrrelevantTokens(_Classification):
    """Informative tokens interleaved with a marked class of irrelevant ones (markup in a web page).

    Tokens ``0..K-1`` are informative (K = ``n_classes``), ``K..K+n_irrelevant-1`` irrelevant.
    ``n_informative`` informative tokens sit at distinct uniform positions in ``[0, T-1)``; every
    other position holds a uniform irrelevant token (the readout step is always irrelevant). Label =
    ``sum(informative tokens) mod K``. A gated cell can learn to skip the irrelevant class (GRU
    update gate z -> 1, Cho et al. 2014; Chung et al. 2014). Chance: accuracy 1/K, cross-entropy
    ln K. Token classes: 0 informative, 1 irrelevant.
    """

    name = "irrelevant_tokens"
    source = "Cho et al. 2014, EMNLP (GRU gates); Chung et al. 2014, arXiv:1412.3555"
    class_names = ("informative", "irrelevant")

    T: int = 30
    n_classes: int = 2
    n_informative: int = 2
    n_irrelevant: int = 4

    def __post_init__(self):
        _positive_int(self.name, "n_classes", self.n_classes, 2)
        _positive_int(self.name, "n_informative", self.n_informative, 1)
        _positive_int(self.name, "n_irrelevant", self.n_irrelevant, 1)
        _positive_int(self.name, "T", self.T, self.n_informative + 1)

    @property
    def vocab_size(self) -> int:
        return self.n_classes + self.n_irrelevant

    def targets(self, x) -> np.ndarray:
        a = _as_tb(x)
        inf = a < self.n_classes
        return np.where(inf, a, 0).sum(axis=0) % self.n_classes

    def token_classes(self, x) -> np.ndarray:
        return (_as_tb(x) >= self.n_classes).astype(np.int64)

    def sample(self, batch: int, seed=None) -> Batch:
        g = rng(seed)
        B = _positive_int(self.name, "batch", batch)
        K = self.n_classes
        x = g.integers(K, K + self.n_irrelevant, size=(self.T, B))
        pos = g.random((self.T - 1, B)).argsort(axis=0)[: self.n_informative]  # distinct positions < T-1
        cols = np.broadcast_to(np.arange(B), pos.shape)
        x[pos, cols] = g.integers(0, K, size=pos.shape)
        return tokens_batch(x, self.targets(x), self.token_classes(x))


@dataclass(frozen=True)
class Segments(_Classification):
    """A sequence with logical breaks: the label depends only on the current (last) segment.

    Tokens ``0..K-1`` are symbols, ``K`` the reset marker. ``n_segments`` segments of >= 2 uniform
    symbols each (lengths a uniform composition of ``T - (n_segments-1)``) are separated by single
    reset markers. Label = the first symbol of the last segment (the symbol after the last marker,
    or ``x[0]`` with one segment). A cell must overwrite its memory at each marker — the "forget"
    role of gates (Gers, Schmidhuber & Cummins 2000). Chance: accuracy 1/K, cross-entropy ln K (the
    last segment has >= 2 symbols, so the readout token is not its first). Token classes: 0 head (first
    symbol of a segment), 1 symbol, 2 reset.
    """

    name = "segments"
    source = "Gers, Schmidhuber & Cummins 2000, Neural Comput. 12(10) (learning to forget)"
    class_names = ("head", "symbol", "reset")

    T: int = 40
    n_classes: int = 4
    n_segments: int = 3

    def __post_init__(self):
        _positive_int(self.name, "n_classes", self.n_classes, 2)
        _positive_int(self.name, "n_segments", self.n_segments, 1)
        need = 3 * self.n_segments - 1
        if isinstance(self.T, bool) or not isinstance(self.T, (int, np.integer)) or self.T < need:
            raise TaskError(
                f"segments: T={self.T!r} is too short for n_segments={self.n_segments} (needs T >= {need}: "
                "segments of >= 2 symbols plus one marker between each)"
            )

    @property
    def vocab_size(self) -> int:
        return self.n_classes + 1

    def _heads(self, a: np.ndarray) -> np.ndarray:
        T, B = a.shape
        idx = np.where(a == self.n_classes, np.arange(T)[:, None], -1).max(axis=0) + 1  # after last marker
        if (idx >= T).any():
            raise TaskError("segments: a sequence ends with a reset marker (its last segment is empty)")
        return idx

    def targets(self, x) -> np.ndarray:
        a = _as_tb(x)
        return a[self._heads(a), np.arange(a.shape[1])]

    def token_classes(self, x) -> np.ndarray:
        a = _as_tb(x)
        reset = a == self.n_classes
        head = np.zeros_like(reset)
        head[0] = ~reset[0]
        head[1:] = reset[:-1] & ~reset[1:]
        return np.where(reset, 2, np.where(head, 0, 1)).astype(np.int64)

    def sample(self, batch: int, seed=None) -> Batch:
        g = rng(seed)
        B = _positive_int(self.name, "batch", batch)
        K, n, T = self.n_classes, self.n_segments, self.T
        x = g.integers(0, K, size=(T, B))
        if n > 1:
            extra = T - (n - 1) - 2 * n  # symbols beyond the minimum of 2 per segment
            # stars and bars: n-1 bars among extra + n-1 slots give a uniform composition
            bars = np.sort(g.random((extra + n - 1, B)).argsort(axis=0)[: n - 1], axis=0)
            lengths = np.diff(np.vstack([np.full((1, B), -1), bars, np.full((1, B), extra + n - 1)]), axis=0) - 1 + 2
            ends = np.cumsum(lengths + 1, axis=0)[:-1] - 1  # marker positions
            x[ends, np.broadcast_to(np.arange(B), ends.shape)] = K
        return tokens_batch(x, self.targets(x), self.token_classes(x))


_CONTEXT = ("then", "however", "yesterday", "indeed", "so", "and", "also", "today", "meanwhile", "still")
_SUBJECTS = (("cat", "cats"), ("dog", "dogs"), ("child", "children"), ("teacher", "teachers"),
             ("bird", "birds"), ("farmer", "farmers"))
_PRONOUNS = ("which", "that", "who")
_CLAUSE = ("ate", "saw", "liked", "already", "a", "lot", "of", "food", "near", "the", "quickly", "big",
           "old", "with", "behind")
_ATTRACTORS = (("tree", "trees"), ("house", "houses"), ("car", "cars"), ("friend", "friends"))


@dataclass(frozen=True)
class Agreement(_Classification):
    """Subject-verb number agreement across a distractor clause (Linzen, Dupoux & Goldberg 2016).

    A synthetic grammar: ``T - 1 - distance`` context words (adverbs, no nouns), the subject noun
    (singular or plural, uniform), then a ``distance``-token relative clause: a relative pronoun
    followed by clause words, each an *attractor* noun of random number with probability
    ``p_attractor``. The model predicts the verb number after the last token: 0 = singular ("was"),
    1 = plural ("were") — "The cat, which already ate a lot of food, was full." Chance: accuracy 1/2,
    cross-entropy ln 2. ``vocab`` lists the words; ``encode``/``decode`` map words and ids.
    Token classes: 0 context, 1 subject, 2 clause, 3 attractor.
    """

    name = "agreement"
    source = "Linzen, Dupoux & Goldberg 2016, TACL 4 (number agreement with attractors)"
    class_names = ("context", "subject", "clause", "attractor")

    T: int = 30
    distance: int = 10
    p_attractor: float = 0.2

    def __post_init__(self):
        _positive_int(self.name, "distance", self.distance, 1)
        _positive_int(self.name, "T", self.T, 1)
        if self.distance > self.T - 1:
            raise TaskError(
                f"agreement: distance={self.distance} does not fit in a sequence of T={self.T} "
                f"(the subject needs T >= distance + 1 = {self.distance + 1})"
            )
        if not (0.0 <= float(self.p_attractor) <= 1.0):
            raise TaskError(f"agreement: p_attractor must be a probability in [0, 1], got {self.p_attractor!r}")

    n_classes = 2  # type: ignore[assignment]  (not a setting: singular / plural)

    @property
    def vocab(self) -> tuple[str, ...]:
        subj = tuple(w for pair in _SUBJECTS for w in pair)
        attr = tuple(w for pair in _ATTRACTORS for w in pair)
        return _CONTEXT + subj + _PRONOUNS + _CLAUSE + attr

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, words) -> np.ndarray:
        ids = {w: i for i, w in enumerate(self.vocab)}
        if isinstance(words, str):
            words = words.split()
        try:
            return np.array([ids[w] for w in words], dtype=np.int64)
        except KeyError as exc:
            raise TaskError(f"agreement: word {exc.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids) -> list[str]:
        v = self.vocab
        return [v[int(i)] for i in np.asarray(ids).ravel()]

    def _ranges(self):
        c = len(_CONTEXT)
        s = c + 2 * len(_SUBJECTS)
        p = s + len(_PRONOUNS)
        q = p + len(_CLAUSE)
        return c, s, p, q

    def token_classes(self, x) -> np.ndarray:
        a = _as_tb(x)
        c, s, p, q = self._ranges()
        return np.select([a < c, a < s, a < q], [0, 1, 2], 3).astype(np.int64)

    def targets(self, x) -> np.ndarray:
        """Number of the (single) subject noun of each sequence: 0 singular, 1 plural."""
        a = _as_tb(x)
        c, s, _, _ = self._ranges()
        is_subj = (a >= c) & (a < s)
        if (is_subj.sum(axis=0) != 1).any():
            raise TaskError("agreement: every sequence needs exactly one subject noun")
        subj = a[is_subj.argmax(axis=0), np.arange(a.shape[1])]
        return (subj - c) % 2

    def sample(self, batch: int, seed=None) -> Batch:
        g = rng(seed)
        B = _positive_int(self.name, "batch", batch)
        c, s, p, q = self._ranges()
        T, d = self.T, self.distance
        x = g.integers(0, c, size=(T, B))  # context words
        sp = T - 1 - d
        x[sp] = c + g.integers(0, 2 * len(_SUBJECTS), size=B)
        x[sp + 1] = s + g.integers(0, len(_PRONOUNS), size=B)
        if d > 1:
            words = g.integers(p, q, size=(d - 1, B))
            attr = g.random((d - 1, B)) < self.p_attractor
            nouns = g.integers(q, q + 2 * len(_ATTRACTORS), size=(d - 1, B))
            x[sp + 2:] = np.where(attr, nouns, words)
        return tokens_batch(x, self.targets(x), self.token_classes(x))
