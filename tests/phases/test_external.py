"""`phases fit` on training logs that phases did not write: CSV, Parquet and an MLflow experiment."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from phases import load_sweep
from phases.cli import app


def _train_logs(seed: int = 0) -> pl.DataFrame:
    """Logs of a tiny training loop written here, not by phases: SGD with weight decay on a
    scale-invariant logistic regression (digits 0-4 against 5-9, logits 5 x . w / ||w||)."""
    digits = load_digits()
    X = (digits.data - digits.data.mean(0)) / (digits.data.std(0) + 1e-9)
    y = (digits.target >= 5).astype(float)
    rng = np.random.default_rng(seed)
    steps = np.unique(np.round(np.geomspace(1, 4000, 40))).astype(int)
    rows = []
    for lr in (0.05, 0.1, 0.2, 0.4):
        for wd in (1e-3, 1e-2):
            w = rng.standard_normal(64)
            for step in range(1, steps[-1] + 1):
                r = np.linalg.norm(w)
                u = w / r
                batch = rng.integers(len(y), size=32)
                p = 1 / (1 + np.exp(-5 * X[batch] @ u))
                g_u = 5 * X[batch].T @ (p - y[batch]) / len(batch)
                w = w - lr * ((g_u - (g_u @ u) * u) / r + wd * w)
                if step in steps:
                    u = w / np.linalg.norm(w)
                    p_full = 1 / (1 + np.exp(-5 * X @ u))
                    loss = -np.mean(y * np.log(p_full + 1e-12) + (1 - y) * np.log(1 - p_full + 1e-12))
                    g_full = 5 * X.T @ (p_full - y) / len(y)
                    rows.append({"run": f"lr{lr}-wd{wd}", "lr": lr, "wd": wd, "step": step, "loss": loss,
                                 "weight_norm": float(np.linalg.norm(w)), "grad_norm": float(np.linalg.norm(g_full - (g_full @ u) * u))})
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def logs():
    return _train_logs()


def test_fit_csv_logs(logs, tmp_path):
    path = tmp_path / "logs.csv"
    logs.write_csv(path)
    result = CliRunner().invoke(app, ["fit", str(path), "--out", str(tmp_path / "fitted"), "--dim", "64"])
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    assert "skipped: no entropy column" in output
    sweep = load_sweep(tmp_path / "fitted")
    assert sweep.diagram.height == 8
    assert set(sweep.diagram["regime"].unique()) <= {"converged", "equilibrium", "divergent", "unknown"}
    assert "no entropy column" in " ".join(sweep.fits["skipped_results"])
    # U is the mean logged loss over the detected window, recomputed here from the raw logs.
    row = sweep.diagram.filter((pl.col("lr") == 0.1) & (pl.col("wd") == 0.01)).row(0, named=True)
    run = logs.filter((pl.col("lr") == 0.1) & (pl.col("wd") == 0.01) & (pl.col("step") >= row["window_start"]))
    assert row["U"] == pytest.approx(run["loss"].mean())
    assert row["r"] == pytest.approx(run["weight_norm"].mean())


def test_fit_parquet_matches_csv(logs, tmp_path):
    logs.write_csv(tmp_path / "logs.csv")
    logs.write_parquet(tmp_path / "logs.parquet")
    for name in ("logs.csv", "logs.parquet"):
        assert CliRunner().invoke(app, ["fit", str(tmp_path / name), "--out", str(tmp_path / name.replace(".", "_"))]).exit_code == 0
    from_csv = load_sweep(tmp_path / "logs_csv").diagram.sort("point_id")
    from_parquet = load_sweep(tmp_path / "logs_parquet").diagram.sort("point_id")
    assert from_csv["U"].to_list() == pytest.approx(from_parquet["U"].to_list())


def test_fit_mlflow_experiment(logs, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("external-logs", artifact_location=(tmp_path / "artifacts").as_uri())
    for (run_name,), run in logs.group_by(["run"], maintain_order=True):
        created = client.create_run(experiment, run_name=run_name)
        metrics = [Metric(key, float(value), 0, int(step)) for step, loss, norm in run.select("step", "loss", "weight_norm").iter_rows()
                   for key, value in (("loss", loss), ("weight_norm", norm))]
        client.log_batch(created.info.run_id, metrics=metrics,
                         params=[Param("lr", str(run["lr"][0])), Param("wd", str(run["wd"][0]))])
        client.set_terminated(created.info.run_id)

    result = CliRunner().invoke(app, ["fit", "mlflow://external-logs", "--tracking-uri", uri, "--out", str(tmp_path / "from_mlflow")])
    assert result.exit_code == 0, result.output
    diagram = load_sweep(tmp_path / "from_mlflow").diagram
    assert diagram.height == 8
    expected = logs.group_by("lr", "wd").agg(pl.col("loss").last())
    assert sorted(diagram["lr"].to_list()) == sorted(expected["lr"].to_list())


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.drop("weight_norm"), "missing required columns weight_norm"),
        (lambda f: f.drop("lr", "wd"), "missing required columns lr, wd"),
        (lambda f: f.with_columns(pl.col("loss").cast(pl.String) + "x"), "column 'loss' must be numeric"),
        (lambda f: f.head(0), "no rows"),
        (lambda f: f.with_columns(protocol=pl.lit("adam")), "unknown protocol values ['adam']"),
    ],
    ids=["no norm", "no lr and wd", "text loss", "empty", "bad protocol"],
)
def test_fit_rejects_bad_logs(logs, tmp_path, change, message):
    path = tmp_path / "bad.csv"
    change(logs).write_csv(path)
    result = CliRunner().invoke(app, ["fit", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_fit_unknown_path_rejected(tmp_path):
    result = CliRunner().invoke(app, ["fit", str(tmp_path / "nothing.txt")])
    assert result.exit_code == 2
    assert "not a sweep directory" in " ".join(result.output.split())


def test_fit_mlflow_needs_tracking_uri():
    result = CliRunner().invoke(app, ["fit", "mlflow://anything"])
    assert result.exit_code == 2
    assert "needs --tracking-uri" in " ".join(result.output.split())


def test_fit_logs_without_weight_decay(logs, tmp_path):
    # wd = 0 is legitimate (no weight decay): the fit and its plots must not fail on ln(0).
    path = tmp_path / "no_wd.csv"
    pl.concat([logs, logs.filter(pl.col("wd") == 0.01).with_columns(wd=pl.lit(0.0), run=pl.col("run") + "-nowd")]).write_csv(path)
    result = CliRunner().invoke(app, ["fit", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert load_sweep(tmp_path / "out").diagram.filter(pl.col("wd") == 0.0).height == 4


@pytest.mark.parametrize(
    "content, message",
    [("", "the file is empty"), ("lr,wd,step,loss,weight_norm\n0.1,0.0,1.5,1.0,1.0\n", "column 'step' must contain non-negative whole numbers")],
    ids=["zero bytes", "fractional step"],
)
def test_fit_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    result = CliRunner().invoke(app, ["fit", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())


def test_track_external_fit_once(logs, tmp_path):
    path = tmp_path / "logs.csv"
    logs.write_csv(path)
    assert CliRunner().invoke(app, ["fit", str(path), "--out", str(tmp_path / "fitted")]).exit_code == 0
    uri = f"sqlite:///{tmp_path / 'track.db'}"
    for _ in range(2):
        tracked = CliRunner().invoke(app, ["track", str(tmp_path / "fitted"), "--tracking-uri", uri])
        assert tracked.exit_code == 0, tracked.output
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("phases")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    assert len(runs) == 1 + 8  # one parent, one nested run per logged run
