"""DistributedDataParallel: gather the traces that every rank recorded into one.

``gradflow.record`` works on any module tree, so a ``DistributedDataParallel``-wrapped model records
on every rank, with module paths prefixed ``module.`` (the wrapper's attribute). Each rank's trace
covers only its shard of the global batch; :func:`gather_trace` reassembles the batch on one rank::

    ddp = DistributedDataParallel(model)
    with gradflow.record(ddp, keep="full") as rec:
        loss = ddp(x_shard).sum()            # a loss summed over the batch: per-sample δ_t are
        loss.backward()                      # those of one process on the full batch
    full = gradflow.distributed.gather_trace(rec.trace)   # Trace on rank 0, None elsewhere

Batch convention: shards are **contiguous** and ordered by rank within ``group``: rank r holds the
global batch items ``sum(B_0..B_{r-1}) ... sum(B_0..B_r) - 1``, where ``B_r`` is rank r's batch size
(sizes may differ; they are exchanged first). The gathered trace is ``[T, B_0 + ... + B_{R-1}, ...]``
for every key: norms, masks, gradients (``keep="full"``/``"states"``), states, previous states and
unit inputs (``keep="states"``). Per-unit parameters and cell descriptions are taken from rank
``dst`` (DDP keeps them identical on every rank). Ranks may hold different sequence lengths only
with ``keep="norms"``/``"full"``: shorter ranks are padded with masked steps (mask False, NaN),
exactly as a packed sequence past its length.

DDP averages parameter gradients over ranks, so with a summed loss the parameter gradients are
``1/world_size`` of a single process's on the full batch; the recorded δ_t are per sample and are
not rescaled. Recording does not change what DDP computes.

The exchange uses ``torch.distributed`` collectives on tensors only (no pickling): a JSON header per
rank (keys, shapes, dtypes) travels as a byte tensor through ``all_gather``, so every rank checks
that the shards agree and raises the same :class:`~gradflow.errors.GradflowError` if they do not;
the arrays then go to ``dst`` with ``gather``. With the NCCL backend, tensors travel on the current
CUDA device. Every rank of ``group`` must call :func:`gather_trace`.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .errors import GradflowError
from .trace import StateKey, Trace

__all__ = ["gather_trace", "strip_module_prefix"]

PREFIX = "module."


def _strip(path: str, prefix: str | None) -> str:
    if not prefix:
        return path
    if path == prefix.rstrip("."):
        return ""
    return path[len(prefix):] if path.startswith(prefix) else path


def strip_module_prefix(trace: Trace, prefix: str = PREFIX) -> Trace:
    """A copy of ``trace`` whose module paths lose ``prefix`` (``"module.lstm"`` -> ``"lstm"``,
    ``"module"`` -> ``""``, the root), as a model recorded without its DDP wrapper would name them."""
    out = Trace(keep=trace.keep, meta=dict(trace.meta))
    for u in trace.units():
        out.add_unit((_strip(u[0], prefix),) + tuple(u[1:]), **trace.unit_record(u))
    for k in trace.keys():
        key = StateKey(_strip(k.module, prefix), k.layer, k.direction, k.state, k.call)
        out.add_state(key, **trace.state_record(k))
    return out


def _header(trace: Trace) -> dict:
    units = trace.units()
    keys = trace.keys()
    states = {k: trace.state_record(k) for k in keys}
    inputs = {u: trace.unit_record(u)["inputs"] for u in units}
    dt = {}
    for name, values in (("grad", [s["grad"] for s in states.values()]),
                         ("state", [s["state"] for s in states.values()]), ("inputs", list(inputs.values()))):
        v = next((v for v in values if v is not None), None)
        if v is not None:
            dt[name] = str(v.dtype).replace("torch.", "")
    return {
        "keep": trace.keep,
        "keys": [str(k) for k in keys],
        "units": [list(u) for u in units],
        "T": [int(states[k]["norm"].shape[0]) for k in keys],
        "B": int(states[keys[0]]["norm"].shape[1]) if keys else 0,
        "widths": {str(k): int(s["grad"].shape[-1]) for k, s in states.items() if s["grad"] is not None},
        "inputs": {str(i): int(inputs[u].shape[-1]) for i, u in enumerate(units) if inputs[u] is not None},
        "dtypes": dt,
    }


def _exchange_headers(header: dict, group, device) -> list[dict]:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    data = torch.tensor(list(json.dumps(header, sort_keys=True).encode("utf-8")), dtype=torch.uint8, device=device)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    m = int(max(int(s) for s in sizes))
    padded = torch.zeros(m, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    bufs = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(bufs, padded, group=group)
    return [json.loads(bytes(b[: int(s)].cpu().tolist()).decode("utf-8")) for b, s in zip(bufs, sizes)]


def _check(headers: list[dict]) -> None:
    first = headers[0]
    for r, h in enumerate(headers[1:], start=1):
        for field in ("keep", "keys", "units", "widths", "inputs", "dtypes"):
            if h[field] != first[field]:
                raise GradflowError(
                    f"gather_trace: rank {r} recorded different {field} than rank 0 "
                    f"({_short(h[field])} vs {_short(first[field])}); every rank must record the same model "
                    "with the same keep= and the same number of calls"
                )
        if h["keep"] == "states" and h["T"] != first["T"]:
            raise GradflowError(
                f"gather_trace: rank {r} has sequence lengths {h['T'][:4]} but rank 0 has {first['T'][:4]}; "
                "keep='states' needs equal lengths on every rank"
            )
    if not first["keys"]:
        raise GradflowError("gather_trace: the trace holds no recorded state (was backward() called inside record()?)")


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) < 80 else s[:77] + "..."


def _gather_parts(x: torch.Tensor, T: int, B: int, sizes: list[int], Ts: list[int], dst: int, group, device,
                  fill) -> list[torch.Tensor] | None:
    """Pad ``x`` [T_r, B_r, ...] to [T, B, ...] with ``fill``, gather to ``dst``; there return the
    unpadded per-rank pieces in rank order."""
    import torch.distributed as dist

    is_bool = x.dtype == torch.bool
    y = x.to(torch.uint8) if is_bool else x
    buf = torch.full((T, B) + tuple(y.shape[2:]), fill, dtype=y.dtype, device=device)
    buf[: y.shape[0], : y.shape[1]] = y.to(device)
    me = dist.get_rank()
    if me == dst:
        out = [torch.empty_like(buf) for _ in sizes]
        dist.gather(buf, gather_list=out, dst=dst, group=group)
        pieces = [o[:t, :b].cpu() for o, t, b in zip(out, Ts, sizes)]
        return [p.bool() if is_bool else p for p in pieces]
    dist.gather(buf, dst=dst, group=group)
    return None


def _cat_time_padded(pieces: list[torch.Tensor], fill) -> torch.Tensor:
    T = max(p.shape[0] for p in pieces)
    out = []
    for p in pieces:
        if p.shape[0] < T:
            pad = torch.full((T - p.shape[0],) + tuple(p.shape[1:]), fill, dtype=p.dtype)
            p = torch.cat([p, pad])
        out.append(p)
    return torch.cat(out, dim=1)


def gather_trace(trace: Trace, dst: int = 0, group=None, *, strip_prefix: str | None = PREFIX) -> Trace | None:
    """Gather every rank's :class:`Trace` to rank ``dst`` (a global rank, as in
    ``torch.distributed.gather``) with the batch reassembled in rank order (see the module
    docstring). Returns the gathered Trace on ``dst`` and None on the other ranks. ``strip_prefix``
    (default ``"module."``) is removed from module paths, so keys read as for the unwrapped model;
    pass None to keep them. A single-process run (torch.distributed not initialised) returns the
    trace itself, prefix stripped. ``meta`` gains ``world_size`` and ``shard_sizes``."""
    import torch.distributed as dist

    if not isinstance(trace, Trace):
        raise GradflowError(f"gather_trace needs a gradflow Trace, got {type(trace).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        return strip_module_prefix(trace, strip_prefix) if strip_prefix else trace
    backend = dist.get_backend(group)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    headers = _exchange_headers(_header(trace), group, device)
    _check(headers)
    sizes = [h["B"] for h in headers]
    me_dst = dist.get_rank() == dst
    B = max(sizes)
    keys = trace.keys()
    units = trace.units()
    Tk = {k: [h["T"][i] for h in headers] for i, k in enumerate(keys)}
    meta = {**trace.meta, "world_size": len(sizes), "shard_sizes": sizes}
    out = Trace(keep=trace.keep, meta=meta) if me_dst else None
    nan = float("nan")

    def gather(x, Ts, fill):
        return _gather_parts(x, max(Ts), B, sizes, Ts, dst, group, device, fill)

    unit_T: dict[tuple, list[int]] = {}
    for k in keys:
        unit_T.setdefault(k.unit, Tk[k])
    for u in units:
        Ts = unit_T[u]
        rec = trace.unit_record(u)
        mask = gather(rec["mask"], Ts, False)
        inputs = gather(rec["inputs"], Ts, nan) if rec["inputs"] is not None else None
        if me_dst:
            rec["mask"] = _cat_time_padded(mask, False)
            rec["inputs"] = _cat_time_padded(inputs, nan) if inputs is not None else None
            out.add_unit(u, **rec)
    for k in keys:
        rec = trace.state_record(k)
        parts = {name: gather(v, Tk[k], nan) for name, v in rec.items() if v is not None}
        if me_dst:
            out.add_state(k, **{name: _cat_time_padded(v, nan) for name, v in parts.items()})
    if not me_dst:
        return None
    return strip_module_prefix(out, strip_prefix) if strip_prefix else out
