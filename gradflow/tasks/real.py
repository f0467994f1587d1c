"""Embedded real data, nothing downloaded: character-level language modelling on text shipped with
Python (or any text file), and next-step forecasting on the sample data bundled with matplotlib.

Windows of ``T + 1`` consecutive items start at uniform positions; inputs are the first ``T``,
targets the last ``T`` (a prediction after every step, readout ``"all"``).
"""

from __future__ import annotations

from abc import abstractmethod

import functools
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import TaskError
from .base import Batch, Task, _positive_int, real_batch, rng, tokens_batch

__all__ = ["CharLM", "Forecast", "Stocks", "EEG", "Membrane", "stdlib_text", "sample_data_path"]


# ---------------------------------------------------------------------------------- text
def stdlib_text(max_chars: int = 1_000_000) -> str:
    """The sources of the standard library's top-level modules (``<stdlib>/*.py`` in sorted order,
    separated by a newline), cut at ``max_chars``."""
    return _stdlib_text(int(max_chars))


@functools.lru_cache(maxsize=4)
def _stdlib_text(max_chars: int) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, n = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            t = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(t)
        n += len(t) + 1
        if n >= max_chars:
            break
    text = "\n".join(parts)[:max_chars]
    if not text:
        raise TaskError(f"char_lm: found no Python sources under {root}")
    return text


@functools.lru_cache(maxsize=8)
def _file_text(path: str, max_chars: int, mtime: float) -> str:
    p = Path(path)
    try:
        with open(p, encoding="utf-8", errors="replace") as fh:
            text = fh.read(max_chars)
    except FileNotFoundError:
        raise TaskError(f"char_lm: text file {path} does not exist") from None
    except IsADirectoryError:
        raise TaskError(f"char_lm: text file {path} is a directory") from None
    except OSError as exc:
        raise TaskError(f"char_lm: cannot read text file {path} ({exc.strerror or exc})") from None
    if not text:
        raise TaskError(f"char_lm: text file {path} is empty")
    return text


@dataclass(frozen=True)
class _Encoded:
    chars: str
    ids: np.ndarray  # int64 [N]
    entropy: float  # unigram entropy in nats


@functools.lru_cache(maxsize=8)
def _encode(text: str) -> _Encoded:
    chars = "".join(sorted(set(text)))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((lut[c] for c in text), dtype=np.int64, count=len(text))
    p = np.bincount(ids, minlength=len(chars)) / len(ids)
    p = p[p > 0]
    return _Encoded(chars, ids, float(-(p * np.log(p)).sum()))


