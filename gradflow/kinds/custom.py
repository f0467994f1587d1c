"""Cells registered with ``gradflow.register_cell``: kind ``custom``, differentiated with torch.func.

A user cell has no closed form: its linearization keeps the step function recorded with it,
``f(x_t [B, F], states) -> states`` (states a tuple in ``CellInfo.states`` order), and evaluates
J v with ``torch.func.jvp``, Jᵀ u with ``torch.func.vjp`` and dense J with ``jacrev``. Batch items are
independent, so the rows of all (t, b) are flattened into one batch of N = T·B rows. A trace loaded
from disk has no step function: its custom units cannot be linearized (one-line error).
"""

from __future__ import annotations

import torch

from ..errors import GradflowError
from ._base import KindImpl


def _flat(lin):
    """x [N, F], the joint state [N, S] fed into each step, and the joint-state function of the
    N = (leading dims) flattened rows."""
    lead = lin.x.shape[:-1]
    x = lin.x.reshape(-1, lin.x.shape[-1])
    prev = torch.cat([p.reshape(x.shape[0], -1) for p in lin.prev], -1)
    bounds = [b - a for _, a, b in lin.sizes]

    def f(s):
        new = lin.step(x, tuple(s.split(bounds, -1)))
        if not isinstance(new, (tuple, list)):
            new = (new,)
        return torch.cat([n.reshape(s.shape[0], -1) for n in new], -1)

    return lead, prev, f


def _failed(lin, what, e):
    return GradflowError(f"custom cell {lin.cell.cell_class or ''}: torch.func {what} its step function "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


class CustomKind(KindImpl):
    needs_step = True

    def apply(self, lin, R, transpose, coef=None, unsqueeze=True):
        """Rows R [..., m, S] (leading dims those of the linearization) -> rows of J v or Jᵀ u."""
        lead, prev, f = _flat(lin)
        m = R.shape[-2]
        Rn = R.reshape(-1, m, R.shape[-1]).transpose(0, 1).to(prev.dtype)  # [m, N, S]
        try:
            if transpose:
                _, pull = torch.func.vjp(f, prev)
                out = torch.func.vmap(lambda u: pull(u)[0])(Rn)
            else:
                out = torch.func.vmap(lambda v: torch.func.jvp(f, (prev,), (v,))[1])(Rn)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise _failed(lin, "could not differentiate", e) from e
        return out.transpose(0, 1).reshape(*lead, m, -1).to(lin.dtype)

    def rows(self, lin, R, k, transpose):
        return self.apply(lin._at(k), R.transpose(0, 1), transpose).transpose(0, 1)

    def dense(self, lin, out):
        """jacrev of Σ_n f(s)_n w.r.t. s [N, S] holds every per-item J_n: [S_out, N, S_in]."""
        lead, prev, f = _flat(lin)
        try:
            jac = torch.func.jacrev(lambda s: f(s).sum(0))(prev)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise _failed(lin, "jacrev failed on", e) from e
        out.copy_(jac.permute(1, 0, 2).reshape(out.shape))


CUSTOM = CustomKind()
