"""TensorBoard writer: trains a few steps, logs the run and a trace, and reads the event files back
with tensorboard's EventAccumulator."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

import gradflow  # noqa: E402
from gradflow import _io  # noqa: E402
from gradflow.analysis.frames import spectra_tables  # noqa: E402
from gradflow.integrations.tensorboard import heatmap_image, log_run, log_trace  # noqa: E402
from gradflow.training import Clip, Schedule, TrainConfig, train_task  # noqa: E402

T = 8


def _read(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tb") / "run"
    cfg = TrainConfig(steps=6, batch=4, lr=0.05, schedule=Schedule(every=2), clip=Clip("norm", 0.05), eval_batch=4,
                      flush_every=2)
    r = train_task("checksum", "lstm", task_options={"T": T}, model_options={"hidden": 6}, config=cfg, run_dir=d,
                   progress=False)
    key = r.trace.keys()[0]
    _, summary = spectra_tables(r.trace, key)
    summary.insert(0, "run", r.label)
    _io.write_csv(d / "spectra_summary.csv", summary)
    return d


def test_log_run_reads_back(run_dir, tmp_path):
    tags = log_run(tmp_path / "events", run_dir)  # a log directory: log_run opens and closes the writer
    acc = _read(tmp_path / "events")
    scalars = set(acc.Tags()["scalars"])
    assert set(t for t in tags if t in scalars) <= scalars

    m = pd.read_csv(run_dir / "metrics.csv")
    loss = acc.Scalars("gradflow/train/loss")
    assert [e.step for e in loss] == list(m["step"])
    np.testing.assert_allclose([e.value for e in loss], m["loss"], rtol=1e-6)
    before = [e.value for e in acc.Scalars("gradflow/train/grad_norm_before")]
    np.testing.assert_allclose(before, m["grad_norm_before"], rtol=1e-6)
    clipped = [e.value for e in acc.Scalars("gradflow/train/clipped")]
    assert clipped == [float(c) for c in m["clipped"]] and sum(clipped) > 0
    frac = acc.Scalars("gradflow/clipping/frac_clipped")
    assert frac[-1].value == pytest.approx(m["clipped"].mean())

    g = pd.read_csv(run_dir / "gradnorms.csv")
    key = g["key"].iloc[0]
    ev = acc.Scalars(f"gradflow/{key}/log10_norm/t0003")
    want = g[(g["key"] == key) & (g["t"] == 3)].sort_values("step")
    assert [e.step for e in ev] == [0, 2, 4] == list(want["step"])
    np.testing.assert_allclose([e.value for e in ev], want["q50"], rtol=1e-6)

    imgs = acc.Images("gradflow/log10_norm_heatmap")
    n_keys = g["key"].nunique()
    assert [e.step for e in imgs] == [0, 2, 4] and all(e.height == 8 * n_keys for e in imgs)

    s = pd.read_csv(run_dir / "spectra_summary.csv")
    sig = acc.Scalars(f"gradflow/spectra/{s['key'].iloc[0]}/sigma_max")
    assert [e.step for e in sig] == list(range(T))
    np.testing.assert_allclose([e.value for e in sig], s["sigma_max"], rtol=1e-6)

    assert "gradflow/final/log10_norm_heatmap" in acc.Tags()["images"]
    assert any(t.startswith("gradflow/final/") for t in acc.Tags()["histograms"])


def test_log_trace_reads_back(tmp_path):
    torch.manual_seed(0)
    m = torch.nn.GRU(2, 4, num_layers=2)
    with gradflow.record(m) as rec:
        out, _ = m(torch.randn(T, 3, 2))
        w = torch.ones(T, 3, 1)
        w[5, 1] = math.inf  # an Inf at t=5, b=1 of the top layer (red in the heatmap)
        (w * out).sum().backward()
    w = SummaryWriter(log_dir=str(tmp_path))
    log_trace(w, rec.trace, step=11)
    w.close()
    acc = _read(tmp_path)
    key = "root/l1/d0/h"
    tr = rec.trace
    med = np.nanmedian(np.where(np.isfinite(tr.norm("<root>/l1/d0/h").numpy()),
                                np.log10(tr.norm("<root>/l1/d0/h").numpy()), np.nan), axis=1)
    got = [acc.Scalars(f"gradflow/{key}/log10_norm/t{t:04d}")[0] for t in range(T)]
    assert all(e.step == 11 for e in got)
    np.testing.assert_allclose([e.value for e in got], med, rtol=1e-6)
    h = acc.Histograms(f"gradflow/{key}/log10_norm")[0].histogram_value
    n = tr.norm("<root>/l1/d0/h").numpy()
    assert h.num == np.isfinite(n).sum()
    assert acc.Scalars("gradflow/nonfinite")[0].value == sum(
        int((~torch.isfinite(tr.norm(k))).sum()) for k in tr.keys())
    assert len(acc.Images("gradflow/log10_norm_heatmap")) == 1


def test_heatmap_colours():
    v = np.array([[0.0, 1.0, -np.inf, np.nan], [2.0, 2.0, 2.0, 2.0]])
    bad = np.zeros_like(v, dtype=bool)
    bad[1, 3] = True
    img = heatmap_image(v, bad, cell_height=2, width=8)
    assert img.shape == (4, 8, 3) and img.dtype == np.uint8
    assert tuple(img[0, 4]) == (0, 0, 0) and tuple(img[0, 6]) == (200, 200, 200)  # zero, missing
    assert tuple(img[2, 6]) == (255, 0, 0)  # NaN/Inf
    assert tuple(img[0, 0]) == (68, 1, 84) and tuple(img[2, 0]) == (253, 231, 37)  # min, max of the ramp
