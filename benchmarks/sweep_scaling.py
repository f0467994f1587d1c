"""Sweep scaling: wall time of the local engine with 2 worker processes against 1, same sweep.

A sweep of small runs (checksum, 2 cells x 2 gains x 2 seeds = 8 runs by default; T=40, hidden 32,
``--steps`` steps each) is run twice into fresh temporary directories with ``run_sweep(...,
workers=1)`` and ``workers=2``, each timed with ``time.perf_counter`` from the call to its return
(so both include starting the worker pool). Each worker runs torch with one thread, so the ideal
speed-up on a machine with >= 2 free cores is 2x. The two sweeps' sweep.csv tables are checked to be
identical. The load average is printed because other busy processes on the machine cap the
speed-up: it is only meaningful with two cores free.

    python benchmarks/sweep_scaling.py [--steps 60] [--T 40] [--hidden 32]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tomllib
from pathlib import Path

SPEC = """title = "sweep scaling"
claim = "Benchmark sweep."
[task]
name = "checksum"
T = {T}
[model]
hidden = {hidden}
init = "gaussian"
[train]
steps = {steps}
batch = 32
eval_batch = 64
record_every = 20
[sweep]
cell = ["rnn_tanh", "gru"]
gain = [0.9, 1.1]
seed = [0, 1]
"""


def main() -> None:
    import pandas as pd

    from gradflow.sweep import expand_sweep, run_sweep

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--T", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=32)
    args = ap.parse_args()
    sweep = expand_sweep(tomllib.loads(SPEC.format(**vars(args))), "<benchmark>", "scaling")
    times, tables = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            out = Path(tmp) / f"w{workers}"
            t0 = time.perf_counter()
            res = run_sweep(sweep, out, workers=workers)
            times[workers] = time.perf_counter() - t0
            assert not res.failed, res.failed
            tables[workers] = pd.read_csv(out / "sweep.csv")
    pd.testing.assert_frame_equal(tables[1], tables[2], check_exact=False, rtol=1e-9)
    n = len(sweep.runs)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"sweep of {n} runs (T={args.T}, hidden={args.hidden}, steps={args.steps}) on {os.cpu_count()} CPUs, "
          f"1-min load average {load:.1f} at the end (other processes compete for the cores)")
    print(f"local engine, 1 worker : {times[1]:7.2f} s")
    print(f"local engine, 2 workers: {times[2]:7.2f} s")
    print(f"speed-up 2 workers over 1: {times[1] / times[2]:.2f}x (identical sweep.csv)")


if __name__ == "__main__":
    main()
