"""The implementation interface of a cell kind (:class:`KindImpl`), with the defaults most kinds share.

Conventions (every kind): time-major tensors; x [T, B, F] the layer input; a unit's joint state is
its states concatenated in ``CellInfo.states`` order; ``prev`` is the tuple of states fed into each
step, each [T, B, S_i]; parameters are named as the module names them, without the ``_l{layer}``
(``_reverse``) suffix of a multi-layer module. Linearization *coefficients* are per-step tensors
[T, B, ·] that together with the fixed *weights* represent J_t exactly; ``apply`` maps rows R
[..., m, S] (or, with ``unsqueeze=False``, rows [n, B, S] of one step) to rows of J v or Jᵀ u.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from ..errors import GradflowError
from ..trace import CellInfo

INITS = ("default", "orthogonal", "identity", "gaussian")


def init_blocks(blocks, init: str, gain: float) -> None:
    """Initialise square recurrent blocks U (H × H) in place: ``orthogonal`` gain·Q (Saxe et al. 2014),
    ``identity`` gain·I, ``gaussian`` N(0, gain²/H) (spectral radius ≈ gain); ``default`` leaves them."""
    with torch.no_grad():
        for W in blocks:
            H = W.shape[0]
            if init == "orthogonal":
                W.copy_(nn.init.orthogonal_(torch.empty(H, H), gain=gain))
            elif init == "identity":
                W.copy_(gain * torch.eye(H))
            elif init == "gaussian":
                W.normal_(0.0, gain / math.sqrt(H))


class KindImpl:
    """What one cell kind does (subclassed once per kind; the registry sets ``kind``)."""

    kind = None  # the CellKind, set when the registry loads this object
    module_types: tuple = ()  # sequence modules recorded through the weight-sharing unroll
    cell_types: tuple = ()  # modules called once per timestep
    inits: tuple = INITS  # recurrent initialisations the zoo accepts
    gate_blocks = 1  # H-row blocks of the recurrent/input matrices (run.json's model.gates)
    needs_step = False  # linearized from the recorded step function (user cells), not from parameters
    # full-frame Lyapunov sweeps keep the frame in Householder form (geqrf, then J_t Q by ormqr on the
    # formed J_t) from this joint state size on; None: never (measured per kind, see products.py)
    householder_from: int | None = None

    # ------------------------------------------------------------------ describing a unit
    def state_sizes(self, hidden: int, proj: int = 0) -> dict[str, int]:
        return {"h": hidden}

    def param_shapes(self, cell: CellInfo, F: int) -> dict[str, tuple]:
        """Expected parameter shapes of one unit with input size F."""
        raise NotImplementedError

    def output_size(self, cell: CellInfo) -> int:
        """Size of one direction's output (the next layer's input per direction)."""
        return int(cell.state_sizes["h"])

    def sizes(self, cell: CellInfo) -> dict[str, int]:
        sizes = dict(self.state_sizes(cell.hidden_size, cell.proj_size))
        sizes.update(cell.state_sizes)
        return sizes

    def check(self, cell: CellInfo, params: Mapping[str, torch.Tensor], x: torch.Tensor, prev: tuple) -> None:
        """One-line GradflowError naming the parameter/state and the shape expected."""
        name = cell.kind
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            raise GradflowError(f"{name}: inputs x must be a tensor [T, B, F], got "
                                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        T, B, F = x.shape
        for pname, shape in self.param_shapes(cell, F).items():
            if pname not in params:
                raise GradflowError(f"{name} cell (bias={cell.bias}, proj_size={cell.proj_size}): missing "
                                    f"parameter {pname!r} of shape {shape}")
            if tuple(params[pname].shape) != shape:
                raise GradflowError(f"{name} cell: parameter {pname!r} has shape {tuple(params[pname].shape)}, "
                                    f"expected {shape} (hidden_size={cell.hidden_size}, input F={F})")
        sizes = self.sizes(cell)
        if not isinstance(prev, (tuple, list)) or len(prev) != len(cell.states):
            raise GradflowError(f"{name}: prev must be a tuple of {len(cell.states)} state tensor(s) [T, B, S]")
        for sname, s in zip(cell.states, prev):
            if tuple(s.shape) != (T, B, sizes[sname]):
                raise GradflowError(f"{name}: previous state {sname!r} has shape {tuple(s.shape)}, "
                                    f"expected {(T, B, sizes[sname])}")

    # ------------------------------------------------------------------ recording
    def claims(self, module: nn.Module) -> bool:
        """True when this kind records ``module`` as a whole sequence."""
        return isinstance(module, self.module_types)

    def claims_cell(self, module: nn.Module) -> bool:
        """True when this kind records ``module`` as one step per call."""
        return isinstance(module, self.cell_types)

    def check_module(self, path: str, module: nn.Module) -> None:
        """UnsupportedModuleError naming an option recording cannot handle."""

    def cell_info(self, module: nn.Module, source: str = "fused") -> CellInfo:
        H = module.hidden_size
        P = getattr(module, "proj_size", 0) or 0
        return CellInfo(kind=self.kind.name, input_size=module.input_size, hidden_size=H, proj_size=P,
                        states=self.kind.states, state_sizes=self.state_sizes(H, P), bias=bool(module.bias),
                        source=source, cell_class=f"{type(module).__module__}.{type(module).__qualname__}")

    def param_names(self, module: nn.Module) -> tuple[str, ...]:
        return ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if module.bias else ())

    def layer_params(self, module: nn.Module, layer: int, direction: int) -> dict[str, torch.Tensor]:
        sfx = f"_l{layer}" + ("_reverse" if direction else "")
        return {n: getattr(module, n + sfx) for n in self.param_names(module)}

    def cell_params(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {n: getattr(module, n) for n in self.param_names(module)}

    def layer_output(self, module: nn.Module, out: torch.Tensor) -> torch.Tensor:
        """What one layer-direction passes on, from its recurrence's output (default: unchanged)."""
        return out

    def record(self, x, params, s0: tuple, mask, sink):
        """Run one layer-direction in processing order through a kernel whose backward hands every
        state's δ_t [T, B, S] to ``sink.backward(name, tensor)`` (and, forward, the state sequences
        to ``sink.forward(**states)``). Returns (output [T, B, P], final states tuple)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ linearization
    def linearize(self, cell, params, x, prev, dtype):
        """(coefficients, weights) of every step: dicts of tensors (see the module docstring)."""
        raise NotImplementedError

    def apply(self, lin, R, transpose: bool, coef=None, unsqueeze: bool = True):
        raise NotImplementedError

    def apply_rows(self, lin, R, k: int, transpose: bool, full: bool, out=None):
        """Rows R [n, B, S] -> rows of J_k v (Jᵀ u) for step k; None when no fast path applies (the
        caller then takes the generic route). ``full``: no batch item is masked at step k."""
        return None

    def rows(self, lin, R, k: int, transpose: bool):
        """Rows R [n, B, S] of step k -> rows of J_k v (or J_kᵀ u), masked steps not handled."""
        return self.apply(lin, R, transpose, coef={n: v[k] for n, v in lin.coef.items()}, unsqueeze=False)

    def moduli(self, coef) -> torch.Tensor:
        """[..., S] unsorted singular values of each J_t, for the diagonal structures only."""
        raise NotImplementedError(f"{self.kind.name}: a {self.kind.structure} Jacobian has no per-unit moduli")

    def dense(self, lin, out: torch.Tensor) -> None:
        """Write J of every step of ``lin`` into out [t, B, S, S]."""
        raise NotImplementedError

    def dense_sweep(self, k: int, S: int) -> bool:
        """Whether a Lyapunov sweep of k directions should form each J_t and multiply densely."""
        return False

    def matvec_flops(self, cell) -> float | None:
        """Flops of one closed-form J v (or Jᵀ u) of ``cell``, for the analysis plan's cost estimates;
        None: about a dense product's 2·S² (the LSTM's and the tanh RNN's closed forms cost that)."""
        return None

    def gates(self, cell, params, x, prev, dtype) -> dict[str, torch.Tensor]:
        """Gate activations of every step, each [T, B, H], for the kind's gate names."""
        return {}

    # ------------------------------------------------------------------ the model zoo
    def build(self, input_size: int, hidden: int, layers: int, dropout: float, options: Mapping) -> nn.Module:
        raise NotImplementedError

    def recurrent_blocks(self, module: nn.Module) -> list[torch.Tensor]:
        """Every H × H recurrent gate block (views into the parameters), layer by layer."""
        return []

    def initialise(self, module: nn.Module, init: str, gain: float) -> None:
        init_blocks(self.recurrent_blocks(module), init, gain)

    def zero_biases(self, module: nn.Module) -> None:
        with torch.no_grad():
            for name, p in module.named_parameters():
                if name.startswith("bias"):
                    p.zero_()

    def apply_options(self, module: nn.Module, options: Mapping) -> None:
        """Apply the kind-specific model options (already validated as the kind's own)."""

    def check_options(self, options: Mapping) -> None:
        """TaskError naming an option value the kind cannot take."""

    def param_count(self, F: int, H: int, layers: int) -> int:
        n = 0
        for layer in range(layers):
            info = CellInfo(self.kind.name, F if layer == 0 else H, H, states=self.kind.states,
                            state_sizes=self.state_sizes(H), bias=True)
            n += sum(math.prod(s) for s in self.param_shapes(info, info.input_size).values())
        return n

