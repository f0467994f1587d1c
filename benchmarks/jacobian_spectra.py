"""Top singular values of every per-step joint Jacobian of an LSTM: gradflow's matrix-free route vs the obvious one.

nn.LSTM H=128 (joint state [h; c], S = 256), T=200, B=32, recorded with ``gradflow.record(keep="states")``.

* gradflow, top k (default 8): ``linearize_trace(trace, key, dtype=float64)`` (the factored closed
  form, no S×S matrix) + ``top_singular_values(lin, k, tol)`` (Golub–Kahan–Lanczos from J v / Jᵀ u
  products, batched over (t, b), in time chunks; ``--tol`` default 1e-8, the agreement asked is 1e-6).
* baseline: ``torch.func.vmap(jacrev(step))`` over the batch at every timestep (float64) +
  ``torch.linalg.svdvals``, the top k taken from it.
* second line, the full spectra: gradflow ``jacobians`` + ``singular_values`` (threaded LAPACK) vs the
  same baseline (which computes every singular value anyway).

Both sides run in this process with one intra-op thread (gradflow's dense route spreads its SVDs
over a pool of os.cpu_count() threads), interleaved rounds (``_rounds.py``), best time of each;
results must agree to 1e-6 relative (top k) and 1e-9·σ_max (full spectra). The ratio is what to
quote, with the machine load. The Lanczos route's cost grows with the iterations it needs: when the
top of the spectrum is flat (an untrained LSTM: σ_1..σ_12 within 15%), resolving σ_8 takes ~62
iterations for 1e-6 and ~75 for 1e-10 at S = 256, i.e. ~150 products J v / Jᵀ u of 2·4H·H flops
each, about the flops of a dense values-only SVD (8/3·S³); it pays off when S is large against the
iterations.

    python benchmarks/jacobian_spectra.py [--H 128] [--T 200] [--B 32] [--F 64] [--k 8] [--tol 1e-8] [--repeats 1]
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
from gradflow.analysis import linearize_trace, top_singular_values


def record(args):
    torch.manual_seed(0)
    lstm = nn.LSTM(args.F, args.H)
    x = torch.randn(args.T, args.B, args.F)
    with gradflow.record(lstm, keep="states") as rec:
        out, _ = lstm(x)
        out.pow(2).mean().backward()
    return lstm, rec.trace


def baseline_jacobians(lstm, trace, key, H, dev):
    """vmap(jacrev(step)) per timestep on the joint state, float64."""
    w_ih, w_hh, b_ih, b_hh = (p.detach().double().to(dev) for p in (lstm.weight_ih_l0, lstm.weight_hh_l0,
                                                                    lstm.bias_ih_l0, lstm.bias_hh_l0))

    def step(x, s):
        h, c = s[:H], s[H:]
        i, f, g, o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
        c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.cat([torch.sigmoid(o) * torch.tanh(c2), c2])

    jac = vmap(jacrev(step, argnums=1))
    x = trace.inputs(key).double().to(dev)
    s = torch.cat([trace.prev_states(key), trace.prev_states(key.with_state("c"))], -1).double().to(dev)
    return torch.stack([jac(x[t], s[t]) for t in range(x.shape[0])])


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--H", type=int, default=128)
    ap.add_argument("--T", type=int, default=200)
    ap.add_argument("--B", type=int, default=32)
    ap.add_argument("--F", type=int, default=64)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-8, help="top-k stopping tolerance (relative change)")
    ap.add_argument("--repeats", type=int, default=1, help="timed rounds per variant (the best is kept)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where both sides compute")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one intra-op thread on both sides (shared cores: OpenMP spinning hurts)
    threads = os.cpu_count() or 1
    dev = torch.device(args.device)
    lstm, trace = record(args)
    key = trace.keys(state="h")[0]
    k = args.k

    def ours_top():
        lin = linearize_trace(trace, key, dtype=torch.float64)
        out = top_singular_values(lin, k, tol=args.tol, device=dev)
        _sync(dev)
        return out

    def ours_full():
        J = gradflow.jacobians(trace, key, dtype=torch.float64).to(dev)
        out = gradflow.singular_values(J, threads=threads)
        _sync(dev)
        return out.cpu()

    def base():
        J = baseline_jacobians(lstm, trace, key, args.H, dev)
        out = torch.linalg.svdvals(J)
        _sync(dev)
        return out.cpu()

    best, out = best_of_rounds({"top": timed(ours_top), "full": timed(ours_full), "base": timed(base)}, args.repeats)
    sv_ref = out["base"]
    top_err = float(((out["top"] - sv_ref[..., :k]).abs() / sv_ref[..., :k]).max())
    full_err = float(((out["full"] - sv_ref).abs() / sv_ref[..., :1]).max())
    S = sv_ref.shape[-1]
    n = args.T * args.B
    print(f"LSTM H={args.H} (S={S}), T={args.T}, B={args.B}: {n} per-step Jacobians, device {dev}, load "
          f"{os.getloadavg()[0]:.1f} on {threads} cores")
    print(f"top {k}:  gradflow {best['top']:8.2f} s (linearize_trace + top_singular_values, matrix-free)  "
          f"baseline {best['base']:8.2f} s (vmap(jacrev) per step + svdvals, top {k} of it)  "
          f"ratio {best['base'] / best['top']:6.2f}x (target >= 20x)  max rel. error {top_err:.1e}")
    print(f"full:   gradflow {best['full']:8.2f} s (jacobians + singular_values, dense)  baseline {best['base']:8.2f} s  "
          f"ratio {best['base'] / best['full']:6.2f}x  max |Δσ|/σ_max {full_err:.1e}")
    if top_err > 1e-6 or full_err > 1e-9:
        raise SystemExit("results disagree")


if __name__ == "__main__":
    main()
