"""What every built-in task is: a frozen dataclass of settings plus a deterministic generator.

A task knows how to make a batch, its loss, its metric, the chance-level baseline (the loss and the
metric of the best constant / memoryless predictor, stated in the task's docstring with its source)
and when it counts as solved. Tensors are time-major: inputs ``x`` are ``[T, B]`` int64 tokens
(``input_kind == "tokens"``, ``vocab_size`` symbols; the models one-hot encode them) or ``[T, B, F]``
float32 (``input_kind == "real"``, ``n_features`` channels). Targets ``y`` are ``[B]`` (readout
``"last"``: one prediction after the last step) or ``[T, B]`` / ``[T, B, F]`` (readout ``"all"``: a
prediction after every step). Model outputs are ``[B, C]`` or ``[T, B, C]`` accordingly.

``Batch.classes`` is a ``[T, B]`` int array of token classes (names in ``Task.class_names``) where a
task has them, for splitting gate statistics by class; ``None`` otherwise.

Seeds: ``task.sample(batch, seed)`` with an int seed (or a ``numpy.random.Generator``) returns the
same batch on every platform for the same settings; all randomness comes from numpy's PCG64.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import TaskError

__all__ = ["Batch", "Task", "rng"]


@dataclass(frozen=True)
class Batch:
    """One batch: ``x`` [T, B] int64 or [T, B, F] float32; ``y`` [B] or [T, B] (int64 classes) or
    [B, F] / [T, B, F] (float32 regression targets); ``classes`` [T, B] int64 numpy or None."""

    x: torch.Tensor
    y: torch.Tensor
    classes: np.ndarray | None = None

    def to(self, device) -> "Batch":
        return Batch(self.x.to(device), self.y.to(device), self.classes)

    @property
    def T(self) -> int:
        return int(self.x.shape[0])

    @property
    def B(self) -> int:
        return int(self.x.shape[1])


def rng(seed: int | np.random.Generator | None) -> np.random.Generator:
    """A numpy Generator from an int seed (or the Generator itself)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        return np.random.default_rng()
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        return np.random.default_rng(int(seed))
    raise TaskError(f"seed must be a non-negative int or a numpy Generator, got {seed!r}")


def _positive_int(task: str, name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise TaskError(f"{task}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Task(ABC):
    """Base class of the built-in tasks (subclasses are frozen dataclasses).

    Class attributes set by each task: ``name``, ``source`` (citation), ``input_kind``
    (``"tokens" | "real"``), ``readout`` (``"last" | "all"``), ``loss_name``
    (``"cross_entropy" | "mse"``), ``metric_name`` (``"accuracy" | "mse" | "bits_per_char"``),
    ``higher_is_better``, ``class_names`` (token classes, or ``()``).
    """

    name: ClassVar[str] = ""
    source: ClassVar[str] = ""
    input_kind: ClassVar[str] = "tokens"
    readout: ClassVar[str] = "last"
    loss_name: ClassVar[str] = "cross_entropy"
    metric_name: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    class_names: ClassVar[tuple[str, ...]] = ()

    # --------------------------------------------------------------- to be provided by a task
    @property
    def length(self) -> int:
        """Number of input steps T."""
        return int(self.T)  # type: ignore[attr-defined]

    @property
    def vocab_size(self) -> int:
        """Number of input symbols (token tasks)."""
        raise TaskError(f"task {self.name!r} has real-valued inputs ({self.input_kind}), not a vocabulary")

    @property
    def n_features(self) -> int:
        """Input channels: ``vocab_size`` for token tasks (one-hot), else the real channels."""
        return self.vocab_size

    @property
    @abstractmethod
    def output_size(self) -> int:
        """Number of classes (cross-entropy) or regression outputs (MSE)."""


    @property
    @abstractmethod
    def chance_loss(self) -> float:
        """Loss of the best constant/memoryless predictor (see the task's docstring)."""


    @property
    @abstractmethod
    def chance_metric(self) -> float:
        """Metric of that predictor."""


    @property
    def solved_threshold(self) -> float:
        """The metric value at (or beyond, in the good direction) which the task counts as solved."""
        return 0.99

    def solved_criterion(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        return f"{self.metric_name} {op} {self.solved_threshold:.6g}"

    @abstractmethod
    def sample(self, batch: int, seed: int | np.random.Generator | None = None) -> Batch:
        """A batch of ``batch`` sequences; deterministic for an int seed."""

    def sample_eval(self, batch: int, seed: int | np.random.Generator | None = None) -> Batch:
        """The evaluation batch. A generated task draws fresh sequences (``sample`` with another
        seed); a task over one fixed recording (text, series) draws its windows from the held-out
        part only, so the evaluation is out of sample."""
        return self.sample(batch, seed)

    # --------------------------------------------------------------- shared behaviour
    def solved(self, metric: float) -> bool:
        if not math.isfinite(metric):
            return False
        return metric >= self.solved_threshold if self.higher_is_better else metric <= self.solved_threshold

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss over every target (cross-entropy on logits, or MSE)."""
        self._check_out(out, y)
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.mse_loss(out.reshape(y.shape), y.to(out.dtype))

    def metric(self, out: torch.Tensor, y: torch.Tensor) -> float:
        """The task metric on one batch (accuracy over every target, or MSE)."""
        self._check_out(out, y)
        with torch.no_grad():
            if self.metric_name == "accuracy":
                return float((out.argmax(-1) == y).double().mean())
            if self.metric_name == "mse":
                return float(F.mse_loss(out.reshape(y.shape).double(), y.double()))
        raise TaskError(f"task {self.name!r}: metric {self.metric_name!r} has no generic implementation; "
                        "the task must override metric()")

    def _check_out(self, out: torch.Tensor, y: torch.Tensor) -> None:
        if self.loss_name == "cross_entropy":
            ok = (out.dim() == y.dim() + 1 and tuple(out.shape[:-1]) == tuple(y.shape)
                  and out.shape[-1] == self.output_size)
            want = f"{tuple(y.shape) + (self.output_size,)}"
        else:
            ok = out.numel() == y.numel() and out.shape[0] == y.shape[0]
            want = f"{tuple(y.shape)}"
        if not ok:
            raise TaskError(f"{self.name}: model output has shape {tuple(out.shape)}, expected {want}")

    def options(self) -> dict:
        """The task's settings (dataclass fields) as plain JSON values."""
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def describe(self) -> dict:
        """Everything a run directory states about the task (``run.json["task"]``)."""
        return {
            "name": self.name,
            "T": self.length,
            "options": self.options(),
            "input_kind": self.input_kind,
            "n_features": self.n_features,
            "output_size": self.output_size,
            "readout": self.readout,
            "loss": self.loss_name,
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "chance": self.chance_metric,
            "chance_loss": self.chance_loss,
            "solved": self.solved_criterion(),
            "solved_threshold": self.solved_threshold,
            "class_names": list(self.class_names),
            "source": self.source,
        }


def tokens_batch(x: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> Batch:
    """Batch from numpy [T, B] tokens and int targets."""
    return Batch(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
        None if classes is None else np.ascontiguousarray(classes, dtype=np.int64),
    )


def real_batch(x: np.ndarray, y: np.ndarray, classes: np.ndarray | None = None) -> Batch:
    """Batch from numpy [T, B, F] float inputs and float targets."""
    return Batch(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)),
        None if classes is None else np.ascontiguousarray(classes, dtype=np.int64),
    )