@dataclass(frozen=True)
class CharLM(Task):
    """Character-level language modelling: predict the next character after every step.

    Text: the Python standard library's sources (``path=None``, the installed Python's
    ``<stdlib>/*.py``, first ``max_chars`` characters) or any UTF-8 text file ``path`` (undecodable
    bytes replaced). The vocabulary is the set of characters of the text. Loss: cross-entropy
    (nats); metric: bits per character. Memoryless baseline: the unigram distribution of the text,
    whose cross-entropy is its entropy (in bits: ``chance``). Solved (gradflow's convention):
    bits/char <= half the unigram entropy. Token classes: 0 letter, 1 digit, 2 whitespace, 3 other.
    ``holdout``: the last share of the text (default 0.2) is held out: training windows come from
    the rest, the evaluation batch (``sample_eval``) from it alone; 0 evaluates in sample.
    (Karpathy, Johnson & Fei-Fei 2015 study LSTM gates on character-level models of source code.)
    """

    name = "char_lm"
    source = "Karpathy, Johnson & Fei-Fei 2015, arXiv:1506.02078 (character-level LMs of code)"
    readout = "all"
    metric_name = "bits_per_char"
    higher_is_better = False
    class_names = ("letter", "digit", "space", "other")

    T: int = 100
    path: str | None = None
    max_chars: int = 1_000_000
    holdout: float = 0.2

    def __post_init__(self):
        _positive_int(self.name, "T", self.T, 1)
        _positive_int(self.name, "max_chars", self.max_chars, 1)
        n = len(self._data().ids)
        if n < self.T + 1:
            raise TaskError(
                f"char_lm: the text of {self._source_name()} has {n} characters, fewer than T+1 = {self.T + 1}"
            )
        _check_holdout(self.name, self.holdout, n, self.T)

    def _source_name(self) -> str:
        return "the standard library" if self.path is None else str(self.path)

    def text(self) -> str:
        if self.path is None:
            return stdlib_text(self.max_chars)
        p = os.fspath(self.path)
        try:
            mtime = os.stat(p).st_mtime
        except FileNotFoundError:
            raise TaskError(f"char_lm: text file {p} does not exist") from None
        except OSError as exc:
            raise TaskError(f"char_lm: cannot read text file {p} ({exc.strerror or exc})") from None
        return _file_text(p, int(self.max_chars), mtime)

    def _data(self) -> _Encoded:
        return _encode(self.text())

    @property
    def chars(self) -> str:
        """The vocabulary: character ``i`` has id ``i``."""
        return self._data().chars

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def output_size(self) -> int:
        return self.vocab_size

    @property
    def chance_loss(self) -> float:
        return self._data().entropy

    @property
    def chance_metric(self) -> float:
        return self._data().entropy / math.log(2)

    @property
    def solved_threshold(self) -> float:
        return 0.5 * self.chance_metric

    def unigram_logits(self) -> torch.Tensor:
        """[V] log-probabilities of the unigram (memoryless) predictor (-inf never occurs)."""
        d = self._data()
        return torch.from_numpy(np.log(np.bincount(d.ids, minlength=len(d.chars)) / len(d.ids)))

    def encode(self, text: str) -> np.ndarray:
        lut = {c: i for i, c in enumerate(self.chars)}
        try:
            return np.array([lut[c] for c in text], dtype=np.int64)
        except KeyError as exc:
            raise TaskError(f"char_lm: character {exc.args[0]!r} is not in the vocabulary") from None

    def token_classes(self, x) -> np.ndarray:
        chars = self.chars
        lut = np.array([0 if c.isalpha() else 1 if c.isdigit() else 2 if c.isspace() else 3 for c in chars])
        return lut[np.asarray(x)]

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(self.loss(out.double(), y)) / math.log(2)

    def sample(self, batch: int, seed=None, split: str = "train") -> Batch:
        g = rng(seed)
        B = _positive_int(self.name, "batch", batch)
        ids = self._data().ids
        start = _window_starts(len(ids), self.T, self.holdout, split, g, B)
        idx = start[None, :] + np.arange(self.T + 1)[:, None]
        w = ids[idx]
        return tokens_batch(w[:-1], w[1:], self.token_classes(w[:-1]))

    def sample_eval(self, batch: int, seed=None) -> Batch:
        return self.sample(batch, seed, split="eval")


def _check_holdout(task: str, holdout, n: int, T: int) -> None:
    """A chronological split of n steps: training windows in the first part, evaluation windows in
    the last ``holdout`` share; each part must hold one window of T+1 steps."""
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or not 0 <= holdout < 1:
        raise TaskError(f"{task}: holdout must be a number in [0, 1) (the held-out share), got {holdout!r}")
    cut = _cut(n, holdout)
    if holdout and (cut < T + 1 or n - cut < T + 1):
        raise TaskError(f"{task}: holdout={holdout} splits {n} steps into {cut} for training and {n - cut} held out; "
                        f"each part needs at least T+1 = {T + 1} (lower T or change holdout)")


def _cut(n: int, holdout: float) -> int:
    """Index of the first held-out step (n when nothing is held out)."""
    return n - int(round(holdout * n))


def _window_starts(n: int, T: int, holdout: float, split: str, g: np.random.Generator, B: int) -> np.ndarray:
    """Start indices of B windows of T+1 steps: inside [0, cut) for 'train', inside [cut, n) for
    'eval'; the whole range for both when nothing is held out."""
    if split not in ("train", "eval"):
        raise TaskError(f"split={split!r} must be 'train' or 'eval'")
    cut = _cut(n, holdout)
    if not holdout:
        return g.integers(0, n - T, size=B)
    return g.integers(0, cut - T, size=B) if split == "train" else g.integers(cut, n - T, size=B)


# ---------------------------------------------------------------------------------- series
def sample_data_path(name: str) -> Path:
    """Path of a file in matplotlib's bundled sample data (``mpl-data/sample_data``)."""
    import matplotlib.cbook as cbook

    try:
        p = Path(cbook.get_sample_data(name, asfileobj=False))
    except (OSError, ValueError) as exc:
        raise TaskError(f"matplotlib sample data file {name} is not available ({exc})") from None
    if not p.is_file():
        raise TaskError(f"matplotlib sample data file {p} does not exist")
    return p


