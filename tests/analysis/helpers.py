"""Independent float64 references for the analysis tests.

Explicit cell steps written from the PyTorch formulas (not gradflow's code), an explicit unroll that
builds a keep='states' Trace through Trace.add_unit/add_state (the public builder), and the total derivative δ_t from
zero *probes* added to every state (for an LSTM, h_t is computed from c_t before c's probe is added,
so the c probe sees only the gradient through later steps).
"""

from __future__ import annotations

import math

import torch

from gradflow.trace import CellInfo, StateKey, Trace
from tests.reference import new_step

DT = torch.float64
G = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}
NEW = {"mingru": 2, "minlstm": 3, "indrnn": 1, "lru": 0}  # unit-wise kinds: H-row blocks of weight_ih


def _new_params(kind, F, H, g, bias, r):
    if kind == "lru":  # |λ| in [0.5, 0.99], phases in [0.1, 3]
        u = lambda: torch.rand(H, generator=g, dtype=DT)  # noqa: E731
        return {"nu_log": torch.log(-torch.log(0.5 + 0.49 * u())), "theta_log": torch.log(0.1 + 2.9 * u()),
                "gamma_log": r(H), "B_re": r(H, F), "B_im": r(H, F), "C_re": r(H, H), "C_im": r(H, H), "D": r(H, F)}
    n = NEW[kind] * H
    p = {"weight_ih": r(n, F)}
    if kind == "indrnn":
        p["weight_hh"] = torch.rand(H, generator=g, dtype=DT) * 2.4 - 1.2
    if bias:
        p["bias_ih"] = r(n)
    return p


def make_params(kind, F, H, *, bias=True, proj=0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind in NEW:
        return _new_params(kind, F, H, g, bias, lambda *s: (torch.rand(*s, generator=g, dtype=DT) * 2 - 1) * scale)
    P = proj or H
    n = G[kind] * H
    r = lambda *s: (torch.rand(*s, generator=g, dtype=DT) * 2 - 1) * scale / H ** 0.5  # noqa: E731
    p = {"weight_ih": r(n, F), "weight_hh": r(n, P)}
    if bias:
        p["bias_ih"], p["bias_hh"] = r(n), r(n)
    if proj:
        p["weight_hr"] = r(P, H)
    return p


def step(kind, p, x, state):
    """One step on a batch: x [B, F], state tuple of [B, S] -> new state tuple (explicit formulas)."""
    if kind in NEW:
        return new_step(kind, x, state, p)
    h = state[0]
    b_ih = p.get("bias_ih", 0.0)
    b_hh = p.get("bias_hh", 0.0)
    gi = x @ p["weight_ih"].T + b_ih
    gh = h @ p["weight_hh"].T + b_hh
    if kind in ("rnn_tanh", "rnn_relu"):
        a = gi + gh
        return (torch.tanh(a) if kind == "rnn_tanh" else torch.relu(a),)
    if kind == "gru":
        H = h.shape[-1]
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        n = torch.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        return ((1 - z) * n + z * h,)
    c = state[1]
    H = c.shape[-1]
    a = gi + gh
    i, f, gg, o = (a[:, k * H:(k + 1) * H] for k in range(4))
    c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
    h2 = torch.sigmoid(o) * torch.tanh(c2)
    if "weight_hr" in p:
        h2 = h2 @ p["weight_hr"].T
    return (h2, c2)


def info(kind, F, H, *, bias=True, proj=0, custom_states=None):
    if kind == "custom":
        names = tuple(custom_states)
        return CellInfo("custom", F, H, 0, names, {n: H for n in names}, bias, "custom", "TestCell")
    P = proj or H
    if kind == "lstm":
        return CellInfo("lstm", F, H, proj, ("h", "c"), {"h": P, "c": H}, bias)
    if kind == "lru":  # state [Re h; Im h]
        return CellInfo(kind, F, H, 0, ("h",), {"h": 2 * H}, False)
    return CellInfo(kind, F, H, 0, ("h",), {"h": H}, bias)


def unroll(kind, p, x, s0, *, direction=0, lengths=None, step_fn=None, loss="last", seed=1):
    """Run the recurrence on x [T, B, F] from s0 (tuple of [B, S_i]).

    Returns (states, prevs, grads): tuples (per state) of [T, B, S_i] tensors, position order.
    Past a sequence's length the state is carried unchanged (masked step). The loss is
    Σ_b <w, h_last(b)> (loss='last': last processed valid step) or Σ_t Σ_b <w_t, h_t> ('all')."""
    T, B, _ = x.shape
    step_fn = step_fn or (lambda xt, s: step(kind, p, xt, s))
    lengths = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths)
    g = torch.Generator().manual_seed(seed)
    order = list(range(T)) if direction == 0 else list(range(T - 1, -1, -1))
    n = len(s0)
    probes = [[torch.zeros_like(s, requires_grad=True) for s in s0] for _ in range(T)]
    states, prevs = [[None] * T for _ in range(n)], [[None] * T for _ in range(n)]
    s = tuple(s0)
    L = 0.0
    ws = torch.randn(T, B, s0[0].shape[-1], generator=g, dtype=DT)
    for t in order:
        valid = (t < lengths).to(DT)[:, None]
        new = step_fn(x[t], s)
        new = tuple(valid * a + (1 - valid) * b for a, b in zip(new, s))
        new = tuple(a + pr for a, pr in zip(new, probes[t]))
        for i in range(n):
            prevs[i][t], states[i][t] = s[i], new[i]
        if loss == "all":
            L = L + (ws[t] * new[0] * valid).sum()
        s = new
    if loss == "last":
        last = torch.stack([states[0][(int(lengths[b]) - 1) if direction == 0 else 0][b] for b in range(B)])
        L = (ws[0] * last).sum()
    flat = [pr for row in probes for pr in row]
    gr = torch.autograd.grad(L, flat, allow_unused=True)
    grads = [[None] * T for _ in range(n)]
    for t in range(T):
        for i in range(n):
            gi = gr[t * n + i]
            grads[i][t] = torch.zeros_like(s0[i]) if gi is None else gi
    st = tuple(torch.stack(a).detach() for a in states)
    pv = tuple(torch.stack(a).detach() for a in prevs)
    gd = tuple(torch.stack(a) for a in grads)
    mask = torch.arange(T)[:, None] < lengths[None, :]
    gd = tuple(torch.where(mask[..., None], a, torch.nan) for a in gd)
    return st, pv, gd, mask, L


