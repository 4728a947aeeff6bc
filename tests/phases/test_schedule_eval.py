"""`phases recommend` and `phases evaluate-schedule` on a sweep directory, with a real SQLite MLflow store."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from phases.cli import app
from phases.schedule_eval import range_test_pick
from phases.storage import SweepStore

SPEC = {
    "name": "tiny_mlp", "kind": "scale_invariant", "steps": 300,
    "params": {"model": "mlp", "dataset": "digits", "width": 8, "eval_batch": 512},
}


def _sweep_dir(tmp_path, regimes: list[str]):
    """A sweep directory whose diagram has one weight-decay line of the tiny MLP on digits."""
    lrs = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    frame = pl.DataFrame({
        "point_id": [f"p{i}" for i in range(len(lrs))], "protocol": ["lr"] * len(lrs), "lr": lrs, "wd": [1e-2] * len(lrs),
        "noise": [0.0] * len(lrs), "batch_size": [32] * len(lrs), "width": [8] * len(lrs), "regime": regimes,
        "T": [1e-4 * lr**0.5 for lr in lrs], "U": [0.05 + 500 * 1e-4 * lr**0.5 for lr in lrs],
        "test_acc": [0.8, 0.85, 0.9, 0.88, 0.7, 0.1], "stationary_from": [50.0] * len(lrs), "window_start": [150.0] * len(lrs),
        "diverged": [False] * len(lrs),
    })
    store = SweepStore(tmp_path / "runs", "tiny_mlp")
    store.write_json("sweep.json", {"name": "tiny_mlp", "uid": "tiny-uid", "version": "test"})
    store.write_table("diagram.parquet", frame.to_arrow(), {"phases.spec": json.dumps(SPEC)})
    return tmp_path / "runs" / "tiny_mlp"


def test_recommend_prints_json(tmp_path):
    sweep = _sweep_dir(tmp_path, ["converged", "equilibrium", "equilibrium", "equilibrium", "equilibrium", "divergent"])
    result = CliRunner().invoke(app, ["recommend", str(sweep), "--format", "json", "--out", str(tmp_path / "rec.yaml")])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["steps"] == 300
    assert data["stages"][0]["lr"] == 0.1
    assert not data["degraded"]
    assert (tmp_path / "rec.yaml").is_file()


def test_recommend_rejects_missing_columns_and_formats(tmp_path):
    sweep = _sweep_dir(tmp_path, ["equilibrium"] * 6)
    frame = pl.read_parquet(sweep / "diagram.parquet").drop("T")
    frame.write_parquet(sweep / "diagram.parquet")
    result = CliRunner().invoke(app, ["recommend", str(sweep), "--steps", "100"])
    assert result.exit_code == 2
    assert "lacks the column(s) T" in result.output
    result = CliRunner().invoke(app, ["recommend", str(sweep), "--format", "csv"])
    assert result.exit_code == 2
    assert "--format 'csv' is not one of table, json, yaml" in result.output


def test_evaluate_schedule_writes_table_and_tracks(tmp_path):
    sweep = _sweep_dir(tmp_path, ["converged", "equilibrium", "equilibrium", "equilibrium", "equilibrium", "divergent"])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = CliRunner().invoke(app, ["evaluate-schedule", str(sweep), "--seeds", "2", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((sweep / "schedule_evaluation.json").read_text())
    methods = {row["method"]: row for row in evaluation["methods"]}
    assert set(methods) == {"recommended", "constant", "cosine", "step", "range_test_cosine"}
    for row in methods.values():
        assert len(row["per_seed"]["test_acc"]) == 2
        assert all(0.0 <= a <= 1.0 for a in row["per_seed"]["test_acc"])
        assert row["test_acc_mean"] == pytest.approx(np.mean(row["per_seed"]["test_acc"]), rel=1e-12)
    # 300 steps of SGD on digits beat chance (0.1) by far for the grid's best constant lr.
    assert methods["constant"]["test_acc_mean"] > 0.5
    assert evaluation["best_grid_point"] == {"lr": 0.1, "wd": 0.01, "by": "test_acc"}
    assert "| recommended |" in (sweep / "schedule_evaluation.md").read_text()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("phases")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`phases.child` = 'schedule-evaluation'")
    assert len(runs) == 1
    assert runs[0].data.metrics["recommended.test_acc_mean"] == pytest.approx(methods["recommended"]["test_acc_mean"])
    parent = client.get_run(runs[0].data.tags["mlflow.parentRunId"])
    assert parent.data.tags["phases.sweep_uid"] == "tiny-uid"


def test_range_test_picks_a_tenth_of_the_minimum():
    # A loss with its minimum at lr 0.3 on an exponential lr ramp: the pick is near 0.03, late by
    # at most the moving average's lag (about 1/(1 - beta) = 50 of 1000 steps, a factor 1.8 here).
    lrs = 1e-4 * (1e5) ** (np.arange(1000) / 999)
    losses = (np.log(lrs) - np.log(0.3)) ** 2
    assert 0.03 <= range_test_pick(losses, lrs) <= 0.03 * 1.8
    losses[600:] = np.inf  # diverged steps count as huge losses, not as minima
    assert range_test_pick(losses, lrs) < 0.03