STOCK_TRANSFORMS = ("log_return", "log_level")


@functools.lru_cache(maxsize=1)
def _stocks_monthly():
    import pandas as pd

    p = sample_data_path("Stocks.csv")
    d = pd.read_csv(p, comment="#", parse_dates=["Date"])
    d = d.dropna(how="all", subset=list(d.columns[1:]))
    return d.groupby(d["Date"].dt.to_period("M")).last().drop(columns="Date")


class Forecast(Task):
    """Next-step forecasting of a standardised real series, MSE after every step.

    Inputs ``[T, B, F]`` are windows of the series (each channel z-scored over the whole series),
    targets the same windows shifted by one step. Baseline: the better of the two memoryless
    predictors over every one-step pair of the evaluated (held-out) part — the constant (the mean of
    its targets) and
    persistence (predict ``x_{t+1} = x_t``); ``baseline_kind`` says which. Solved (gradflow's
    convention): MSE <= half the baseline. ``holdout`` (a field of each series task, default 0.2):
    the last share of the series is held out; training windows come from the rest, the evaluation
    batch (``sample_eval``) from it alone; 0 evaluates in sample.
    """

    input_kind = "real"
    readout = "all"
    loss_name = "mse"
    metric_name = "mse"
    higher_is_better = False

    @abstractmethod
    def series(self) -> np.ndarray:  # [N, F] float64, standardised
        """The whole series, [N, F] float64, standardised."""

    def regimes(self) -> np.ndarray | None:  # [N] int token classes, or None
        return None

    def _post(self):
        T = _positive_int(self.name, "T", self.T, 1)  # type: ignore[attr-defined]
        n = len(self.series())
        if n < T + 1:
            raise TaskError(f"{self.name}: the series has {n} steps, fewer than T+1 = {T + 1}")
        _check_holdout(self.name, self.holdout, n, T)  # type: ignore[attr-defined]

    @property
    def n_features(self) -> int:
        return int(self.series().shape[1])

    @property
    def output_size(self) -> int:
        return self.n_features

    def _baselines(self) -> dict[str, float]:
        """Memoryless predictors over every one-step pair of the evaluated part: the held-out tail
        (the whole series with holdout 0), the data the evaluation metric is measured on."""
        s = self.series()
        s = s[_cut(len(s), self.holdout) if self.holdout else 0:]  # type: ignore[attr-defined]
        y = s[1:]
        return {
            "constant": float(((y - y.mean(axis=0)) ** 2).mean()),
            "persistence": float(((y - s[:-1]) ** 2).mean()),
        }

    @property
    def baseline_kind(self) -> str:
        b = self._baselines()
        return min(b, key=b.get)

    @property
    def chance_loss(self) -> float:
        return min(self._baselines().values())

    @property
    def chance_metric(self) -> float:
        return self.chance_loss

    @property
    def solved_threshold(self) -> float:
        return 0.5 * self.chance_loss

    def describe(self) -> dict:
        d = super().describe()
        d["baseline_kind"] = self.baseline_kind
        d["baselines"] = self._baselines()
        d["n_steps"] = int(len(self.series()))
        return d

    def sample(self, batch: int, seed=None, split: str = "train") -> Batch:
        g = rng(seed)
        B = _positive_int(self.name, "batch", batch)
        s = self.series()
        start = _window_starts(len(s), self.T, self.holdout, split, g, B)  # type: ignore[attr-defined]
        idx = start[None, :] + np.arange(self.T + 1)[:, None]  # type: ignore[attr-defined]
        w = s[idx]  # [T+1, B, F]
        reg = self.regimes()
        return real_batch(w[:-1], w[1:], None if reg is None else reg[idx[:-1]])

    def sample_eval(self, batch: int, seed=None) -> Batch:
        return self.sample(batch, seed, split="eval")


def _zscore(a: np.ndarray) -> np.ndarray:
    sd = a.std(axis=0)
    return (a - a.mean(axis=0)) / np.where(sd > 0, sd, 1.0)


