"""Lyapunov spectrum along recorded sequences: gradflow vs a per-step autograd Jacobian + QR loop.

A recorded nn.RNN/GRU/LSTM or gradflow minGRU/LRU layer (``keep="states"``), T steps, B sequences,
the full spectrum (or the top ``--k`` exponents). gradflow: ``lyapunov_spectrum(trace, key, warmup=W)``
— factored closed-form J·Q products (no S×S Jacobian is formed), several steps per float64 QR while
the spectrum's spread allows; a full frame of S ≥ 128 (LSTM: S ≥ 64) is kept as Householder reflectors
between QRs, the next J_t Q applied by ormqr to the formed J_t (no orgqr); for the diagonal kinds (minGRU, LRU) per-unit time averages of
ln|d_t|, with no QR at all. Baseline (the textbook route): at every step the batch of Jacobians by
``vmap(jacrev(step))`` (float64, as gradflow), then ``Q, R = torch.linalg.qr(J @ Q)``, exponents = mean
ln|diag R|. Both are timed with perf_counter in this process: --repeats rounds that run every
variant in turn, after one untimed round, and the best time of each. gradflow runs with its default thread choice (batch groups on a thread pool when the
step is large enough) and is also timed on one thread; the baseline is timed with one intra-op
thread and with os.cpu_count(), and its faster time is the one compared. The exponents are checked to agree.

With ``--k`` both start from the same random orthonormal [S, k] frame (that of
``lyapunov_exponents(seed=0)``), so the top-k exponents agree to rounding, as the full ones do.
``--device cuda`` runs both on the GPU (gradflow: ``device=``; the baseline's Jacobians and QR there).

    python benchmarks/lyapunov.py [--cell gru|lstm|rnn_tanh|mingru|lru] [--H 32] [--B 16] [--T 1000] [--k K]
                                  [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.func import jacrev, vmap

import gradflow
from _rounds import best_of_rounds, timed

FUSED = {"rnn_tanh": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM,
         "mingru": lambda F, H: gradflow.kinds.get("mingru").impl.layer(F, H),
         "lru": lambda F, H: gradflow.kinds.get("lru").impl.layer(F, H, r_min=0.5, r_max=0.999)}


def _diagonal_step(cell, rnn, H):
    p = {n[:-3]: v.detach().double() for n, v in rnn.named_parameters()}
    if cell == "mingru":
        def step(x, s):
            a = p["weight_ih"] @ x + p["bias_ih"]
            z = torch.sigmoid(a[:H])
            return (1 - z) * s + z * a[H:]
        return step
    lam = torch.exp(torch.complex(-torch.exp(p["nu_log"]), torch.exp(p["theta_log"])))
    g = torch.exp(p["gamma_log"])

    def step(x, s):  # s = [Re h; Im h]
        h = lam * torch.complex(s[:H], s[H:]) + g * torch.complex(p["B_re"] @ x, p["B_im"] @ x)
        return torch.cat([h.real, h.imag])
    return step


def record(args):
    torch.manual_seed(0)
    rnn = FUSED[args.cell](args.F, args.H)
    x = torch.randn(args.T, args.B, args.F)
    with gradflow.record(rnn, keep="states") as rec:
        out, _ = rnn(x)
        out.pow(2).mean().backward()
    return rnn, rec.trace


def step_fn(cell, rnn, H):
    if cell in ("mingru", "lru"):
        return _diagonal_step(cell, rnn, H)
    w_ih, w_hh, b_ih, b_hh = (getattr(rnn, n + "_l0").detach().double() for n in ("weight_ih", "weight_hh",
                                                                                  "bias_ih", "bias_hh"))

    def step(x, s):
        h = s[:H]
        gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
        if cell == "rnn_tanh":
            return torch.tanh(gi + gh)
        if cell == "gru":
            r, z = torch.sigmoid(gi[:H] + gh[:H]), torch.sigmoid(gi[H:2 * H] + gh[H:2 * H])
            n = torch.tanh(gi[2 * H:] + r * gh[2 * H:])
            return (1 - z) * n + z * h
        i, f, g, o = (gi + gh).chunk(4)
        c2 = torch.sigmoid(f) * s[H:] + torch.sigmoid(i) * torch.tanh(g)
        return torch.cat([torch.sigmoid(o) * torch.tanh(c2), c2])

    return step


def baseline(args, rnn, trace, key):
    keys = [key, key.with_state("c")] if args.cell == "lstm" else [key]
    dev = torch.device(args.device)
    x = trace.inputs(key).double().to(dev)
    s = torch.cat([trace.prev_states(k) for k in keys], -1).double().to(dev)
    S = s.shape[-1]
    jac = vmap(jacrev(step_fn(args.cell, rnn.to(dev), args.H), argnums=1))
    k = args.k or S
    if k == S:
        Q0 = torch.eye(S, dtype=torch.float64)
    else:  # the start frame of lyapunov_exponents(seed=0)
        g = torch.Generator().manual_seed(0)
        Q0 = torch.linalg.qr(torch.randn(S, S, generator=g, dtype=torch.float64)[:, :k]).Q
    Q = Q0.to(dev).expand(args.B, S, k)
    total = torch.zeros(args.B, k, dtype=torch.float64, device=dev)
    for t in range(args.T):
        J = jac(x[t], s[t])
        Q, R = torch.linalg.qr(J @ Q)
        if t >= args.warmup:
            total += R.diagonal(dim1=-2, dim2=-1).abs().log()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (total.cpu() / (args.T - args.warmup)).sort(-1, descending=True).values


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=sorted(FUSED), default="gru")
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--F", type=int, default=8)
    ap.add_argument("--k", type=int, default=None, help="top-k exponents (default: all)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant (the best is kept)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where both sides compute")
    args = ap.parse_args()
    torch.set_num_threads(1)  # both sides: sequential loops of small factorizations
    rnn, trace = record(args)
    key = trace.keys(state="h")[0]
    cores = os.cpu_count() or 1

    spectrum = gradflow.lyapunov_spectrum

    def with_threads(n, fn):  # torch's intra-op thread count for one call
        torch.set_num_threads(n)
        try:
            return fn()
        finally:
            torch.set_num_threads(1)

    variants = {  # gradflow's default reads torch's thread count, which is the core count by default
        "ours": lambda: with_threads(cores, lambda: spectrum(trace, key, warmup=args.warmup, k=args.k,
                                                                  device=args.device)),
        "ours1": lambda: spectrum(trace, key, warmup=args.warmup, k=args.k, threads=1, device=args.device),
        **{f"base{n}": (lambda n=n: with_threads(n, lambda: baseline(args, rnn, trace, key)))
           for n in sorted({1, cores})}}
    best, out = best_of_rounds({name: timed(fn) for name, fn in variants.items()}, args.repeats)
    ours, ours1 = best["ours"], best["ours1"]
    res, ref = out["ours"], out[f"base{cores}"]
    base_t = {n: best[f"base{n}"] for n in sorted({1, cores})}
    base = min(base_t.values())

    kk = res.exponents.shape[-1]
    dev = float((res.exponents - ref).abs().max())
    print(f"{args.cell} H={args.H} (S={res.exponents.shape[-1] if args.k is None else 'top ' + str(kk)}), "
          f"B={args.B}, T={args.T}, warm-up {args.warmup}: Lyapunov spectrum per sequence")
    print(f"gradflow: {ours:8.2f} s  (lyapunov_spectrum, default batch groups on up to {cores} threads; "
          f"{ours1:.2f} s on one thread)")
    print(f"baseline: {base:8.2f} s  (vmap(jacrev) Jacobian + float64 QR at every step; "
          + ", ".join(f"{v:.2f} s with {n} thread{'s' if n > 1 else ''}" for n, v in base_t.items()) + ")")
    print(f"ratio:    {base / ours:8.1f}x   ({base / ours1:.1f}x single-threaded)   (target >= 10x)")
    print(f"agreement: max |Δλ| = {dev:.1e} per step (λ_1 = {float(ref[:, 0].mean()):+.4f}, "
          f"λ_S = {float(ref[:, -1].mean()):+.4f}; convergence drift {float(res.drift.max()):.1e})")
    rel = float(((res.exponents - ref).abs() / ref.abs().clamp_min(1e-3)).max())
    print(f"           max relative |Δλ|/max(|λ|, 1e-3) = {rel:.1e}   (target <= 1e-6)")
    if dev > 1e-6:
        raise SystemExit("results disagree")


if __name__ == "__main__":
    main()
