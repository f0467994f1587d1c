"""The cell zoo: a small classifier / regressor / language model around one recurrent module.

:class:`SequenceModel` maps time-major inputs to outputs::

    x [T, B] int tokens  --one-hot-->  [T, B, V]
    x [T, B, F] real     ------------>  recurrent module (the cell's layer: nn.RNN/LSTM/GRU, a
                                        gradflow.kinds layer, or a CellLoop of a registered custom
                                        cell)  -->  h [T, B, H]
    readout "last": head(dropout(h[T-1])) -> [B, C];  readout "all": head(dropout(h)) -> [T, B, C]

Cells (``CELLS``) are the zoo entries of the cell-kind registry (:func:`gradflow.kinds.zoo`): every
kind under its name, plus presets with fixed settings. Each entry's kind builds, counts and
initialises its layer; this module holds no per-kind code. Kind-specific model options (an LSTM's
``forget_bias``, an LRU's ``r_min``/``r_max`` ...) are declared by the kind (``CellKind.options``).

Recurrent initialisation (``init``), applied to each gate block U (H × H) of every layer:
``"default"`` the kind's own (PyTorch's U(-1/√H, 1/√H) for nn.RNN/LSTM/GRU); ``"orthogonal"`` gain·Q
with Q orthogonal (Saxe et al. 2014); ``"identity"`` gain·I; ``"gaussian"`` entries N(0, gain²/H),
spectral radius ≈ gain. A kind accepts the inits it declares (``impl.inits``). Input weights and
biases keep their defaults (zero biases for a preset that says so).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kinds
from ..errors import TaskError
from ..kinds._base import INITS

__all__ = ["SequenceModel", "ZooCell", "CELLS", "INITS", "expected_param_count", "count_parameters"]

READOUTS = ("last", "all")
ZooCell = kinds.ZooCell
CELLS: dict[str, ZooCell] = kinds.zoo()  # the zoo when gradflow was imported; kinds.zoo() is live


def expected_param_count(cell: str, input_size: int, hidden: int, layers: int = 1, output_size: int = 0) -> int:
    """Closed-form parameter count of the recurrent module (from the kind's parameter shapes: for the
    fused modules per layer G·H·(F_l + H) weights plus b_ih and b_hh, F_0 = input_size, F_l = H
    above), plus the readout H·C + C."""
    n = kinds.zoo_cell(cell).load_builder().param_count(input_size, hidden, layers)
    if output_size:
        n += hidden * output_size + output_size
    return n


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Counts of a :class:`SequenceModel`'s parameters: recurrent, readout, total."""
    rec = sum(p.numel() for p in model.rnn.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    return {"recurrent": rec, "readout": head, "total": sum(p.numel() for p in model.parameters())}


class SequenceModel(nn.Module):
    """See the module docstring. ``tokens=True``: inputs are [T, B] ids < ``input_size``."""

    def __init__(
        self,
        cell: str,
        input_size: int,
        output_size: int,
        *,
        tokens: bool = False,
        readout: str = "last",
        hidden: int = 64,
        layers: int = 1,
        dropout: float = 0.0,
        init: str | None = None,
        gain: float = 1.0,
        forget_bias: float | None = None,
        **options,
    ):
        super().__init__()
        entry = kinds.zoo_cell(cell)
        builder = entry.load_builder()
        init = (entry.init or "default") if init is None else init
        if forget_bias is not None:
            options["forget_bias"] = forget_bias
        _validate(entry, builder, input_size, output_size, readout, hidden, layers, dropout, init, gain, options)
        self.cell, self.tokens, self.readout = cell, bool(tokens), readout
        self.input_size, self.output_size, self.hidden, self.layers = input_size, output_size, hidden, layers
        self.dropout_p, self.init, self.gain, self.forget_bias = float(dropout), init, float(gain), forget_bias
        self.options = dict(options)
        self.rnn = builder.build(input_size, hidden, layers, dropout, self.options)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, output_size)
        builder.initialise(self.rnn, init, float(gain))
        if entry.zero_bias:
            builder.zero_biases(self.rnn)
        builder.apply_options(self.rnn, self.options)

    @property
    def _builder(self):
        return kinds.zoo_cell(self.cell).load_builder()

    # ------------------------------------------------------------------ init
    def recurrent_blocks(self) -> list[torch.Tensor]:
        """Every recurrent gate block (views into the parameters: H × H matrices, or the per-unit
        vectors of a diagonal kind), layer by layer."""
        return self._builder.recurrent_blocks(self.rnn)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tokens:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise TaskError(
                    f"{self.cell} model: token input must be an int [T, B] tensor, got {x.dtype} {tuple(x.shape)}"
                )
            x = F.one_hot(x.long(), self.input_size).to(self.head.weight.dtype)
        elif x.dim() != 3 or x.shape[-1] != self.input_size:
            raise TaskError(f"{self.cell} model: input must be [T, B, {self.input_size}], got {tuple(x.shape)}")
        out = self.rnn(x)
        if isinstance(out, tuple):
            out = out[0]
        if self.readout == "last":
            out = out[-1]
        return self.head(self.drop(out))

    def describe(self) -> dict:
        """What a run directory states about the model (``run.json["model"]``)."""
        counts = count_parameters(self)
        return {
            "cell": self.cell,
            "hidden": self.hidden,
            "layers": self.layers,
            "n_params": counts["total"],
            "param_counts": counts,
            "kind": kinds.zoo_cell(self.cell).kind,
            "gates": self._builder.gate_blocks,
            "options": {**kinds.zoo_cell(self.cell).cell_kind.options, **self.options},  # with the kind's defaults
            "init": self.init,
            "gain": self.gain,
            "forget_bias": self.forget_bias,
            "dropout": self.dropout_p,
            "input_size": self.input_size,
            "output_size": self.output_size,
            "tokens": self.tokens,
            "readout": self.readout,
            "recurrent_module": "rnn",
        }