def make_trace(kind, *, T=5, B=3, F=4, H=3, bias=True, proj=0, direction=0, lengths=None, seed=0, scale=1.0,
               step_fn=None, custom_states=("h",), loss="last", x_scale=1.0, module="rnn"):
    """A keep='states' Trace of one unit built from the explicit unroll; returns (trace, key, ref)
    with ref a dict of p, x, states, prevs, grads, mask, step (the explicit batch step function)."""
    g = torch.Generator().manual_seed(seed + 100)
    cell = info(kind, F, H, bias=bias, proj=proj, custom_states=custom_states)
    p = make_params(kind, F, H, bias=bias, proj=proj, scale=scale, seed=seed) if kind != "custom" else {}
    x = torch.randn(T, B, F, generator=g, dtype=DT) * x_scale
    sizes = [cell.state_sizes[s] for s in cell.states]
    s0 = tuple(torch.randn(B, n, generator=g, dtype=DT) * 0.5 for n in sizes)
    fn = step_fn or (lambda xt, s: step(kind, p, xt, s))
    st, pv, gd, mask, _ = unroll(kind, p, x, s0, direction=direction, lengths=lengths, step_fn=fn, loss=loss)
    tr = Trace(keep="states")
    unit = (module, 0, direction, 0)
    tr.add_unit(unit, cell, mask, inputs=x, params=p or None, step=fn if kind == "custom" else None)
    for name, s, pr, gr in zip(cell.states, st, pv, gd):
        tr.add_state(StateKey(module, 0, direction, name), gr, state=s, prev=pr)
    key = StateKey(module, 0, direction, cell.states[0])
    return tr, key, {"p": p, "x": x, "states": st, "prevs": pv, "grads": gd, "mask": mask, "step": fn,
                     "cell": cell, "s0": s0}


