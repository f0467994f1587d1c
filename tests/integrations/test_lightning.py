"""GradflowCallback: trains a few Lightning steps and reads back the run directory it wrote."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch
from torch import nn

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402

import gradflow  # noqa: E402
from gradflow.integrations.lightning import GradflowCallback  # noqa: E402
from gradflow.training import Schedule, gradnorm_rows  # noqa: E402

T, B, F, H = 7, 4, 3, 5


class Seq(pl.LightningModule):
    def __init__(self, fail_at: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.LSTM(F, H, num_layers=2)
        self.head = nn.Linear(H, 1)
        self.fail_at = fail_at

    def forward(self, x):  # x [B, T, F]
        return self.head(self.rnn(x.transpose(0, 1))[0][-1]).squeeze(-1)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        return ((self(x) - y) ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6 * B, T, F, generator=g) * 3
    y = torch.randn(6 * B, generator=g) * 10
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=B, shuffle=False)


def _trainer(cb, steps=6):
    return pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                      callbacks=[cb])


def test_callback_writes_run_directory(tmp_path):
    model = Seq()
    initial = copy.deepcopy(model)
    cb = GradflowCallback(tmp_path / "run", schedule=Schedule(every=2), keep="norms")
    _trainer(cb).fit(model, _loader())
    run = tmp_path / "run"
    doc = json.loads((run / "run.json").read_text())
    assert (doc["kind"], doc["schema_version"], doc["status"]) == ("run", 1, "finished")
    assert doc["result"]["steps_done"] == 6 and doc["clip"] == {"mode": "norm", "threshold": 1.0}
    assert "forward" not in model.rnn.__dict__  # recording left nothing behind

    gn = pd.read_csv(run / "gradnorms.csv")
    assert sorted(gn["step"].unique()) == [0, 2, 4]
    assert set(gn["key"]) == {"rnn/l0/d0/h", "rnn/l0/d0/c", "rnn/l1/d0/h", "rnn/l1/d0/c"}
    assert (gn["n"] == B).all() and len(gn) == 3 * 4 * T
    # step 0 saw the initial weights and the first batch: the same rows as recording directly
    x, y = next(iter(_loader()))
    with gradflow.record(initial) as rec:
        ((initial(x) - y) ** 2).sum().backward()
    ref = pd.DataFrame(gradnorm_rows(rec.trace, "run", 0))
    got = gn[gn["step"] == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(got[ref.columns].astype(ref.dtypes.to_dict()), ref, atol=1e-6, rtol=0)

    m = pd.read_csv(run / "metrics.csv")
    assert list(m["step"]) == list(range(6)) and list(m["recorded"]) == [True, False] * 3
    assert m["clipped"].any() and (m["grad_norm_after"] <= 1.0 + 1e-6).all()
    assert (m.loc[m["clipped"], "grad_norm_before"] > 1.0).all()
    assert ((m["cosine"] - 1).abs() < 1e-6).all()  # clipping by norm keeps the direction
    ct = pd.read_csv(run / "clip_timesteps.csv")
    assert sorted(ct["step"].unique()) == [0, 2, 4] and set(ct["when"]) == {"before", "after"}
    assert not list(run.glob(".*.tmp"))


def test_callback_exits_recording_on_exception(tmp_path):
    model = Seq(fail_at=2)  # raises inside a recorded step
    cb = GradflowCallback(tmp_path / "run", schedule=Schedule(every=2))
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(cb).fit(model, _loader())
    assert "forward" not in model.rnn.__dict__ and cb._rec is None
    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert doc["status"] == "failed" and "boom" in doc["error"]
    assert sorted(pd.read_csv(tmp_path / "run" / "gradnorms.csv")["step"].unique()) == [0]
    assert len(pd.read_csv(tmp_path / "run" / "metrics.csv")) == 2


def test_callback_analyses_the_last_recorded_step(tmp_path):
    """analysis=: the tables of the last recorded trace, equal to analyze_trace of that same trace."""
    from gradflow.analysis import AnalysisConfig, analyze_trace

    model = Seq()
    cfg = AnalysisConfig(warmup=1, max_rank=4)
    got = {}
    cb = GradflowCallback(tmp_path / "run", schedule=Schedule(every=2), keep="states", analysis=cfg)
    orig = cb._analyse
    cb._analyse = lambda tr: (got.setdefault("trace", tr), orig(tr))
    _trainer(cb).fit(model, _loader())
    run = tmp_path / "run"
    doc = json.loads((run / "run.json").read_text())
    assert doc["analysis"]["step"] == 4 and doc["analysis"]["config"]["max_rank"] == 4
    assert [p["unit"] for p in doc["analysis"]["plans"]] == ["rnn/l0/d0/h", "rnn/l1/d0/h"]
    ref = analyze_trace(got["trace"], cfg.replace(per_step_loss=False))
    for name in ("distance", "spectra", "lyapunov", "summary"):
        df = pd.read_csv(run / f"{name}.csv")
        assert (df["run"] == "run").all() and len(df) == len(ref[name])
    sp = pd.read_csv(run / "spectra.csv")
    assert sp["sigma"].to_numpy() == pytest.approx(ref["spectra"]["sigma"].to_numpy(), rel=1e-6)
    with pytest.raises(gradflow.GradflowError, match=r"needs keep='states'"):
        GradflowCallback(tmp_path / "x", keep="norms", analysis=cfg)
    with pytest.raises(gradflow.SpecError, match=r"GradflowCallback\(analysis=...\) k must be an integer >= 1"):
        GradflowCallback(tmp_path / "x", keep="states", analysis={"k": 0})