def _validate(entry, builder, input_size, output_size, readout, hidden, layers, dropout, init, gain, options):
    name = entry.name
    for what, v in (("input_size", input_size), ("output_size", output_size), ("hidden", hidden), ("layers", layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TaskError(f"model {name!r}: {what} must be an integer >= 1, got {v!r}")
    if readout not in READOUTS:
        raise TaskError(f"model {name!r}: readout={readout!r} is not one of {', '.join(READOUTS)}")
    if not (0.0 <= float(dropout) < 1.0):
        raise TaskError(f"model {name!r}: dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        import difflib

        m = difflib.get_close_matches(str(init), INITS, n=1)
        hint = f"; did you mean {m[0]!r}?" if m else ""
        raise TaskError(f"model {name!r}: init={init!r} is not one of {', '.join(INITS)}{hint}")
    if entry.init is not None and init != entry.init:
        raise TaskError(f"model {name!r} is defined by init={entry.init!r}; for init={init!r} use cell={entry.kind!r}")
    if init not in builder.inits:
        raise TaskError(f"model {name!r}: init={init!r} does not apply to this cell "
                        f"(inits: {', '.join(builder.inits)})")
    if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
        raise TaskError(f"model {name!r}: gain must be a positive number, got {gain!r}")
    if init == "default" and gain != 1.0:
        raise TaskError(
            f"model {name!r}: gain={gain} needs init='orthogonal', 'identity' or 'gaussian' (not 'default')"
        )
    takes = kinds.model_options()
    own = entry.cell_kind.options
    for opt in options:
        if opt not in own:
            where = " or ".join(f"cell={k!r}" for k in takes.get(opt, [])) or "no cell"
            raise TaskError(f"model {name!r}: {opt} applies to {where} only")
    entry.cell_kind.impl.check_options(options)
