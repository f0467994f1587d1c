"""``once_differentiable`` for the recording kernels: differentiable once, and saying so every time.

torch's ``once_differentiable`` runs a backward without building a graph and only makes a *later*
double backward fail, when the incoming gradients require grad. When they do not (a loss whose
dL/d(output) is constant, e.g. ``out.sum()``), the parameter gradients it returns are constants and
a gradient penalty built from them is silently dropped. The recording kernels use this wrapper
instead: a backward run with ``create_graph=True`` (the engine then runs every backward with grad
mode enabled) raises :class:`~gradflow.errors.UnsupportedModuleError` naming the module.

On the CPU the backward runs with subnormals flushed to zero (:mod:`._subnormal`): a vanishing
gradient crossing the subnormal band otherwise makes it 10× slower.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable as _torch_once_differentiable

from ..errors import UnsupportedModuleError
from ._subnormal import flushed


def _module_path(ctx) -> str:
    path = getattr(getattr(getattr(ctx, "sink", None), "call", None), "path", None)
    return "<root>" if path == "" else str(path) if path is not None else "<unknown>"


def once_differentiable(fn):
    """Like torch's ``once_differentiable``; raises at once when the backward is asked for a graph."""
    inner = _torch_once_differentiable(fn)

    @functools.wraps(fn)
    def backward(ctx, *grads):
        if torch.is_grad_enabled():
            raise UnsupportedModuleError(
                f"module '{_module_path(ctx)}': create_graph=True (double backward, e.g. a gradient penalty) "
                "through a module recorded by gradflow.record() is not supported: its recording kernel is "
                "differentiable once; run the forward of such steps outside `with gradflow.record(...)`")
        on_cpu = next((g.device.type == "cpu" for g in grads if isinstance(g, torch.Tensor)), True)
        with flushed(on_cpu):
            return inner(ctx, *grads)

    return backward
