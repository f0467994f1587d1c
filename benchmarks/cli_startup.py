"""CLI start-up: wall time of ``gradflow --help``, ``gradflow list`` and ``gradflow run --help``
against ``python -c pass`` (the interpreter's own start-up), in the same run.

Each command is a fresh process running the ``gradflow`` console script's entry point
(``gradflow.cli:main``) with this interpreter, so the code under test is the one on the import
path (``export PYTHONPATH=$PWD`` in a checkout). Variants run in interleaved rounds (see _rounds.py):
each keeps its best and median time; ratios are of best times. ``python -c "import torch"`` is timed
as well, for scale: it is what ``--help`` no longer pays.

    python benchmarks/cli_startup.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

ENTRY = "import sys; from gradflow.cli import main; main()"
VARIANTS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "gradflow --help": [sys.executable, "-c", ENTRY, "--help"],
    "gradflow list": [sys.executable, "-c", ENTRY, "list"],
    "gradflow run --help": [sys.executable, "-c", ENTRY, "run", "--help"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
}


def _once(cmd) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for rnd in range(args.repeats + 1):
        for name, cmd in VARIANTS.items():
            s = _once(cmd)
            if rnd:  # the first round warms the file cache
                times[name].append(s)
    base = min(times["python -c pass"])
    print(f"{'command':28s} {'best s':>8s} {'median s':>9s} {'max s':>7s} {'best / python -c pass':>22s}")
    for name, v in times.items():
        print(f"{name:28s} {min(v):8.3f} {statistics.median(v):9.3f} {max(v):7.3f} {min(v) / base:21.1f}x")


if __name__ == "__main__":
    main()
