"""Recording overhead: a training step with ``gradflow.record(keep="norms")`` vs the plain fused step.

2-layer nn.LSTM, H=256, T=256, B=32, CPU, loss on every output. Times are medians over interleaved
blocks of steps in one process: plain fused steps, steps of a training loop inside one open
``record()``, and ``record()`` entered afresh for every step. Peak memory is measured in a fresh
subprocess per variant (growth of the peak resident set size over two steps of a recorded loop).
Prints the ratios; the target is <= 1.3x time for the recorded loop.

    python benchmarks/recording_overhead.py [--rounds 3] [--block 4] [--H 256] [--T 256] [--B 32] [--layers 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import torch
from torch import nn

import gradflow


def make(args):
    torch.manual_seed(0)
    model = nn.LSTM(args.H, args.H, num_layers=args.layers).to(args.device)
    x = torch.randn(args.T, args.B, args.H, device=args.device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return model, x, opt


def step(model, x, opt):
    opt.zero_grad(set_to_none=True)
    out, _ = model(x)
    out.pow(2).mean().backward()
    opt.step()


def timed(fn):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def run_time(args):
    """Median step times of three variants, interleaved in blocks of ``args.block`` steps:
    plain fused steps; steps inside one open ``record()`` (a recorded training loop, the case the
    target is about); and ``record()`` entered afresh for every step (as a recording schedule does)."""
    model, x, opt = make(args)
    times = {"plain": [], "loop": [], "per_step": []}

    def per_step():
        with gradflow.record(model, keep="norms", keep_traces=False):
            step(model, x, opt)

    for _ in range(2):  # warm-up
        step(model, x, opt)
        per_step()
    for _ in range(args.rounds):
        for _ in range(args.block):
            times["plain"].append(timed(lambda: step(model, x, opt)))
        with gradflow.record(model, keep="norms", keep_traces=False):
            for _ in range(args.block):
                times["loop"].append(timed(lambda: step(model, x, opt)))
        for _ in range(args.block):
            times["per_step"].append(timed(per_step))
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _two_steps(model, x, opt, variant):
    """The two measured steps: plain, or a loop inside one record()."""
    if variant == "plain":
        for _ in range(2):
            step(model, x, opt)
    else:
        with gradflow.record(model, keep="norms", keep_traces=False):
            for _ in range(2):
                step(model, x, opt)


def _peak_child(args, variant, q):
    """Peak resident-set growth of two training steps: free memory is returned to the OS
    (malloc_trim) and the kernel's peak counter reset (clear_refs 5) before the steps."""
    import ctypes

    torch.set_num_threads(args.threads)
    model, x, opt = make(args)
    step(model, x, opt)  # optimizer state and one-time allocations
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss_kib("VmRSS")
    _two_steps(model, x, opt, variant)
    q.put((_rss_kib("VmHWM") - base) / 1024)


def _cuda_peak(args, variant):
    model, x, opt = make(args)
    step(model, x, opt)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _two_steps(model, x, opt, variant)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_memory(args):
    if args.device != "cpu":  # peak allocated device memory above the first step's
        return _cuda_peak(args, "plain"), _cuda_peak(args, "recorded")
    ctx = mp.get_context("spawn")
    out = {}
    for variant in ("plain", "recorded"):
        q = ctx.Queue()
        p = ctx.Process(target=_peak_child, args=(args, variant, q))
        p.start()
        out[variant] = q.get()
        p.join()
    return out["plain"], out["recorded"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=4, help="steps per block of one variant")
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda (memory is then peak allocated device memory)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = run_time(args)
    m_plain, m_rec = run_memory(args)
    res = {
        "config": f"LSTM layers={args.layers} H={args.H} T={args.T} B={args.B} threads={args.threads} "
                  f"device={args.device}",
        "plain_step_s": round(t["plain"], 4),
        "recorded_loop_step_s": round(t["loop"], 4),
        "recorded_per_step_s": round(t["per_step"], 4),
        "time_ratio": round(t["loop"] / t["plain"], 3),
        "time_ratio_per_step": round(t["per_step"] / t["plain"], 3),
        "plain_peak_mib": round(m_plain, 1),
        "recorded_peak_mib": round(m_rec, 1),
        "memory_ratio": round(m_rec / max(m_plain, 1e-9), 3),
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(res["config"])
        print(f"plain fused step                    {t['plain'] * 1e3:8.1f} ms   peak +{m_plain:7.1f} MiB")
        print(f"record(keep=norms) around the loop  {t['loop'] * 1e3:8.1f} ms   peak +{m_rec:7.1f} MiB")
        print(f"record(keep=norms) entered per step {t['per_step'] * 1e3:8.1f} ms")
        print(f"ratio (recorded/plain): time {res['time_ratio']:.2f}x (loop), {res['time_ratio_per_step']:.2f}x "
              f"(entered per step)   memory {res['memory_ratio']:.2f}x")


if __name__ == "__main__":
    main()
