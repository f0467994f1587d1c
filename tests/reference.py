"""Brute-force references for the recording tests.

Independent of gradflow's unroll: each sequence of the batch is run on its own (its own length, no
masking), step by step from the module's parameters, with a zero *probe* tensor added to every state
s_t. The total derivative dL/ds_t is then ``autograd.grad(L, probe_t)`` — no tensor hooks involved.
For an LSTM, h_t is computed from c_t before c's probe is added, so the c probe sees only the
gradient through later steps (the c-block of δ_t with h and c as independent coordinates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def module_kind(m) -> str:
    if getattr(m, "kind_name", ""):  # gradflow's own layers (minGRU, minLSTM, IndRNN, LRU)
        return m.kind_name
    if isinstance(m, (nn.LSTM, nn.LSTMCell)):
        return "lstm"
    if isinstance(m, (nn.GRU, nn.GRUCell)):
        return "gru"
    return "rnn_relu" if m.nonlinearity == "relu" else "rnn_tanh"


def lru_lambda(p):
    """The LRU's complex λ = exp(−exp(ν) + i·exp(θ)) [N]."""
    return torch.exp(torch.complex(-torch.exp(p["nu_log"]), torch.exp(p["theta_log"])))


def new_step(kind, x, state, p):
    """One step of the unit-wise kinds from the papers' formulas. x [F] (or [B, F]), state (h,)."""
    h = state[0]
    if kind == "lru":  # complex arithmetic on h = s[:N] + i s[N:]
        N = p["nu_log"].shape[0]
        hc = torch.complex(h[..., :N], h[..., N:])
        bx = torch.complex(x @ p["B_re"].T, x @ p["B_im"].T)
        new = lru_lambda(p) * hc + torch.exp(p["gamma_log"]) * bx
        return (torch.cat([new.real, new.imag], -1),)
    a = x @ p["weight_ih"].T + p.get("bias_ih", 0.0)
    H = h.shape[-1]
    if kind == "mingru":
        z = torch.sigmoid(a[..., :H])
        return ((1 - z) * h + z * a[..., H:],)
    if kind == "minlstm":
        f, i = torch.sigmoid(a[..., :H]), torch.sigmoid(a[..., H:2 * H])
        return (f / (f + i) * h + i / (f + i) * a[..., 2 * H:],)
    assert kind == "indrnn", kind
    return (torch.relu(a + p["weight_hh"] * h),)


def cell_output(kind, x, state, p, activation="gelu"):
    """What a layer passes on from its new state: the state h, except for the LRU's
    GELU(Re(C h) + D x)."""
    if kind != "lru":
        return state[0]
    N = p["nu_log"].shape[0]
    h = torch.complex(state[0][..., :N], state[0][..., N:])
    y = (torch.complex(p["C_re"], p["C_im"]) @ h[..., None])[..., 0].real + (p["D"] @ x[..., None])[..., 0]
    return F.gelu(y) if activation == "gelu" else y


def cell_step(kind, x, state, p):
    """One step from explicit formulas. x [F], state tuple of [S]; returns (h_out, new_state_pre)
    where for LSTM new_state = (h, c) with h computed from c."""
    if kind in ("mingru", "minlstm", "indrnn", "lru"):
        return new_step(kind, x, state, p)
    w_ih, w_hh = p["weight_ih"], p["weight_hh"]
    b_ih = p.get("bias_ih", torch.zeros(w_ih.shape[0], dtype=x.dtype))
    b_hh = p.get("bias_hh", torch.zeros(w_hh.shape[0], dtype=x.dtype))
    h = state[0]
    if kind == "lstm":
        c = state[1]
        g = w_ih @ x + b_ih + w_hh @ h + b_hh
        H = c.shape[0]
        i, f, gg, o = torch.sigmoid(g[:H]), torch.sigmoid(g[H:2 * H]), torch.tanh(g[2 * H:3 * H]), torch.sigmoid(g[3 * H:])
        c_new = f * c + i * gg
        h_new = o * torch.tanh(c_new)
        if "weight_hr" in p:
            h_new = p["weight_hr"] @ h_new
        return (h_new, c_new)
    if kind == "gru":
        H = h.shape[0]
        gi = w_ih @ x + b_ih
        gh = w_hh @ h + b_hh
        r = torch.sigmoid(gi[:H] + gh[:H])
        z = torch.sigmoid(gi[H:2 * H] + gh[H:2 * H])
        n = torch.tanh(gi[2 * H:] + r * gh[2 * H:])
        return ((1 - z) * n + z * h,)
    pre = w_ih @ x + b_ih + w_hh @ h + b_hh
    return ((torch.relu(pre) if kind == "rnn_relu" else torch.tanh(pre)),)


def fused_params(m, layer, d):
    sfx = f"_l{layer}" + ("_reverse" if d else "")
    names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr", "nu_log", "theta_log", "gamma_log",
             "B_re", "B_im", "C_re", "C_im", "D"]
    return {n: getattr(m, n + sfx) for n in names if hasattr(m, n + sfx)}


def reference_fused(m, x, lengths, h0, c0, w_out, w_h, w_c):
    """Per-sequence unroll of fused module ``m``.

    x [T, B, F] (time-major, zero past each length), lengths [B], h0/c0 [L*D, B, *] (zeros if None),
    loss L = Σ_b Σ_{t<len_b} <w_out[t,b], out[t,b]> + <w_h, h_n> + <w_c, c_n>.
    Returns (L, {(layer, dir, state): δ [T, B, S] with NaN past each length}).
    """
    kind = module_kind(m)
    D = 2 if m.bidirectional else 1
    T, B, _ = x.shape
    total = 0.0
    grads = {}
    for b in range(B):
        n = int(lengths[b])
        probes = {}
        inp = [x[t, b] for t in range(n)]
        for layer in range(m.num_layers):
            outs = []
            for d in range(D):
                p = fused_params(m, layer, d)
                i = layer * D + d
                state = (h0[i, b],) + ((c0[i, b],) if kind == "lstm" else ())
                seq = [None] * n
                order = range(n - 1, -1, -1) if d else range(n)
                for t in order:
                    new = cell_step(kind, inp[t], state, p)
                    pr = tuple(torch.zeros_like(s, requires_grad=True) for s in new)
                    for name, q in zip(("h", "c"), pr):
                        probes[(layer, d, name, t)] = q
                    state = tuple(s + q for s, q in zip(new, pr))
                    seq[t] = cell_output(kind, inp[t], state, p, getattr(m, "activation", None))
                outs.append(seq)
                total = total + (w_h[i, b] * state[0]).sum()
                if kind == "lstm":
                    total = total + (w_c[i, b] * state[1]).sum()
            inp = [torch.cat([o[t] for o in outs]) for t in range(n)]
        for t in range(n):
            total = total + (w_out[t, b] * inp[t]).sum()
        keys = list(probes)
        gs = torch.autograd.grad(total, [probes[k] for k in keys], retain_graph=True, allow_unused=True)
        for k, g in zip(keys, gs):
            layer, d, name, t = k
            if (layer, d, name) not in grads:
                size = probes[k].shape[0]
                grads[(layer, d, name)] = torch.full((T, B, size), float("nan"), dtype=x.dtype)
            grads[(layer, d, name)][t, b] = torch.zeros_like(probes[k]) if g is None else g
    return total, grads
