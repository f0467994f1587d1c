"""A custom recurrent cell written the way a user would write one, and the Python loop that runs it.

:class:`MGUCell` is the Minimal Gated Unit (Zhou, Wu, Zhang & Zhou 2016), one forget gate and a
candidate state::

    f_t = σ(W_f x_t + U_f h_{t-1} + b_f)
    ĥ_t = tanh(W_h x_t + U_h (f_t ⊙ h_{t-1}) + b_h)
    h_t = (1 - f_t) ⊙ h_{t-1} + f_t ⊙ ĥ_t

It is an ordinary ``nn.Module`` whose ``forward(x [B, F], h [B, H]) -> h [B, H]`` is one timestep,
registered with :func:`gradflow.register_cell` so that recording sees every call as a step.
Parameters: ``x2g`` (W_f; W_h stacked, with the biases) [2H, F], ``h2f`` (U_f) and ``h2h`` (U_h)
[H, H]: 2H(F + H) + 2H in all. :data:`MGU` builds the model zoo's ``CellLoop`` of MGU cells (the
zoo preset of kind ``custom`` declared in :mod:`gradflow.kinds`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kinds._base import INITS, init_blocks
from ..recording import register_cell

__all__ = ["MGUCell", "CellLoop", "MGU"]


@register_cell(states=("h",))
class MGUCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.x2g = nn.Linear(input_size, 2 * hidden_size)
        self.h2f = nn.Linear(hidden_size, hidden_size, bias=False)
        self.h2h = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        gx_f, gx_h = self.x2g(x).chunk(2, dim=-1)
        f = torch.sigmoid(gx_f + self.h2f(h))
        cand = torch.tanh(gx_h + self.h2h(f * h))
        return (1 - f) * h + f * cand


class CellLoop(nn.Module):
    """Runs a stack of cells over time in a Python loop: ``forward(x [T, B, F]) -> [T, B, H]`` (the
    top layer's states). Layer ``l`` is ``cells[l]``; dropout acts between layers (training only)
    as in the fused modules; the initial state is zero."""

    def __init__(self, cell_cls, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.cells = nn.ModuleList(
            [cell_cls(input_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers)]
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[0], x.shape[1]
        h = [x.new_zeros(B, self.hidden_size) for _ in self.cells]
        outs = []
        for t in range(T):
            inp = x[t]
            for i, cell in enumerate(self.cells):
                if i > 0:
                    inp = self.dropout(inp)
                h[i] = cell(inp, h[i])
                inp = h[i]
            outs.append(inp)
        return torch.stack(outs)


class CellLoopBuilder:
    """How the model zoo builds, counts and initialises a :class:`CellLoop` of ``cell_cls`` cells whose
    recurrent blocks are ``blocks`` (attribute names of H × H ``nn.Linear`` layers)."""

    inits = INITS

    def __init__(self, cell_cls, blocks: tuple[str, ...]):
        self.cell_cls, self.blocks = cell_cls, blocks
        self.gate_blocks = len(blocks)

    def build(self, input_size, hidden, layers, dropout, options):
        return CellLoop(self.cell_cls, input_size, hidden, layers, dropout)

    def recurrent_blocks(self, module):
        return [getattr(c, b).weight for c in module.cells for b in self.blocks]

    def initialise(self, module, init, gain):
        init_blocks(self.recurrent_blocks(module), init, gain)

    def zero_biases(self, module):
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.endswith("bias"):
                    p.zero_()

    def apply_options(self, module, options):
        pass

    def param_count(self, F: int, H: int, layers: int) -> int:
        """Per layer: the parameters of one cell with input F_l (F, then H)."""
        return sum(sum(p.numel() for p in self.cell_cls(F if i == 0 else H, H).parameters()) for i in range(layers))


MGU = CellLoopBuilder(MGUCell, ("h2f", "h2h"))
