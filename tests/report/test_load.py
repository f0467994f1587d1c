"""load_runs: run and study directories -> RunSet; every bad input is a one-line GradflowError."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gradflow.errors import GradflowError
from gradflow.report import load_runs
from gradflow.tables import TABLES

from .synth import RUNS, make_run


def test_study_loads_all_runs_in_order_with_tables_concatenated(study_dir):
    rs = load_runs([study_dir])
    assert rs.labels == tuple(RUNS)
    assert [s.name for s in rs.studies] == ["cells"]
    assert rs.studies[0].runs == tuple(RUNS)
    assert rs.studies[0].claim.startswith("LSTM and GRU")
    dist = rs.table("distance")
    assert list(dict.fromkeys(dist["run"])) == list(RUNS)
    # the concatenation is exactly the per-run files stacked
    per_run = [pd.read_csv(r.path / "distance.csv") for r in rs.runs]
    assert len(dist) == sum(len(p) for p in per_run)
    np.testing.assert_array_equal(dist["q50"].to_numpy(), pd.concat(per_run)["q50"].to_numpy())
    # -inf (float32 underflow) survives the round trip
    assert np.isneginf(dist["q50"]).any()
    assert rs.table("gates")["token_class"].dtype != float
    assert rs.table("decay")["horizon_censored"].dtype == bool
    r = rs.run("irnn")
    assert r.status == "diverged" and r.diverged_at == 60 and r.flagged
    assert not rs.run("lstm").flagged
    assert rs.run("rnn_tanh+clip").clip_text == "clip norm ≤ 1"
    assert rs.run("lstm").versions == {"torch": "2.5.0", "gradflow": "0.1.0"}
    assert rs.run("lstm").result["solved"] is True


def test_versions_from_flat_meta(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=())
    meta = json.loads((d / "run.json").read_text())
    meta["meta"] = {"torch": "2.13.0", "gradflow": "0.1.0", "seed": 0}
    del meta["result"]
    (d / "run.json").write_text(json.dumps(meta))
    r = load_runs(d).runs[0]
    assert r.versions == {"gradflow": "0.1.0", "torch": "2.13.0"}
    assert dict(r.result) == {}


def test_absent_table_is_empty_with_schema_columns(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=("metrics",))
    rs = load_runs(d)
    assert rs.has("metrics") and not rs.has("gates")
    assert "gates" not in rs.tables
    assert list(rs.table("gates").columns) == list(TABLES["gates"])
    assert rs.runs[0].tables == ("metrics",)


def test_run_reached_twice_is_loaded_once(study_dir):
    rs = load_runs([study_dir, study_dir / "runs" / "lstm"])
    assert rs.labels == tuple(RUNS)


def test_clashing_labels_from_two_studies_are_kept_apart(tmp_path):
    from .synth import make_study

    a = make_study(tmp_path / "a", labels=("lstm",), name="a")
    b = make_study(tmp_path / "b", labels=("lstm",), name="b")
    rs = load_runs([a, b])
    assert len(set(rs.labels)) == 2
    assert set(rs.table("metrics")["run"]) == set(rs.labels)
    assert rs.studies[0].runs != rs.studies[1].runs


def _one_line_error(paths, *needles):
    with pytest.raises(GradflowError) as e:
        load_runs(paths)
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, msg
    return msg


def test_missing_directory(tmp_path):
    _one_line_error([tmp_path / "nope"], tmp_path / "nope", "no such directory")


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hi")
    _one_line_error([f], f, "not a directory")


def test_directory_without_run_or_study_json(tmp_path):
    _one_line_error([tmp_path], tmp_path, "neither run.json nor study.json")


def test_no_paths():
    _one_line_error([], "no run or study directory")


def test_wrong_kind(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=())
    meta = json.loads((d / "run.json").read_text())
    meta["kind"] = "trace"
    (d / "run.json").write_text(json.dumps(meta))
    _one_line_error([d], d / "run.json", "kind")


def test_unsupported_schema_version(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=())
    meta = json.loads((d / "run.json").read_text())
    meta["schema_version"] = 99
    (d / "run.json").write_text(json.dumps(meta))
    _one_line_error([d], d / "run.json", "schema_version 99")


def test_invalid_json(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=())
    (d / "run.json").write_text("{not json")
    _one_line_error([d], d / "run.json", "not valid JSON")


def test_bad_status(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=())
    meta = json.loads((d / "run.json").read_text())
    meta["status"] = "done"
    (d / "run.json").write_text(json.dumps(meta))
    _one_line_error([d], "status", "'done'")


def test_study_listing_missing_run(tmp_path, fresh_study):
    meta = json.loads((fresh_study / "study.json").read_text())
    meta["runs"].append("runs/ghost")
    (fresh_study / "study.json").write_text(json.dumps(meta))
    _one_line_error([fresh_study], "study.json", "runs/ghost")


def test_study_with_wrong_kind(fresh_study):
    meta = json.loads((fresh_study / "study.json").read_text())
    meta["kind"] = "run"
    (fresh_study / "study.json").write_text(json.dumps(meta))
    _one_line_error([fresh_study], "study.json", "not a gradflow study")


def test_malformed_csv(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=("distance",))
    text = (d / "distance.csv").read_text().splitlines()
    text.insert(3, "lstm,rnn/l0/d0/h,1,2,3,4,5,6,7,8,9,10,11,12,13")
    (d / "distance.csv").write_text("\n".join(text))
    _one_line_error([d], d / "distance.csv", "malformed CSV")


def test_empty_csv(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=("decay",))
    (d / "decay.csv").write_text("")
    _one_line_error([d], d / "decay.csv", "empty file")


def test_missing_column(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=("decay",))
    pd.read_csv(d / "decay.csv").drop(columns=["horizon"]).to_csv(d / "decay.csv", index=False)
    _one_line_error([d], d / "decay.csv", "horizon")


def test_non_numeric_value(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=("distance",))
    df = pd.read_csv(d / "distance.csv")
    df["q50"] = df["q50"].astype(object)
    df.loc[4, "q50"] = "big"
    df.to_csv(d / "distance.csv", index=False)
    _one_line_error([d], d / "distance.csv", "'q50'", "row 6", "'big'")


def test_bad_flag_value(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=("metrics",))
    df = pd.read_csv(d / "metrics.csv")
    df["clipped"] = df["clipped"].astype(object)
    df.loc[0, "clipped"] = "maybe"
    df.to_csv(d / "metrics.csv", index=False)
    _one_line_error([d], d / "metrics.csv", "'clipped'", "maybe")


def test_run_column_must_match_label(tmp_path):
    d = make_run(tmp_path / "r", "lstm", tables=("decay",))
    df = pd.read_csv(d / "decay.csv")
    df["run"] = "gru"
    df.to_csv(d / "decay.csv", index=False)
    _one_line_error([d], d / "decay.csv", "'gru'", "'lstm'")
