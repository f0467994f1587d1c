"""The standard long-memory benchmarks: adding problem, copy memory, temporal order.

Settings and baselines follow the cited papers; where gradflow has to choose (fixed lengths for
batching, window bounds rounded down), the docstring says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import TaskError
from .base import Batch, Task, _positive_int, real_batch, rng, tokens_batch
from .scenarios import _as_tb

__all__ = ["Adding", "CopyMemory", "TemporalOrder"]

ADDING_VARIANTS = ("arjovsky", "hochreiter")


@dataclass(frozen=True)
class Adding(Task):
    """Adding problem, two channels per step (value, marker); regression read out after the last step.

    ``variant="arjovsky"`` (Arjovsky, Shah & Bengio 2016; Le, Jaitly & Hinton 2015): values U[0, 1],
    one marker uniform in ``[0, T//2)`` and one in ``[T//2, T)``; target = the sum of the two marked
    values. Loss and metric MSE; the constant prediction 1 has MSE Var(U1+U2) = 1/6 ≈ 0.167.
    Solved (gradflow's convention): MSE <= 0.01.

    ``variant="hochreiter"`` (Hochreiter & Schmidhuber 1997, experiment 4): values U[-1, 1]; marker
    channel -1 at the first and last step, 0 elsewhere, +1 at the two marked steps: one of the first
    ten, one of the first ``T//2 - 1`` not yet marked; if step 0 is marked by the first pick its
    value X1 is set to 0 (``zero_first``); T >= 22, so the second range holds every first pick.
    Target ``0.5 + (X1 + X2)/4``; a sequence is correct if |error| < 0.04, solved
    when every evaluated sequence is. Lengths are fixed at T (the paper draws them from [T, T+T/10]).
    The constant prediction 0.5 has MSE 1/24 without the X1 = 0 rule and (1/3·0.9 + 1/3)/16 =
    19/480 ≈ 0.0396 with it; its accuracy is a - a²/4 with a = 0.16 (0.1536), resp.
    0.9·0.1536 + 0.1·0.16 = 0.15424.
    """

    name = "adding"
    source = ("Hochreiter & Schmidhuber 1997, Neural Comput. 9(8), exp. 4; Arjovsky, Shah & Bengio 2016, "
              "ICML; Le, Jaitly & Hinton 2015, arXiv:1504.00941")
    input_kind = "real"
    loss_name = "mse"

    T: int = 100
    variant: str = "arjovsky"
    zero_first: bool = True

    def __post_init__(self):
        if self.variant not in ADDING_VARIANTS:
            raise TaskError(f"adding: variant={self.variant!r} is not one of {', '.join(ADDING_VARIANTS)}")
        _positive_int(self.name, "T", self.T, 2 if self.variant == "arjovsky" else 22)

    @property
    def metric_name(self) -> str:  # type: ignore[override]
        return "mse" if self.variant == "arjovsky" else "accuracy"

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        return self.variant == "hochreiter"

    @property
    def n_features(self) -> int:
        return 2

    @property
    def output_size(self) -> int:
        return 1

    @property
    def chance_loss(self) -> float:
        if self.variant == "arjovsky":
            return 1.0 / 6.0
        var_x1 = (0.9 if self.zero_first else 1.0) / 3.0
        return (var_x1 + 1.0 / 3.0) / 16.0

    @property
    def chance_metric(self) -> float:
        if self.variant == "arjovsky":
            return 1.0 / 6.0
        a = 0.16
        both = a - a * a / 4.0
        return 0.9 * both + 0.1 * a if self.zero_first else both

    @property
    def solved_threshold(self) -> float:
        return 0.01 if self.variant == "arjovsky" else 1.0

    def targets(self, x) -> np.ndarray:
        """[B] targets of a [T, B, 2] input (value, marker): the marked values (marker == 1)."""
        a = np.asarray(x, dtype=np.float64)
        s = np.where(a[..., 1] == 1.0, a[..., 0], 0.0).sum(axis=0)
        return s if self.variant == "arjovsky" else 0.5 + s / 4.0

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> float:
        if self.variant == "arjovsky":
            return super().metric(out, y)
        self._check_out(out, y)
        with torch.no_grad():
            return float(((out.reshape(y.shape).double() - y.double()).abs() < 0.04).double().mean())

    def sample(self, batch: int, seed=None) -> Batch:
        g = rng(seed)
        B = _positive_int(self.name, "batch", batch)
        T, cols = self.T, np.arange(B)
        x = np.zeros((T, B, 2))
        if self.variant == "arjovsky":
            x[..., 0] = g.random((T, B))
            i1 = g.integers(0, T // 2, size=B)
            i2 = g.integers(T // 2, T, size=B)
        else:
            x[..., 0] = g.uniform(-1.0, 1.0, size=(T, B))
            x[0, :, 1] = x[T - 1, :, 1] = -1.0
            i1 = g.integers(0, 10, size=B)
            n2 = T // 2 - 1  # i2 uniform over the first T//2 - 1 positions except i1
            i2 = g.integers(0, n2 - 1, size=B)
            i2 = i2 + (i2 >= i1)
            if self.zero_first:
                x[0, i1 == 0, 0] = 0.0
        x[i1, cols, 1] = 1.0
        x[i2, cols, 1] = 1.0
        return real_batch(x, self.targets(x)[:, None])


@dataclass(frozen=True)
class CopyMemory(Task):
    """Copy memory (Arjovsky, Shah & Bengio 2016; after Hochreiter & Schmidhuber 1997).

    Input of length ``T + 2·n_copy``: ``n_copy`` symbols uniform in ``{1..n_symbols}``, ``T - 1``
    blanks (0), the delimiter ``n_symbols + 1``, ``n_copy`` blanks. Target: ``T + n_copy`` blanks,
    then the ``n_copy`` symbols. Loss: cross-entropy averaged over all ``T + 2·n_copy`` steps; metric:
    accuracy on the last ``n_copy`` steps (the recall). Memoryless baseline (blanks, then a uniform
    guess): cross-entropy ``n_copy·ln(n_symbols)/(T + 2·n_copy)`` = 10·ln 8/(T + 20) for the paper's
    settings; recall accuracy 1/n_symbols. Solved: recall accuracy >= 0.99.
    Token classes: 0 symbol, 1 blank, 2 delimiter.
    """

    name = "copy_memory"
    source = "Arjovsky, Shah & Bengio 2016, ICML (unitary evolution RNNs), copying memory problem"
    readout = "all"
    class_names = ("symbol", "blank", "delimiter")

    T: int = 100
    n_symbols: int = 8
    n_copy: int = 10

    def __post_init__(self):
        _positive_int(self.name, "T", self.T, 1)
        _positive_int(self.name, "n_symbols", self.n_symbols, 2)
        _positive_int(self.name, "n_copy", self.n_copy, 1)

    @property
    def length(self) -> int:
        return self.T + 2 * self.n_copy

    @property
    def vocab_size(self) -> int:
        return self.n_symbols + 2

    @property
    def output_size(self) -> int:
        return self.n_symbols + 1

    @property
    def chance_loss(self) -> float:
        return self.n_copy * math.log(self.n_symbols) / self.length

    @property
    def chance_metric(self) -> float:
        return 1.0 / self.n_symbols

    def targets(self, x) -> np.ndarray:
        a = _as_tb(x)
        y = np.zeros_like(a)
        y[self.T + self.n_copy:] = a[: self.n_copy]
        return y

    def token_classes(self, x) -> np.ndarray:
        a = _as_tb(x)
        return np.select([a == 0, a == self.n_symbols + 1], [1, 2], 0).astype(np.int64)

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> float:
        self._check_out(out, y)
        k = self.n_copy
        with torch.no_grad():
            return float((out[-k:].argmax(-1) == y[-k:]).double().mean())

    def sample(self, batch: int, seed=None) -> Batch:
        g = rng(seed)
        B = _positive_int(self.name, "batch", batch)
        x = np.zeros((self.length, B), dtype=np.int64)
        x[: self.n_copy] = g.integers(1, self.n_symbols + 1, size=(self.n_copy, B))
        x[self.n_copy + self.T - 1] = self.n_symbols + 1
        return tokens_batch(x, self.targets(x), self.token_classes(x))


_WINDOWS = {2: ((0.1, 0.2), (0.5, 0.6)), 3: ((0.1, 0.2), (0.33, 0.43), (0.66, 0.76))}


@dataclass(frozen=True)
class TemporalOrder(Task):
    """Temporal order (Pascanu, Mikolov & Bengio 2013; Hochreiter & Schmidhuber 1997, exp. 6).

    Six symbols, one-hot: A (0), B (1) relevant, C–F (2–5) distractors. ``bits=2``: a relevant
    symbol at a uniform position in ``[0.1T, 0.2T)`` and one in ``[0.5T, 0.6T)``, distractors
    elsewhere; 4 classes (AA, AB, BA, BB) read out after the last step. ``bits=3`` (the 3-bit version
    with 8 classes): windows ``[0.1T, 0.2T)``, ``[0.33T, 0.43T)``, ``[0.66T, 0.76T)`` (H&S's
    positions 10–20, 33–43, 66–76 for T = 100). Bounds are rounded down. Label = the relevant
    symbols read as a binary number, first symbol most significant (A = 0, B = 1). Chance:
    cross-entropy ln 4 (ln 8), accuracy 1/4 (1/8). Solved: accuracy >= 0.99 (Pascanu et al.'s
    success: error below 1%). Token classes: 0 relevant, 1 distractor.
    """

    name = "temporal_order"
    source = "Pascanu, Mikolov & Bengio 2013, ICML; Hochreiter & Schmidhuber 1997, Neural Comput. 9(8), exp. 6"
    class_names = ("relevant", "distractor")

    T: int = 100
    bits: int = 2

    def __post_init__(self):
        if self.bits not in _WINDOWS:
            raise TaskError(f"temporal_order: bits must be 2 or 3, got {self.bits!r}")
        _positive_int(self.name, "T", self.T, 1)
        if any(hi <= lo for lo, hi in self.windows):
            raise TaskError(f"temporal_order: T={self.T} is too short: a position window {self.windows} is empty")

    @property
    def windows(self) -> list[tuple[int, int]]:
        return [(int(math.floor(a * self.T)), int(math.floor(b * self.T))) for a, b in _WINDOWS[self.bits]]

    @property
    def vocab_size(self) -> int:
        return 6

    @property
    def output_size(self) -> int:
        return 2 ** self.bits

    @property
    def chance_loss(self) -> float:
        return math.log(self.output_size)

    @property
    def chance_metric(self) -> float:
        return 1.0 / self.output_size

    def targets(self, x) -> np.ndarray:
        a = _as_tb(x)
        rel = a < 2
        if (rel.sum(axis=0) != self.bits).any():
            raise TaskError(f"temporal_order: every sequence needs exactly {self.bits} relevant symbols")
        order = np.argsort(~rel, axis=0, kind="stable")[: self.bits]  # relevant positions, in time order
        symbols = np.take_along_axis(a, order, axis=0)
        weights = 2 ** np.arange(self.bits - 1, -1, -1)[:, None]
        return (symbols * weights).sum(axis=0)

    def token_classes(self, x) -> np.ndarray:
        return (_as_tb(x) >= 2).astype(np.int64)

    def sample(self, batch: int, seed=None) -> Batch:
        g = rng(seed)
        B = _positive_int(self.name, "batch", batch)
        x = g.integers(2, 6, size=(self.T, B))
        cols = np.arange(B)
        for lo, hi in self.windows:
            x[g.integers(lo, hi, size=B), cols] = g.integers(0, 2, size=B)
        return tokens_batch(x, self.targets(x), self.token_classes(x))
