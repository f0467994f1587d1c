"""Recording overhead: a training step inside ``gradflow.record(keep="norms")`` vs the plain fused step.

Sweeps the sizes of issue 14: nn.LSTM, nn.GRU and tanh nn.RNN; H ∈ {64, 256, 1024} (input size H);
T ∈ {16, 256, 1024}; 1-3 layers; B=32; loss on every output; SGD step. For each size the two
variants (plain fused steps; steps of a training loop inside one open ``record()``) are timed in
interleaved rounds (``_rounds.best_of_rounds``, first round untimed) and each keeps its best; a
timing covers ``n`` steps, n chosen so that it lasts >= --min-ms. Peak memory is measured in a fresh
subprocess per variant (CPU: growth of the peak resident set over two steps after a warm-up step of the same variant,
free memory returned to the OS first; CUDA: peak allocated device memory above the first step's).
Prints recorded/plain per size; the target is <= 1.3x time and <= 1.2x memory.

    python benchmarks/recording_overhead.py [--quick] [--device cpu|cuda] [--kinds lstm,gru,rnn_tanh]
        [--H 64,256,1024] [--T 16,256,1024] [--layers 1,2,3] [--B 32] [--rounds 3] [--clock wall|cpu]
        [--no-memory] [--json]

``--quick`` sweeps H ∈ {64, 256}, T ∈ {16, 256}, 1 and 2 layers. The largest sizes of the full sweep
(H=1024, T=1024) take minutes per step on 2 CPU cores; pass --H/--T/--layers to pick sizes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time

import torch
from torch import nn

import gradflow
from _rounds import best_of_rounds

MODULES = {"lstm": lambda H, L: nn.LSTM(H, H, num_layers=L), "gru": lambda H, L: nn.GRU(H, H, num_layers=L),
           "rnn_tanh": lambda H, L: nn.RNN(H, H, num_layers=L, nonlinearity="tanh")}


def make(kind, H, T, L, B, device):
    torch.manual_seed(0)
    model = MODULES[kind](H, L).to(device)
    x = torch.randn(T, B, H, device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    return model, x, opt


def step(model, x, opt):
    opt.zero_grad(set_to_none=True)
    out, _ = model(x)
    out.pow(2).mean().backward()
    opt.step()


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# The clock of the step timings: wall time, or with --clock cpu the process's CPU time (all its
# threads), which leaves out the time other processes hold the cores: on a shared machine, with
# --threads 1, it tracks the work done (the wall-time ratio of one size moved 1.3x-2.3x between runs
# at load 5 on 2 cores).
CLOCK = time.perf_counter


def run_time(kind, H, T, L, B, device, rounds, min_ms):
    """Best seconds per step of the plain and the recorded variant, interleaved rounds."""
    model, x, opt = make(kind, H, T, L, B, device)
    for _ in range(2):
        step(model, x, opt)
    with gradflow.record(model, keep="norms", keep_traces=False):
        step(model, x, opt)
    _sync(device)
    t0 = CLOCK()
    step(model, x, opt)
    _sync(device)
    n = max(1, int(min_ms * 1e-3 / max(CLOCK() - t0, 1e-6)))

    def steps():
        _sync(device)
        t0 = CLOCK()
        for _ in range(n):
            step(model, x, opt)
        _sync(device)
        return None, (CLOCK() - t0) / n

    def recorded():
        with gradflow.record(model, keep="norms", keep_traces=False):
            step(model, x, opt)  # untimed: the workspace's first step
            return steps()

    best, _ = best_of_rounds({"plain": steps, "recorded": recorded}, rounds)
    return best["plain"], best["recorded"], n


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _two_steps(model, x, opt, variant):
    if variant == "plain":
        for _ in range(2):
            step(model, x, opt)
    else:
        with gradflow.record(model, keep="norms", keep_traces=False):
            for _ in range(2):
                step(model, x, opt)


def _warm(model, x, opt, variant):
    """One step of the variant first: optimizer state, imports and other one-time allocations."""
    if variant == "plain":
        step(model, x, opt)
    else:
        with gradflow.record(model, keep="norms", keep_traces=False):
            step(model, x, opt)


def _peak_child(cfg, variant, q):
    """Peak resident-set growth of two training steps: free memory is returned to the OS
    (malloc_trim) and the kernel's peak counter reset (clear_refs 5) before the steps."""
    import ctypes

    torch.set_num_threads(cfg["threads"])
    model, x, opt = make(cfg["kind"], cfg["H"], cfg["T"], cfg["L"], cfg["B"], "cpu")
    _warm(model, x, opt, variant)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _rss_kib("VmRSS")
    _two_steps(model, x, opt, variant)
    q.put((_rss_kib("VmHWM") - base) / 1024)


