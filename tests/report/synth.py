"""Synthetic but realistic run and study directories for the report tests.

Tables follow closed forms so tests know every plotted value: the median gradient norm at distance
d is ``rate·d`` in log10 (``g^d`` with ``g = 10**rate``), set to -inf (exact zero) once it falls below
the float32 range; singular values are fixed per run; product spectra are ``rank_rate·k``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

F32_LOG10_MIN = math.log10(float(np.finfo(np.float32).smallest_subnormal))

# label -> settings
RUNS = {
    "rnn_tanh": dict(cell="rnn_tanh", keys=["rnn/l0/d0/h"], rate=-0.7, sigma=0.55, clip=None, status="finished"),
    "lstm": dict(cell="lstm", keys=["rnn/l0/d0/h", "rnn/l0/d0/c"], rate=-0.02, sigma=0.9, clip=None,
                 status="finished", gates=("i", "f", "g", "o")),
    "rnn_tanh+clip": dict(cell="rnn_tanh", keys=["rnn/l0/d0/h"], rate=0.03, sigma=1.3, clip=1.0,
                          status="finished"),
    "irnn": dict(cell="irnn", keys=["rnn/l0/d0/h"], rate=0.05, sigma=1.6, clip=None, status="diverged",
                 diverged_at=60),
}
T = 80
STEPS = [0, 10, 20, 40, 80]
HIDDEN = 6


def _write(d: Path, name: str, rows: list[dict] | pd.DataFrame) -> None:
    pd.DataFrame(rows).to_csv(d / f"{name}.csv", index=False)


def make_run(d: Path, label: str, tables: tuple[str, ...] | None = None) -> Path:
    """Write run ``label`` (from RUNS) into directory ``d``; ``tables`` limits which CSVs exist."""
    cfg = RUNS[label]
    d.mkdir(parents=True, exist_ok=True)
    meta = {
        "kind": "run", "schema_version": 1, "name": label.replace("+", "_"), "label": label,
        "status": cfg["status"], "diverged_at": cfg.get("diverged_at"),
        "spec": {"task": "adding", "cell": cfg["cell"]},
        "task": {"name": "adding", "T": T, "chance": 0.167, "class_names": ["relevant", "irrelevant"]},
        "model": {"cell": cfg["cell"], "hidden": HIDDEN, "layers": 1, "n_params": 1234},
        "clip": {"mode": "norm" if cfg["clip"] else "none", "threshold": cfg["clip"]},
        "result": {"eval_metric": 0.9 if label == "lstm" else 0.3, "chance": 0.167, "solved": label == "lstm"},
        "meta": {"versions": {"torch": "2.5.0", "gradflow": "0.1.0"}, "seed": 7, "device": "cpu",
                 "started": "2026-11-22T20:00:00", "finished": "2026-11-22T20:01:00"},
    }
    (d / "run.json").write_text(json.dumps(meta))
    want = set(tables) if tables is not None else None

    def put(name, rows):
        if want is None or name in want:
            _write(d, name, rows)

    rate, sigma = cfg["rate"], cfg["sigma"]
    grad, dist, dec, spec, ssum, prod, lyap, summ, clipt = [], [], [], [], [], [], [], [], []
    for key in cfg["keys"]:
        krate = rate if key.endswith("/h") else rate / 2
        for step in STEPS:
            for t in range(T):
                dd = T - 1 - t
                v = krate * dd + 0.01 * step / 10
                fz = 1.0 if v < F32_LOG10_MIN else (0.25 if v < F32_LOG10_MIN + 3 else 0.0)
                q50 = -math.inf if fz >= 0.5 else v
                nonfin = 1.0 if (cfg["status"] == "diverged" and step == 80 and t < 5) else 0.0
                if nonfin:
                    q50 = math.nan
                grad.append(dict(run=label, step=step, key=key, module="rnn", layer=0, direction=0,
                                 state=key[-1], t=t, distance=dd, n=8, q05=q50 - 0.5, q25=q50 - 0.2, q50=q50,
                                 q75=q50 + 0.2, q95=q50 + 0.5, mean_log10=q50, frac_zero=fz,
                                 frac_nonfinite=nonfin))
        for dd in range(T):
            v = krate * dd
            fz = 1.0 if v < F32_LOG10_MIN else (0.25 if v < F32_LOG10_MIN + 3 else 0.0)
            q50 = -math.inf if fz >= 0.5 else v
            dist.append(dict(run=label, key=key, distance=dd, n=40, q05=q50 - 0.6, q25=q50 - 0.25, q50=q50,
                             q75=q50 + 0.25, q95=q50 + 0.6, frac_zero=fz))
        horizon = 3 / -krate if krate < 0 else math.nan
        censored = not (krate < 0 and horizon <= T - 1)
        dec.append(dict(run=label, key=key, decay_rate=krate, ci_low=krate - 0.01, ci_high=krate + 0.01,
                        horizon=math.nan if censored else horizon, horizon_censored=censored, fraction=1e-3,
                        underflow=bool(rate * (T - 1) < F32_LOG10_MIN)))
        rng = np.random.default_rng(len(label) + len(key))
        ksig = sigma if key.endswith("/h") else sigma * 0.9
        for t in range(T):
            for b in range(2):
                for r in range(HIDDEN):
                    spec.append(dict(run=label, key=key, t=t, b=b, rank=r,
                                     sigma=ksig * 0.8 ** r * math.exp(0.1 * rng.standard_normal())))
            ssum.append(dict(run=label, key=key, t=t, sigma_max=sigma * (1 + 0.002 * t), sigma_min=sigma * 0.8 ** 5,
                             frac_gt1=float(sigma > 1) / HIDDEN, spectral_radius=sigma * 0.9))
        for k in range(1, T):
            for r in range(HIDDEN):
                prod.append(dict(run=label, key=key, distance=k, rank=r,
                                 log10_sigma=k * (math.log10(sigma) + r * math.log10(0.8))))
        for r in range(HIDDEN):
            lyap.append(dict(run=label, key=key, rank=r, exponent=math.log(sigma) + r * math.log(0.8), stderr=0.01))
        verdict = ("vanishing" if krate < -0.05 else "exploding" if krate > 0 else "healthy")
        summ.append(dict(run=label, key=key, verdict=verdict,
                         detail=f"gradient changes {10 ** krate:.3g}× per step"))
        for when in ("before", "after"):
            for t in range(T):
                v = krate * (T - 1 - t) + 1.0
                if when == "after" and cfg["clip"]:
                    v -= 1.0
                clipt.append(dict(run=label, step=40, key=key, t=t, when=when, log10_norm=v))
    put("gradnorms", grad)
    put("distance", dist)
    put("decay", dec)
    put("spectra", spec)
    put("spectra_summary", ssum)
    put("products", prod)
    put("lyapunov", lyap)
    put("summary", summ)
    put("clip_timesteps", clipt)
    metrics = []
    for step in range(100):
        loss = 2.0 * math.exp(-step / 30) + 0.05
        gn = 10 ** (rate * 30) * (1 + step / 50)
        if cfg["status"] == "diverged" and step >= cfg["diverged_at"]:
            loss, gn = math.nan, math.inf
        after = min(gn, cfg["clip"]) if cfg["clip"] else gn
        metrics.append(dict(run=label, step=step, loss=loss, metric=0.5, grad_norm_before=gn,
                            grad_norm_after=after, clipped=bool(cfg["clip"] and gn > cfg["clip"]), cosine=0.9))
    put("metrics", metrics)
    if "gates" in cfg:
        rows = []
        for gate in cfg["gates"]:
            for cls in ("0", "1"):  # indices into task.class_names, as the analysis writes them
                for t in range(T):
                    m = 0.9 if (gate == "f" and cls == "1") else 0.5 + 0.004 * t
                    rows.append(dict(run=label, key="rnn/l0/d0/h", gate=gate, t=t, token_class=cls, mean=m,
                                     q25=m - 0.1, q50=m, q75=m + 0.05))
        put("gates", rows)
    return d


def make_study(root: Path, labels=tuple(RUNS), name="cells", tables=None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rels = []
    for lab in labels:
        rel = f"runs/{lab.replace('+', '_')}"
        make_run(root / rel, lab, tables)
        rels.append(rel)
    (root / "study.json").write_text(json.dumps({
        "kind": "study", "schema_version": 1, "name": name,
        "claim": "LSTM and GRU keep gradients over longer distances than a tanh RNN",
        "spec": {"task": "adding"}, "runs": rels}))
    return root