def autograd_jacobians(step_fn, x, prevs):
    """[T, B, S, S] by torch.autograd.functional.jacobian of the explicit step, one (t, b) at a time."""
    T, B, _ = x.shape
    sizes = [p.shape[-1] for p in prevs]
    S = sum(sizes)
    out = torch.empty(T, B, S, S, dtype=DT)
    for t in range(T):
        for b in range(B):
            def f(s):
                parts = s.split(sizes)
                new = step_fn(x[t, b][None], tuple(q[None] for q in parts))
                return torch.cat([q[0] for q in new])
            out[t, b] = torch.autograd.functional.jacobian(f, torch.cat([p[t, b] for p in prevs]))
    return out


def separate_backward_passes(ref, *, direction=0, lengths=None, state=0, seed=1):
    """Reference G[s, t, b] = ||∂L_s/∂s_t|| (block ``state``) by one backward pass per source s, for
    L_s = Σ_b <w_s, h_s> (w as in ``unroll(loss='all')``); NaN where t is after s or masked.
    Also returns the joint direct gradients [T, B, S] (w_s in the h block)."""
    x, s0, fn = ref["x"], ref["s0"], ref["step"]
    T, B, _ = x.shape
    lengths = torch.full((B,), T) if lengths is None else torch.as_tensor(lengths)
    g = torch.Generator().manual_seed(seed)
    ws = torch.randn(T, B, s0[0].shape[-1], generator=g, dtype=DT)
    order = list(range(T)) if direction == 0 else list(range(T - 1, -1, -1))
    probes = [[torch.zeros_like(s, requires_grad=True) for s in s0] for _ in range(T)]
    s, losses = tuple(s0), {}
    for t in order:
        valid = (t < lengths).to(DT)[:, None]
        new = fn(x[t], s)
        new = tuple(valid * a + (1 - valid) * b for a, b in zip(new, s))
        new = tuple(a + pr for a, pr in zip(new, probes[t]))
        losses[t] = (ws[t] * new[0] * valid).sum()
        s = new
    G = torch.full((T, T, B), float("nan"), dtype=DT)
    for si in range(T):
        before = order[: order.index(si) + 1]
        grads = torch.autograd.grad(losses[si], [probes[t][state] for t in before], retain_graph=True,
                                    allow_unused=True)
        for t, gr in zip(before, grads):
            G[si, t] = torch.zeros(B, dtype=DT) if gr is None else gr.norm(dim=-1)
    mask = torch.arange(T)[:, None] < lengths[None, :]
    G = torch.where(mask[:, None, :] & mask[None, :, :], G, float("nan"))
    S = sum(p.shape[-1] for p in s0)
    direct = torch.zeros(T, B, S, dtype=DT)
    direct[..., : s0[0].shape[-1]] = ws * mask[..., None]
    return G, direct


def float32_linear_trace(s=0.01, T=30, H=3, B=2):
    """A float32 linear RNN h' = s·Q h + x whose δ_t = s^(T-1-t)·(Qᵀ)^(T-1-t) w underflows float32 to
    exactly 0 beyond distance ~22, while its log-space value is (T-1-t)·log10 s + log10||w||."""
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(H, H, generator=g, dtype=torch.float64)).Q.float()
    W = s * Q
    step = lambda x, st: (st[0] @ W.T + x,)  # noqa: E731
    x = torch.randn(T, B, H, generator=g)
    hs, prevs, probes = [], [], []
    cur = torch.randn(B, H, generator=g)
    for t in range(T):
        pr = torch.zeros(B, H, requires_grad=True)
        prevs.append(cur)
        cur = step(x[t], (cur,))[0] + pr
        hs.append(cur)
        probes.append(pr)
    w = torch.randn(B, H, generator=g)
    grads = torch.stack(torch.autograd.grad((w * hs[-1]).sum(), probes))
    cell = CellInfo("custom", H, H, 0, ("h",), {"h": H}, True, "custom", "Linear")
    tr = Trace(keep="states")
    key = StateKey("lin", 0, 0, "h")
    tr.add_unit(key.unit, cell, torch.ones(T, B, dtype=torch.bool), inputs=x, step=step)
    tr.add_state(key, grads, state=torch.stack(hs).detach(), prev=torch.stack(prevs).detach())
    exact = (T - 1 - torch.arange(T, dtype=torch.float64))[:, None] * math.log10(s) + w.double().norm(dim=-1).log10()
    return tr, key, exact