def _cuda_peak(cfg, variant):
    model, x, opt = make(cfg["kind"], cfg["H"], cfg["T"], cfg["L"], cfg["B"], cfg["device"])
    _warm(model, x, opt, variant)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _two_steps(model, x, opt, variant)
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_memory(cfg):
    """(plain, recorded) peak MiB of two steps."""
    if cfg["device"] != "cpu":
        return _cuda_peak(cfg, "plain"), _cuda_peak(cfg, "recorded")
    ctx = mp.get_context("spawn")
    out = {}
    for variant in ("plain", "recorded"):
        q = ctx.Queue()
        p = ctx.Process(target=_peak_child, args=(cfg, variant, q))
        p.start()
        out[variant] = q.get()
        p.join()
    return out["plain"], out["recorded"]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="H 64,256; T 16,256; layers 1,2")
    ap.add_argument("--kinds", default="lstm,gru,rnn_tanh")
    ap.add_argument("--H", default=None, help="comma-separated hidden sizes (default 64,256,1024)")
    ap.add_argument("--T", default=None, help="comma-separated sequence lengths (default 16,256,1024)")
    ap.add_argument("--layers", default=None, help="comma-separated layer counts (default 1,2,3)")
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one untimed)")
    ap.add_argument("--min-ms", type=float, default=100.0, help="shortest timing: steps per timing follow")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="time steps by wall clock or by the process's CPU time (cpu: for a shared machine, "
                         "with --threads 1)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--json", action="store_true", help="one JSON object per size")
    args = ap.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    bad = [k for k in kinds if k not in MODULES]
    if bad:
        ap.error(f"--kinds: unknown {bad}, choose from {sorted(MODULES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    Hs = _ints(args.H) if args.H else ([64, 256] if args.quick else [64, 256, 1024])
    Ts = _ints(args.T) if args.T else ([16, 256] if args.quick else [16, 256, 1024])
    Ls = _ints(args.layers) if args.layers else ([1, 2] if args.quick else [1, 2, 3])
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu: only with --device cpu (a GPU's time is not the process's CPU time)")
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if not args.json:
        print(f"B={args.B} threads={args.threads} device={args.device} rounds={args.rounds} clock={args.clock} "
              "(best of each)")
        print(f"{'kind':9s} {'L':>2s} {'H':>5s} {'T':>5s} {'plain ms':>10s} {'rec ms':>10s} {'time':>6s} "
              f"{'plain MiB':>10s} {'rec MiB':>9s} {'mem':>6s}")
    worst = [0.0, 0.0]
    for kind in kinds:
        for L in Ls:
            for H in Hs:
                for T in Ts:
                    p, r, n = run_time(kind, H, T, L, args.B, args.device, args.rounds, args.min_ms)
                    res = {"kind": kind, "layers": L, "H": H, "T": T, "B": args.B, "device": args.device, "clock": args.clock,
                           "steps_per_timing": n, "plain_ms": p * 1e3, "recorded_ms": r * 1e3,
                           "time_ratio": r / p}
                    worst[0] = max(worst[0], r / p)
                    if not args.no_memory:
                        cfg = dict(kind=kind, H=H, T=T, L=L, B=args.B, device=args.device, threads=args.threads)
                        mp_, mr = run_memory(cfg)
                        res.update(plain_peak_mib=mp_, recorded_peak_mib=mr, memory_ratio=mr / max(mp_, 1e-9))
                        worst[1] = max(worst[1], res["memory_ratio"])
                    if args.json:
                        print(json.dumps(res), flush=True)
                    else:
                        mem = ("" if args.no_memory else
                               f" {res['plain_peak_mib']:10.1f} {res['recorded_peak_mib']:9.1f} "
                               f"{res['memory_ratio']:5.2f}x")
                        print(f"{kind:9s} {L:2d} {H:5d} {T:5d} {p * 1e3:10.2f} {r * 1e3:10.2f} {r / p:5.2f}x{mem}",
                              flush=True)
    if not args.json:
        print(f"worst: time {worst[0]:.2f}x" + ("" if args.no_memory else f", memory {worst[1]:.2f}x"))


if __name__ == "__main__":
    sys.exit(main())