@dataclass(frozen=True)
class Stocks(Forecast):
    """Monthly stock prices 1990-01 – 2022-06 from matplotlib's ``Stocks.csv`` (Yahoo Finance;
    IBM, AAPL, MSFT, XRX, AMZN, DELL, GOOGL, ADBE, ^GSPC, ^IXIC), the last quote of each month.
    ``transform="log_return"`` (default: log(p_t/p_{t-1})) or ``"log_level"`` (log p_t), z-scored.
    Series that start later (AMZN 1997, GOOGL 2004, DELL 2016) begin at the first month all chosen
    symbols quote; a series with a gap after that is refused. Token classes (regimes of the first
    symbol): 0 bull, 1 bear (price >= 20% below its running peak) — the 2000–2002 and 2007–2009
    bear markets among them.
    """

    name = "stocks"
    source = "matplotlib sample data Stocks.csv (monthly quotes, Yahoo Finance)"
    class_names = ("bull", "bear")

    T: int = 48
    symbols: tuple[str, ...] = ("^GSPC",)
    transform: str = "log_return"
    holdout: float = 0.2

    def __post_init__(self):
        if isinstance(self.symbols, str):
            object.__setattr__(self, "symbols", (self.symbols,))
        else:
            object.__setattr__(self, "symbols", tuple(self.symbols))
        if self.transform not in STOCK_TRANSFORMS:
            raise TaskError(f"stocks: transform={self.transform!r} is not one of {', '.join(STOCK_TRANSFORMS)}")
        self._post()

    def prices(self):
        """Monthly prices of ``symbols`` (pandas DataFrame indexed by month), from the first month all quote."""
        m = _stocks_monthly()
        if not self.symbols:
            raise TaskError("stocks: symbols must name at least one column")
        bad = [s for s in self.symbols if s not in m.columns]
        if bad:
            import difflib

            near = difflib.get_close_matches(bad[0], list(m.columns), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise TaskError(f"stocks: no symbol {bad[0]!r} in Stocks.csv{hint}; known: {', '.join(m.columns)}")
        p = m[list(self.symbols)]
        first = p.notna().all(axis=1).to_numpy().argmax()
        p = p.iloc[first:]
        if p.isna().any().any():
            gap = p.columns[p.isna().any()].tolist()
            raise TaskError(f"stocks: symbol(s) {', '.join(gap)} have gaps in Stocks.csv; choose others")
        return p

    def _raw(self) -> np.ndarray:
        logp = np.log(self.prices().to_numpy(dtype=np.float64))
        return np.diff(logp, axis=0) if self.transform == "log_return" else logp

    def series(self) -> np.ndarray:
        return _cached_series(("stocks", self.symbols, self.transform), self._raw)

    def regimes(self) -> np.ndarray:
        p = self.prices().to_numpy(dtype=np.float64)[:, 0]
        bear = (p <= 0.8 * np.maximum.accumulate(p)).astype(np.int64)
        return bear[1:] if self.transform == "log_return" else bear


@dataclass(frozen=True)
class EEG(Forecast):
    """Four EEG channels, 800 samples each (matplotlib's ``eeg.dat``: float64, 800 × 4, 10 s, the
    trace of its ``mri_with_eeg`` example), z-scored per channel."""

    name = "eeg"
    source = "matplotlib sample data eeg.dat (example mri_with_eeg)"

    T: int = 50
    holdout: float = 0.2

    def __post_init__(self):
        self._post()

    def series(self) -> np.ndarray:
        def load():
            p = sample_data_path("eeg.dat")
            a = np.fromfile(p, dtype=np.float64)
            if a.size != 800 * 4:
                raise TaskError(f"{p}: expected 800 x 4 float64 samples, found {a.size} values")
            return a.reshape(800, 4)

        return _cached_series(("eeg",), load)


@dataclass(frozen=True)
class Membrane(Forecast):
    """A membrane-potential recording, 12000 float32 samples (matplotlib's ``membrane.dat``),
    z-scored; one channel."""

    name = "membrane"
    source = "matplotlib sample data membrane.dat"

    T: int = 100
    holdout: float = 0.2

    def __post_init__(self):
        self._post()

    def series(self) -> np.ndarray:
        def load():
            p = sample_data_path("membrane.dat")
            a = np.fromfile(p, dtype=np.float32).astype(np.float64)
            if a.size == 0:
                raise TaskError(f"{p}: the file is empty")
            return a[:, None]

        return _cached_series(("membrane",), load)


_SERIES: dict[tuple, np.ndarray] = {}


def _cached_series(key: tuple, load) -> np.ndarray:
    if key not in _SERIES:
        a = _zscore(np.asarray(load(), dtype=np.float64))
        a.setflags(write=False)
        _SERIES[key] = a
    return _SERIES[key]
