"""The cell-kind registry: one :class:`CellKind` per recurrence, holding everything gradflow knows about it.

A kind is declared here, without importing torch: its name, a one-line description, its state
names, its gates (name and label), the structure of its recurrent Jacobian and its model options.
Everything that needs torch lives in **one implementation module per kind** (``gradflow.kinds.lstm``,
``gradflow.kinds.lru``, ...), imported on first use of :attr:`CellKind.impl`: the recording kernel
(one recorded recurrence whose backward hands δ_t over), the linearization (per-step coefficients,
J v, Jᵀ u, dense J), gate activations and how the model zoo builds and initialises the layer. The
recording adapters, the analysis and the report read kinds from this registry only; they hold no
per-kind code.

Jacobian structures (:data:`STRUCTURES`), with J_t = ∂s_t/∂s_{t-1} of the joint state s:

* ``"dense"``: a general S×S matrix (tanh/ReLU RNN, LSTM, GRU, user cells);
* ``"diagonal"``: J_t = diag(d_t) (minGRU, minLSTM, IndRNN); products and Lyapunov exponents are
  exact per-unit products and time averages of ln|d_t|, with no QR;
* ``"complex_diagonal"``: a complex diagonal λ_t stored as the real 2N state [Re h; Im h], so that
  J_t = [[diag(Re λ), −diag(Im λ)], [diag(Im λ), diag(Re λ)]] (LRU); each unit contributes |λ| twice
  to every spectrum.

The model zoo (:func:`zoo`) offers every kind under its own name plus *presets*: a kind with fixed
settings (``irnn``) or a model built elsewhere (``mgu``, a cell registered with
``gradflow.register_cell``).
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

from ..errors import GradflowError

__all__ = ["CellKind", "Gate", "ZooCell", "STRUCTURES", "register_kind", "unregister_kind", "get", "names", "kinds",
           "zoo", "zoo_cell", "model_options", "for_gates", "CUSTOM"]

STRUCTURES = ("dense", "diagonal", "complex_diagonal")


@dataclass(frozen=True)
class Gate:
    """A gate of a cell: its name in tables (``"f"``) and the label figures show (``"forget gate f"``)."""

    name: str
    label: str


@dataclass(frozen=True, eq=False)
class CellKind:
    """Everything gradflow knows about one recurrence (see the module docstring).

    name: the key of the registry and ``CellInfo.kind``; states: state names in joint-state order
    (empty: given per unit by its ``CellInfo``, as for user cells); gates: in the order gate
    statistics are reported; structure: one of :data:`STRUCTURES`; options: the model options of
    the zoo layer with their defaults (spec keys in ``[model]``); gate_note: a sentence for the
    report on how to read the gates; impl: ``"module:attribute"`` of the implementation object
    (loaded lazily, see :attr:`impl`)."""

    name: str
    description: str
    impl_path: str
    states: tuple[str, ...] = ("h",)
    gates: tuple[Gate, ...] = ()
    structure: str = "dense"
    options: Mapping[str, Any] = field(default_factory=dict)
    gate_note: str = ""
    in_zoo: bool = True

    def __post_init__(self):
        if not self.name.isidentifier():
            raise GradflowError(f"CellKind name {self.name!r} must be an identifier")
        if self.structure not in STRUCTURES:
            raise GradflowError(f"CellKind {self.name!r}: structure={self.structure!r} is not one of "
                                f"{', '.join(STRUCTURES)}")
        if ":" not in self.impl_path:
            raise GradflowError(f"CellKind {self.name!r}: impl_path must be 'module:attribute', got {self.impl_path!r}")

    @property
    def gate_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.gates)

    def gate_label(self, gate: str) -> str:
        return next((g.label for g in self.gates if g.name == gate), f"gate {gate}")

    @cached_property
    def impl(self):
        """The implementation object (imports its module, and torch, on first access)."""
        module, _, attr = self.impl_path.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        obj.kind = self
        return obj

    def __repr__(self) -> str:
        return f"CellKind({self.name!r}, structure={self.structure!r}, gates={self.gate_names})"


@dataclass(frozen=True)
class ZooCell:
    """A model-zoo entry: ``kind``'s layer with fixed settings. ``init`` fixes the recurrent
    initialisation (``None``: the user chooses); ``zero_bias`` zeroes every bias; ``builder``
    (``"module:attribute"``) builds the model instead of the kind's own layer."""

    name: str
    kind: str
    description: str
    init: str | None = None
    zero_bias: bool = False
    builder: str = ""

    @property
    def cell_kind(self) -> CellKind:
        return get(self.kind)

    def load_builder(self):
        """The object that builds this entry's recurrent module (the kind's implementation by default)."""
        if not self.builder:
            return self.cell_kind.impl
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)


_KINDS: dict[str, CellKind] = {}
_ZOO: dict[str, ZooCell] = {}


