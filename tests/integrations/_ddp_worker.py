"""Worker for the DDP tests (spawned; importable by module name). Rank 0 writes the gathered
traces and the parameter gradients with and without recording under ``outdir``."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

T, F = 6, 3


class GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(F, 4, num_layers=2, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):  # x [B, T, F]
        out, _ = self.rnn(x)
        return self.head(out)


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "lstm":
        m = nn.LSTM(F, 5, num_layers=2, bidirectional=True)
    else:
        m = GRUNet()
    return m.double()


def data(kind: str, total: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, total, F, generator=g, dtype=torch.float64)
    return x if kind == "lstm" else x.transpose(0, 1).contiguous()  # GRUNet is batch_first


def loss_fn(kind: str, out) -> torch.Tensor:
    """A sum over the batch (so per-sample δ_t do not depend on the shard)."""
    if kind == "lstm":
        out = out[0]  # [T, B, 2H]
        w = torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype).view(-1, 1, 1)
        return (w * out.tanh()).sum()
    return (out[:, -1] ** 2).sum() + out.sum()


SETTINGS = {"lstm": {"sizes": (3, 3), "keep": "states"}, "gru": {"sizes": (3, 2), "keep": "full"}}


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import gradflow
    from gradflow.distributed import gather_trace

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for kind, s in SETTINGS.items():
            sizes = s["sizes"]
            x = data(kind, sum(sizes))
            lo = sum(sizes[:rank])
            bdim = 1 if kind == "lstm" else 0
            shard = x.narrow(bdim, lo, sizes[rank])
            ddp = DDP(build(kind))
            with gradflow.record(ddp, keep=s["keep"]) as rec:
                loss_fn(kind, ddp(shard)).backward()
            g_rec = [p.grad.detach().clone() for p in ddp.parameters()]
            ddp.zero_grad(set_to_none=True)
            loss_fn(kind, ddp(shard)).backward()  # the fused kernel, no recording
            g_plain = [p.grad.detach().clone() for p in ddp.parameters()]
            full = gather_trace(rec.trace, dst=0)
            if rank == 0:
                full.save(os.path.join(outdir, kind))
                np.savez(os.path.join(outdir, f"{kind}_grads.npz"),
                         **{f"rec_{i}": g.numpy() for i, g in enumerate(g_rec)},
                         **{f"plain_{i}": g.numpy() for i, g in enumerate(g_plain)})
            else:
                assert full is None
    finally:
        dist.destroy_process_group()
