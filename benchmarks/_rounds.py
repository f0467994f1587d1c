"""Interleaved timing rounds shared by the benchmarks (imported as a sibling module: the scripts run
as ``python benchmarks/NAME.py``, which puts this folder on sys.path).

Every variant runs once per round, in turn; the first round is untimed and each variant keeps its
best time. Timing variants one after another in a fixed order favours whichever runs after the
process's allocator has warmed up (measured: the same call took 0.35 s first and 0.24 s later)."""

from __future__ import annotations

import time
from typing import Callable


def timed(fn: Callable) -> Callable:
    """A variant timed as a whole call: returns (output, seconds)."""
    def run():
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0
    return run


def best_of_rounds(variants: dict[str, Callable], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """variants: name -> callable returning (output, seconds) (wrap plain calls with :func:`timed`; a
    variant may time only part of its work). Returns ({name: best seconds}, {name: last output})."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    out: dict[str, object] = {}
    for rnd in range(max(1, repeats) + 1):
        for name, fn in variants.items():
            out[name], seconds = fn()
            if rnd:
                times[name].append(seconds)
    return {name: min(v) for name, v in times.items()}, out