def register_kind(kind: CellKind, *, replace: bool = False) -> CellKind:
    """Add ``kind`` to the registry (and, if ``kind.in_zoo``, to the model zoo under its name).
    Built-in kinds are registered the same way, below."""
    if not isinstance(kind, CellKind):
        raise GradflowError(f"register_kind expects a CellKind, got {type(kind).__name__}")
    if kind.name in _KINDS and not replace:
        raise GradflowError(f"cell kind {kind.name!r} is already registered (pass replace=True to replace it)")
    _KINDS[kind.name] = kind
    if kind.in_zoo:
        _ZOO[kind.name] = ZooCell(kind.name, kind.name, kind.description)
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind registered with :func:`register_kind` (and its zoo entry)."""
    _KINDS.pop(name, None)
    if name in _ZOO and _ZOO[name].kind == name:
        del _ZOO[name]


def _preset(cell: ZooCell) -> None:
    _ZOO[cell.name] = cell


def _nearest(name, options) -> str:
    m = difflib.get_close_matches(str(name), list(options), n=1, cutoff=0.4)
    return f"; did you mean {m[0]!r}?" if m else ""


def get(name: str) -> CellKind:
    """The registered kind ``name`` (one-line GradflowError naming the nearest kind otherwise)."""
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise GradflowError(f"unknown cell kind {name!r}{_nearest(name, _KINDS)} (kinds: {', '.join(_KINDS)})") \
            from None


def names() -> list[str]:
    return list(_KINDS)


def kinds() -> list[CellKind]:
    return list(_KINDS.values())


def zoo() -> dict[str, ZooCell]:
    """The model zoo, name -> entry, in listing order."""
    return dict(_ZOO)


def zoo_cell(name: str) -> ZooCell:
    try:
        return _ZOO[name]
    except (KeyError, TypeError):
        raise GradflowError(f"unknown cell {name!r}{_nearest(name, _ZOO)} (known: {', '.join(_ZOO)})") from None


def model_options() -> dict[str, list[str]]:
    """Every kind-specific model option -> the kinds that take it."""
    out: dict[str, list[str]] = {}
    for k in _KINDS.values():
        for opt in k.options:
            out.setdefault(opt, []).append(k.name)
    return out


def for_gates(gates) -> CellKind | None:
    """The registered kind whose gate names are exactly ``gates`` (in any order), else the first whose
    gates include them, else None; lets a report label the gates of a table that does not name its kind."""
    want = set(gates)
    gated = [k for k in _KINDS.values() if k.gates]
    return (next((k for k in gated if set(k.gate_names) == want), None)
            or next((k for k in gated if want and want <= set(k.gate_names)), None))


# ---------------------------------------------------------------------- the built-in kinds
_P = "gradflow.kinds."
register_kind(CellKind("rnn_tanh", "Elman RNN, tanh", _P + "rnn:TANH"))
register_kind(CellKind("rnn_relu", "Elman RNN, ReLU", _P + "rnn:RELU"))
_preset(ZooCell("irnn", "rnn_relu", "ReLU RNN with identity recurrent init and zero biases (Le et al. 2015)",
                init="identity", zero_bias=True))
register_kind(CellKind(
    "lstm", "LSTM, gates i, f, g, o", _P + "lstm:LSTM", states=("h", "c"),
    gates=(Gate("i", "input gate i"), Gate("f", "forget gate f"), Gate("g", "candidate g (tanh)"),
           Gate("o", "output gate o")),
    options={"forget_bias": None},
    gate_note="In an LSTM a forget gate f near 1 keeps the cell state and lets the gradient through unchanged; "
              "near 0 it erases (and blocks the gradient)."))
register_kind(CellKind(
    "gru", "GRU, gates r, z, n", _P + "gru:GRU",
    gates=(Gate("r", "reset gate r"), Gate("z", "update gate z"), Gate("n", "candidate n (tanh)")),
    gate_note="In a GRU an update gate z near 1 keeps the previous state (new h = (1 − z)·n + z·h)."))
CUSTOM = register_kind(CellKind(
    "custom", "a cell registered with gradflow.register_cell, differentiated with torch.func",
    _P + "custom:CUSTOM", states=(), in_zoo=False))
_preset(ZooCell("mgu", "custom", "Minimal Gated Unit (Zhou et al. 2016), custom cell in a Python loop",
                builder="gradflow.models.custom:MGU"))
register_kind(CellKind(
    "mingru", "minGRU (Feng et al. 2024): h = (1 − z) h + z h̃, gate and candidate from x only",
    _P + "mingru:MINGRU", gates=(Gate("z", "update gate z (1 = take the candidate)"),), structure="diagonal",
    gate_note="In a minGRU the update gate z near 0 keeps the previous state (new h = (1 − z)·h + z·h̃), "
              "the opposite of the GRU's z."))
register_kind(CellKind(
    "minlstm", "minLSTM (Feng et al. 2024): h = f′ h + i′ h̃ with f′ + i′ = 1, gates from x only",
    _P + "minlstm:MINLSTM",
    gates=(Gate("f", "forget gate f′ = f/(f+i)"), Gate("i", "input gate i′ = i/(f+i)")), structure="diagonal",
    gate_note="In a minLSTM the normalised forget gate f′ = f/(f + i) is the whole Jacobian: near 1 it keeps "
              "the state and the gradient, near 0 it erases both."))
register_kind(CellKind("indrnn", "IndRNN (Li et al. 2018): h = relu(W x + u ⊙ h + b), per-unit recurrent weights",
                       _P + "indrnn:INDRNN", structure="diagonal"))
register_kind(CellKind(
    "lru", "LRU (Orvieto et al. 2023): complex diagonal linear recurrence, ring init |λ| in [r_min, r_max]",
    _P + "lru:LRU_KIND", structure="complex_diagonal",
    options={"r_min": 0.0, "r_max": 1.0, "max_phase": 6.283185307179586, "activation": "gelu"}))
