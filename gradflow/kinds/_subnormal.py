"""Subnormal numbers flushed to zero while a recording kernel runs its backward on the CPU.

A vanishing gradient crosses the subnormal band on its way to 0 (float32: below 1.2e-38, down to
1.4e-45). On x86 every multiply-add with a subnormal operand or result takes a microcode assist,
about 100× slower: a float32 GEMM of [2048, 8000] × [8000, 512] with subnormal entries takes 28–36 s
on 2 cores instead of 0.18 s. So the backward of a 2-layer ``nn.LSTM(32, 512)`` over T=500, B=16
with the loss at the last step (δ_t underflows after ~200 steps) took 18–20 s, fused or recorded,
and 2.1 s recorded with subnormals flushed.

:func:`flushed` turns on FTZ/DAZ (``torch.set_flush_denormal``) in the calling thread and in every
thread of its OpenMP team (the threads that run torch's and MKL's parallel regions for it), and
puts back each thread's previous setting on exit, even on error. The effect on the numbers: a value
that would be subnormal is 0 (what TensorFlow and XLA do on CPU by default), so a recorded δ_t that
underflows reaches 0 at float32's smallest normal number (1.2e-38) rather than at 1.4e-45, where a
subnormal holds only a few significant bits anyway; parameter gradients change by less than 1.2e-38
(float64: 2.2e-308) per term. The log-space distance profile (``source="jacobians"``) follows the
decay past either limit.

The team is reached through libgomp's ``GOMP_parallel`` (the OpenMP runtime of torch's Linux
builds), already loaded by torch. Where it is not found (another OpenMP runtime, or torch's threads
set to 1), only the calling thread is set; where the CPU has no FTZ/DAZ, nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import threading

import torch

_TINY = 5e-324  # the smallest float64 subnormal: _TINY * 1.0 is 0.0 where FTZ or DAZ is on
_saved: dict[int, bool] = {}  # per OS thread, its setting before the innermost `flushed`
_team_fn = None  # (GOMP_parallel, callback) once looked up; False where unavailable
_lock = threading.RLock()
_SET, _RESTORE, _PROBE = 1, 0, 2
_probed: dict[int, bool] = {}


def is_flushing() -> bool:
    """Whether subnormals are flushed in the calling thread (a multiply in Python honours MXCSR)."""
    x = _TINY
    return x * 1.0 == 0.0


def _per_thread(arg) -> None:
    """Run on every thread of the team: save and set, or restore, that thread's FTZ/DAZ."""
    ident = threading.get_native_id()
    if arg == _SET:
        _saved[ident] = is_flushing()
        torch.set_flush_denormal(True)
    elif arg == _PROBE:
        _probed[ident] = is_flushing()
    else:
        torch.set_flush_denormal(_saved.pop(ident, False))


def _team():
    """(GOMP_parallel, callback) of the OpenMP runtime torch loaded, or None."""
    global _team_fn
    with _lock:
        if _team_fn is None:
            _team_fn = False
            names = ["libgomp.so.1"] + sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                                                     "libgomp*.so*")))
            for name in names:
                try:  # RTLD_NOLOAD: only a runtime that is already loaded (torch's own), never a second one
                    lib = ctypes.CDLL(name, mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
                    fn = lib.GOMP_parallel
                except (OSError, AttributeError):
                    continue
                fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
                fn.restype = None
                cb = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_per_thread)
                _team_fn = (fn, cb)
                break
    return _team_fn or None


def _run_on_team(arg: int) -> bool:
    team = _team()
    n = torch.get_num_threads()
    if team is None or n <= 1:
        return False
    fn, cb = team
    fn(ctypes.cast(cb, ctypes.c_void_p), ctypes.c_void_p(arg), n, 0)
    return True


def team_flushing() -> dict[int, bool]:
    """Whether each thread of the calling thread's OpenMP team flushes subnormals, by OS thread id
    (the calling thread alone where the team cannot be reached): what the tests check is put back."""
    with _lock:
        _probed.clear()
        if not _run_on_team(_PROBE):
            _probed[threading.get_native_id()] = is_flushing()
        return dict(_probed)


@contextlib.contextmanager
def flushed(enabled: bool = True):
    """FTZ/DAZ on in this thread and its OpenMP team for the block; every thread's previous setting
    is put back on exit. ``enabled=False`` (a CUDA kernel) changes nothing."""
    if not enabled:
        yield
        return
    main_prev = is_flushing()
    if not torch.set_flush_denormal(main_prev):  # no FTZ/DAZ on this CPU
        yield
        return
    # the team first, so that a worker thread its call creates starts from this thread's setting
    team = _run_on_team(_SET)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if team:
            _run_on_team(_RESTORE)
        torch.set_flush_denormal(main_prev)
