"""A diverging step is located (step, module, layer, direction, state, t, b) in run.json and its
recording is kept, even when the schedule did not select that step."""

from __future__ import annotations

import json

import pandas as pd
import torch

from gradflow.training import Schedule, train_task


def test_divergence_is_located_and_its_recording_kept(tmp_path):
    torch.set_num_threads(1)
    r = train_task("checksum", "rnn_relu", task_options={"T": 30},
                   model_options={"init": "gaussian", "gain": 2.0, "hidden": 32}, steps=20, optimizer="sgd",
                   lr=0.01, schedule=Schedule(steps=(100,)), run_dir=tmp_path / "r", progress=False)
    doc = json.loads((tmp_path / "r" / "run.json").read_text())
    assert doc["status"] == "diverged" and r.diverged_at == doc["diverged_at"]
    fault = doc["faults"]
    assert fault["step"] == doc["diverged_at"]
    assert (fault["module"], fault["layer"], fault["direction"], fault["state"]) == ("rnn", 0, 0, "h")
    # the NaN enters at the loss, i.e. the last timestep, and the backward pass reaches it first
    assert fault["t"] == 29
    g = pd.read_csv(tmp_path / "r" / "gradnorms.csv")
    assert set(g["step"]) == {doc["diverged_at"]}
    assert (g["frac_nonfinite"] > 0).any()
