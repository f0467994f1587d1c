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


class PackedGRU(nn.Module):
    """Variable-length sequences: each rank's shard has its own longest length (T_r < T on rank 1)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(F, 4, bidirectional=True)

    def forward(self, x, lengths):  # x [T, B, F]
        packed = nn.utils.rnn.pack_padded_sequence(x[: int(lengths.max())], lengths, enforce_sorted=False)
        out, h = self.rnn(packed)
        return out.data.sum() + (h ** 2).sum()


LENGTHS = torch.tensor([T, 3, 4, 2])


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "lstm":
        m = nn.LSTM(F, 5, num_layers=2, bidirectional=True)
    elif kind == "packed":
        m = PackedGRU()
    else:
        m = GRUNet()
    return m.double()


def run(kind: str, model, x, lo: int, n: int):
    """The model's output on batch items lo .. lo+n-1 of the full batch ``x``."""
    if kind == "packed":
        return model(x[:, lo:lo + n], LENGTHS[lo:lo + n])
    return model(x.narrow(1 if kind == "lstm" else 0, lo, n))


def data(kind: str, total: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, total, F, generator=g, dtype=torch.float64)
    return x if kind != "gru" else x.transpose(0, 1).contiguous()  # GRUNet is batch_first


def loss_fn(kind: str, out) -> torch.Tensor:
    """A sum over the batch (so per-sample δ_t do not depend on the shard)."""
    if kind == "packed":
        return out
    if kind == "lstm":
        out = out[0]  # [T, B, 2H]
        w = torch.linspace(0.5, 1.5, out.shape[0], dtype=out.dtype).view(-1, 1, 1)
        return (w * out.tanh()).sum()
    return (out[:, -1] ** 2).sum() + out.sum()


SETTINGS = {"lstm": {"sizes": (3, 3), "keep": "states"}, "gru": {"sizes": (3, 2), "keep": "full"},
            "packed": {"sizes": (2, 2), "keep": "full"}}


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
            lo, n = sum(sizes[:rank]), sizes[rank]
            ddp = DDP(build(kind))
            with gradflow.record(ddp, keep=s["keep"]) as rec:
                loss_fn(kind, run(kind, ddp, x, lo, n)).backward()
            if kind == "packed":  # the shards really have different lengths
                assert rec.trace.shape(rec.trace.keys()[0])[0] == int(LENGTHS[lo:lo + n].max())
            g_rec = [p.grad.detach().clone() for p in ddp.parameters()]
            ddp.zero_grad(set_to_none=True)
            loss_fn(kind, run(kind, ddp, x, lo, n)).backward()  # the fused kernel, no recording
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
