"""The cell zoo: a small classifier / regressor / language model around one recurrent module.

:class:`SequenceModel` maps time-major inputs to outputs::

    x [T, B] int tokens  --one-hot-->  [T, B, V]
    x [T, B, F] real     ------------>  recurrent module (fused nn.RNN/LSTM/GRU, or a CellLoop of a
                                        registered custom cell)  -->  h [T, B, H]
    readout "last": head(dropout(h[T-1])) -> [B, C];  readout "all": head(dropout(h)) -> [T, B, C]

Cells (``CELLS``): ``rnn_tanh``, ``rnn_relu``, ``irnn`` (ReLU, identity recurrent matrix, zero
biases; Le, Jaitly & Hinton 2015), ``lstm`` (``forget_bias`` sets b_f = b_ih_f + b_hh_f; Gers et
al. 2000, Jozefowicz et al. 2015), ``gru`` and ``mgu`` (a custom cell run in a Python loop, see
:mod:`gradflow.models.custom`).

Recurrent initialisation (``init``), applied to each gate block U (H × H) of every layer:
``"default"`` PyTorch's U(-1/√H, 1/√H); ``"orthogonal"`` gain·Q with Q orthogonal (Saxe et al.
2014); ``"identity"`` gain·I; ``"gaussian"`` entries N(0, gain²/H), spectral radius ≈ gain.
Input weights and biases keep PyTorch's defaults (zero biases for ``irnn``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import TaskError
from .custom import CellLoop, MGUCell

__all__ = ["SequenceModel", "CellKind", "CELLS", "INITS", "expected_param_count", "count_parameters"]

INITS = ("default", "orthogonal", "identity", "gaussian")
READOUTS = ("last", "all")


@dataclass(frozen=True)
class CellKind:
    """One entry of the zoo: ``gates`` = number of H-row blocks in the recurrent matrix."""

    name: str
    gates: int
    fused: type | None  # nn.RNN / nn.LSTM / nn.GRU, or None for a custom cell in a loop
    nonlinearity: str | None = None
    custom: type | None = None
    default_init: str = "default"
    description: str = ""


CELLS: dict[str, CellKind] = {
    c.name: c
    for c in (
        CellKind("rnn_tanh", 1, nn.RNN, "tanh", description="Elman RNN, tanh"),
        CellKind("rnn_relu", 1, nn.RNN, "relu", description="Elman RNN, ReLU"),
        CellKind("irnn", 1, nn.RNN, "relu", default_init="identity",
                 description="ReLU RNN with identity recurrent init and zero biases (Le et al. 2015)"),
        CellKind("lstm", 4, nn.LSTM, description="LSTM, gates i, f, g, o"),
        CellKind("gru", 3, nn.GRU, description="GRU, gates r, z, n"),
        CellKind("mgu", 2, None, custom=MGUCell,
                 description="Minimal Gated Unit (Zhou et al. 2016), custom cell in a Python loop"),
    )
}


def expected_param_count(cell: str, input_size: int, hidden: int, layers: int = 1, output_size: int = 0) -> int:
    """Closed-form parameter count: per layer G·H·(F_l + H) weights plus biases (2·G·H for the fused
    modules, which keep b_ih and b_hh; G·H for the MGU, whose biases sit in one Linear), F_0 =
    input_size, F_l = H above; plus the readout H·C + C."""
    kind = CELLS[cell]
    G, H = kind.gates, hidden
    n = 0
    for layer in range(layers):
        f = input_size if layer == 0 else H
        n += G * H * (f + H) + (G * H if kind.custom is not None else 2 * G * H)
    if output_size:
        n += H * output_size + output_size
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
    ):
        super().__init__()
        kind = CELLS[cell]
        init = kind.default_init if init is None else init
        _validate(kind, input_size, output_size, readout, hidden, layers, dropout, init, gain, forget_bias)
        self.cell, self.tokens, self.readout = cell, bool(tokens), readout
        self.input_size, self.output_size, self.hidden, self.layers = input_size, output_size, hidden, layers
        self.dropout_p, self.init, self.gain, self.forget_bias = float(dropout), init, float(gain), forget_bias
        if kind.fused is not None:
            kw = {"nonlinearity": kind.nonlinearity} if kind.fused is nn.RNN else {}
            self.rnn = kind.fused(input_size, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0, **kw)
        else:
            self.rnn = CellLoop(kind.custom, input_size, hidden, layers, dropout)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, output_size)
        self._initialise(kind)

    # ------------------------------------------------------------------ init
    def recurrent_blocks(self) -> list[torch.Tensor]:
        """Every H × H recurrent gate block (views into the parameters), layer by layer."""
        blocks = []
        if isinstance(self.rnn, CellLoop):
            for c in self.rnn.cells:
                blocks += [c.h2f.weight, c.h2h.weight]
        else:
            for layer in range(self.layers):
                blocks += list(getattr(self.rnn, f"weight_hh_l{layer}").chunk(CELLS[self.cell].gates, dim=0))
        return blocks

    @torch.no_grad()
    def _initialise(self, kind: CellKind) -> None:
        H, g = self.hidden, self.gain
        for W in self.recurrent_blocks():
            if self.init == "orthogonal":
                W.copy_(nn.init.orthogonal_(torch.empty(H, H), gain=g))
            elif self.init == "identity":
                W.copy_(g * torch.eye(H))
            elif self.init == "gaussian":
                W.normal_(0.0, g / math.sqrt(H))
        if kind.name == "irnn":
            for layer in range(self.layers):
                getattr(self.rnn, f"bias_ih_l{layer}").zero_()
                getattr(self.rnn, f"bias_hh_l{layer}").zero_()
        if self.forget_bias is not None:
            for layer in range(self.layers):
                getattr(self.rnn, f"bias_ih_l{layer}")[H:2 * H] = float(self.forget_bias)
                getattr(self.rnn, f"bias_hh_l{layer}")[H:2 * H] = 0.0

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
            "gates": CELLS[self.cell].gates,
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


def _validate(kind, input_size, output_size, readout, hidden, layers, dropout, init, gain, forget_bias):
    for name, v in (("input_size", input_size), ("output_size", output_size), ("hidden", hidden), ("layers", layers)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TaskError(f"model {kind.name!r}: {name} must be an integer >= 1, got {v!r}")
    if readout not in READOUTS:
        raise TaskError(f"model {kind.name!r}: readout={readout!r} is not one of {', '.join(READOUTS)}")
    if not (0.0 <= float(dropout) < 1.0):
        raise TaskError(f"model {kind.name!r}: dropout must be in [0, 1), got {dropout!r}")
    if init not in INITS:
        import difflib

        m = difflib.get_close_matches(str(init), INITS, n=1)
        hint = f"; did you mean {m[0]!r}?" if m else ""
        raise TaskError(f"model {kind.name!r}: init={init!r} is not one of {', '.join(INITS)}{hint}")
    if kind.name == "irnn" and init != "identity":
        raise TaskError(f"model 'irnn' is defined by init='identity'; for init={init!r} use cell='rnn_relu'")
    if not (isinstance(gain, (int, float)) and math.isfinite(gain) and gain > 0):
        raise TaskError(f"model {kind.name!r}: gain must be a positive number, got {gain!r}")
    if init == "default" and gain != 1.0:
        raise TaskError(
            f"model {kind.name!r}: gain={gain} needs init='orthogonal', 'identity' or 'gaussian' (not 'default')"
        )
    if forget_bias is not None and kind.name != "lstm":
        raise TaskError(f"model {kind.name!r}: forget_bias applies to cell='lstm' only")
