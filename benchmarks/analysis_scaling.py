"""Scaling of the default analysis (gradflow.analysis.analyze_trace) with H, T and B.

For each cell (nn.LSTM, nn.GRU; one layer, input 32) and size, a fresh subprocess records one
backward pass with ``gradflow.record(keep="states")`` (loss on the last step), then runs the default
analysis of that trace, and reports:

* ``record``: seconds of the recorded forward + backward pass (the baseline, same process);
* ``analysis``: seconds of ``analyze_trace(trace, AnalysisConfig(...))``, and the ratio to ``record``;
* ``peak RSS``: the process's peak resident set (``resource.getrusage(...).ru_maxrss``), and the
  growth over the RSS measured just before the analysis started (``rss_before``);
* the plan of the unit (dense / top-k, distribution steps, chunk).

At the end, per cell and H: the fitted exponents of analysis time and of the analysis' peak RSS
growth in T (and in B when several B are given): the slope of log(value) against log(T).

    python benchmarks/analysis_scaling.py --quick
    python benchmarks/analysis_scaling.py --H 64,128 --T 100,500 --B 8,16
    python benchmarks/analysis_scaling.py --device cuda     # on a GPU machine

Sizes run one after another (each in its own process, so peak RSS is per size). Quote ``uptime``
with the absolute times; the ratio to the recorded pass is the figure to compare.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import torch
import gradflow
from gradflow.analysis import AnalysisConfig, analyze_trace, plan_trace

def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

cell, H, T, B, memory, device, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6], int(sys.argv[7])
torch.set_num_threads(threads)
torch.manual_seed(0)
mod = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](32, H)
x = torch.randn(T, B, 32)
t0 = time.perf_counter()
with gradflow.record(mod, keep="states") as rec:
    out, _ = mod(x)
    out[-1].pow(2).mean().backward()
record = time.perf_counter() - t0
trace = rec.trace
cfg = AnalysisConfig(memory=memory, device=None if device == "auto" else device)
before = rss_now()
t0 = time.perf_counter()
plans = plan_trace(trace, cfg)
tables = analyze_trace(trace, cfg, plans=plans)
analysis = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"cell": cell, "H": H, "T": T, "B": B, "record": record, "analysis": analysis,
                              "peak": peak, "rss_before": before,
                              "plan": [p.describe() for p in plans.values()]}))
"""


def run_one(cell, H, T, B, args):
    cmd = [sys.executable, "-c", CHILD, cell, str(H), str(T), str(B), args.memory, args.device, str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    err = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"cell": cell, "H": H, "T": T, "B": B, "error": err}


def slope(xs, ys):
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else math.nan


def ints(text):
    return [int(v) for v in text.split(",") if v]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", default="lstm,gru")
    ap.add_argument("--H", default="64,128,256,512,1024")
    ap.add_argument("--T", default="100,500,2000")
    ap.add_argument("--B", default="16")
    ap.add_argument("--quick", action="store_true", help="H=64,256, T=100,500, B=8,16")
    ap.add_argument("--memory", default="2GB")
    ap.add_argument("--device", default="auto", help="cpu, cuda (default: the analysis' own choice)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)
    if args.quick:
        args.H, args.T, args.B = "64,256", "100,500", "8,16"
    cells = [c for c in args.cells.split(",") if c]
    Hs, Ts, Bs = ints(args.H), ints(args.T), ints(args.B)
    print(f"# analysis_scaling: cells={cells} H={Hs} T={Ts} B={Bs} memory={args.memory} device={args.device} "
          f"threads={args.threads}; load: {os.getloadavg()[0]:.2f}", flush=True)
    print(f"{'cell':5} {'H':>5} {'T':>5} {'B':>3} {'record s':>9} {'analysis s':>10} {'ratio':>7} "
          f"{'peak RSS':>9} {'growth':>8}  plan", flush=True)
    rows = []
    for cell in cells:
        for H in Hs:
            for T in Ts:
                for B in Bs:
                    r = run_one(cell, H, T, B, args)
                    rows.append(r)
                    if "error" in r:
                        print(f"{cell:5} {H:5d} {T:5d} {B:3d}  failed: {r['error']}", flush=True)
                        continue
                    grow = max(r["peak"] - r["rss_before"], 0)
                    print(f"{cell:5} {H:5d} {T:5d} {B:3d} {r['record']:9.2f} {r['analysis']:10.2f} "
                          f"{r['analysis'] / r['record']:6.1f}x {r['peak'] / 1e9:8.2f}G {grow / 1e9:7.2f}G  "
                          f"{r['plan'][0].split(': ', 1)[1]}", flush=True)
    print("# fitted exponents (slope of log value against log T or log B)")
    ok = [r for r in rows if "error" not in r]
    for cell in cells:
        for H in Hs:
            for B in Bs:
                sel = sorted((r for r in ok if (r["cell"], r["H"], r["B"]) == (cell, H, B)), key=lambda r: r["T"])
                if len(sel) >= 2:
                    ts = [r["T"] for r in sel]
                    print(f"{cell} H={H} B={B}: time ~ T^{slope(ts, [r['analysis'] for r in sel]):.2f}, "
                          f"RSS growth ~ T^{slope(ts, [max(r['peak'] - r['rss_before'], 1) for r in sel]):.2f}")
            for T in Ts:
                sel = sorted((r for r in ok if (r["cell"], r["H"], r["T"]) == (cell, H, T)), key=lambda r: r["B"])
                if len(sel) >= 2:
                    bs = [r["B"] for r in sel]
                    print(f"{cell} H={H} T={T}: time ~ B^{slope(bs, [r['analysis'] for r in sel]):.2f}, "
                          f"RSS growth ~ B^{slope(bs, [max(r['peak'] - r['rss_before'], 1) for r in sel]):.2f}")
    worst = max((r["analysis"] / r["record"] for r in ok), default=math.nan)
    print(f"# worst ratio analysis/recorded pass: {worst:.1f}x (target <= 20x)")
    return 0


if __name__ == "__main__":
    t = time.perf_counter()
    rc = main()
    print(f"# total {time.perf_counter() - t:.0f} s")
    sys.exit(rc)
