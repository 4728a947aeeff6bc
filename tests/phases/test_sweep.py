"""The smoke sweep end to end on a real local Ray: files, schema, fits, MLflow, resume."""

from __future__ import annotations

import re

import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from typer.testing import CliRunner

from phases import load_sweep, run_sweep
from phases.cli import app
from phases.schema import POINTS_SCHEMA, SAMPLES_SCHEMA, TRAJECTORY_SCHEMA
from phases.spec import load
from phases.sweep import SweepError, plan_sweep
from tests.conftest import REPO, SMOKE_SPEC

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(ray_local, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    result = run_sweep(SMOKE_SPEC, storage=storage)
    return storage, result


def test_smoke_sweep_writes_every_file(smoke):
    storage, result = smoke
    sweep_dir = storage / "ideal_gas_smoke"
    for name in ("spec.yaml", "sweep.json", "trajectories.parquet", "points.parquet", "diagram.parquet", "fits.json", "failures.json"):
        assert (sweep_dir / name).is_file(), name
    plots = {p.name for p in (sweep_dir / "plots").glob("*.png")}
    assert {"heatmaps_elr.png", "heatmaps_lr.png", "heatmaps_sphere.png", "equation_of_state.png"} <= plots
    assert result.failed_chunks == {}
    assert result.tracking_error is None


def test_parquet_schema_read_back(smoke):
    storage, result = smoke
    sweep_dir = storage / "ideal_gas_smoke"
    n_points = len(plan_sweep(SMOKE_SPEC, storage=storage).points)

    points_arrow = pq.read_table(sweep_dir / "points.parquet")
    assert points_arrow.schema.names == POINTS_SCHEMA.names
    for field in POINTS_SCHEMA:
        assert points_arrow.schema.field(field.name).type == field.type, field.name
    points = pl.read_parquet(sweep_dir / "points.parquet")
    assert points.height == n_points
    assert points["point_id"].n_unique() == n_points

    trajectories = pl.read_parquet(sweep_dir / "trajectories.parquet")
    assert trajectories.columns == TRAJECTORY_SCHEMA.names
    assert trajectories.sort(["point_id", "step"]).equals(trajectories)
    assert set(trajectories["point_id"].unique()) == set(points["point_id"])
    assert trajectories["test_acc"].null_count() == trajectories.height  # no test set: null, not 0

    meta = pq.read_schema(sweep_dir / "diagram.parquet").metadata
    assert meta[b"phases.schema_version"] == b"3"
    assert yaml.safe_load(meta[b"phases.spec"])["name"] == "ideal_gas_smoke"


def test_schema_doc_lists_every_column():
    text = (REPO / "docs" / "schema.md").read_text()
    documented = set(re.findall(r"^\| `([A-Za-z_0-9]+)` \|", text, flags=re.MULTILINE))
    assert set(POINTS_SCHEMA.names) | set(TRAJECTORY_SCHEMA.names) | set(SAMPLES_SCHEMA.names) <= documented


def test_smoke_fits_match_ideal_gas(smoke):
    # Smoke grids are 3 x 5 (elr), 3 x 3 (lr) and 3 x 3 (sphere) with 128 replicas: slopes carry
    # about 0.02 of noise and the continuous theory misses O(T) <= 5% discrete-step corrections.
    _, result = smoke
    fits = result.fits
    maxwell = fits["maxwell"]
    assert maxwell["elr"]["dS_dlog_wd_at_fixed_lr"]["slope"] == pytest.approx(-1.0, abs=0.1)
    assert maxwell["lr"]["dS_dlog_lr_at_fixed_wd"]["slope"] == pytest.approx(1.0, abs=0.1)
    assert maxwell["lr"]["dS_dlog_wd_at_fixed_lr"]["slope"] == pytest.approx(0.0, abs=0.1)
    assert maxwell["sphere"]["dS_dlog_radius_at_fixed_lr"]["slope"] == pytest.approx(2.0, abs=0.1)
    eos = fits["equation_of_state"]
    assert eos["elr"]["continuous_median_abs_rel_error"] < 0.04
    assert eos["lr"]["continuous_median_abs_rel_error"] < 0.03
    assert eos["sphere"]["continuous_median_abs_rel_error"] < 0.05
    # The discrete-step prediction must do better than the continuous one.
    for protocol in ("elr", "lr", "sphere"):
        assert eos[protocol]["discrete_median_abs_rel_error"] < eos[protocol]["continuous_median_abs_rel_error"]


def test_diverging_point_is_data(smoke):
    storage, _ = smoke
    diagram = load_sweep(storage / "ideal_gas_smoke").diagram
    diverging = diagram.filter(pl.col("lr") == 1000.0)
    assert diverging.height == 1
    assert diverging["diverged"][0] is True
    assert diverging["regime"][0] == "divergent"
    assert diverging["U"][0] is None
    others = diagram.filter(pl.col("lr") != 1000.0)
    assert others["diverged"].sum() == 0


def test_mlflow_parent_and_nested_runs(smoke):
    storage, result = smoke
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("phases")
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`phases.sweep_uid` LIKE 'ideal_gas_smoke-%'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_id == result.parent_run_id
    assert parent.info.status == "FINISHED"
    assert "maxwell.elr.dS_dlog_wd_at_fixed_lr.slope" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"diagram.parquet", "fits.json", "spec.yaml", "plots"} <= artifacts

    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000)
    points = load_sweep(storage / "ideal_gas_smoke").points
    assert sorted(c.data.tags["phases.child"] for c in children) == sorted(points["point_id"].to_list())
    child = next(c for c in children if c.data.params.get("protocol") == "elr")
    row = points.filter(pl.col("point_id") == child.data.tags["phases.child"]).row(0, named=True)
    assert float(child.data.params["lr"]) == pytest.approx(row["lr"])
    assert child.data.metrics["U"] == pytest.approx(row["U"])


def test_rerun_runs_nothing_and_logs_no_duplicates(smoke):
    storage, first = smoke
    again = run_sweep(SMOKE_SPEC, storage=storage)
    assert again.chunks_run == 0
    assert again.parent_run_id == first.parent_run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("phases")
    children = client.search_runs([experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{first.parent_run_id}'", max_results=1000)
    assert len(children) == first.n_points


def test_other_spec_into_same_directory_rejected(smoke):
    storage, _ = smoke
    data = yaml.safe_load(SMOKE_SPEC.read_text())
    data["steps"] = 999
    with pytest.raises(SweepError, match="already contains sweep 'ideal_gas_smoke' with other settings"):
        run_sweep(load(data), storage=storage)


def test_resume_requires_existing_directory(tmp_path):
    with pytest.raises(SweepError, match="nothing to resume"):
        run_sweep(SMOKE_SPEC, storage=tmp_path, resume=True)


def test_fit_command_rewrites_analysis(smoke):
    storage, result = smoke
    sweep_dir = storage / "ideal_gas_smoke"
    (sweep_dir / "fits.json").unlink()
    (sweep_dir / "diagram.parquet").unlink()
    fitted = CliRunner().invoke(app, ["fit", str(sweep_dir)])
    assert fitted.exit_code == 0, fitted.output
    again = load_sweep(sweep_dir)
    assert again.fits["maxwell"] == result.fits["maxwell"]
    assert again.diagram.height == result.n_points


def test_fit_command_rejects_non_sweep_directory(tmp_path):
    fitted = CliRunner().invoke(app, ["fit", str(tmp_path)])
    assert fitted.exit_code == 2
    assert "spec.yaml not found" in " ".join(fitted.output.split())


def test_dry_run_starts_nothing(tmp_path):
    import ray

    ray_was_running = ray.is_initialized()
    storage = tmp_path / "runs"
    result = CliRunner().invoke(app, ["sweep", str(SMOKE_SPEC), "--storage", str(storage), "--dry-run"])
    output = " ".join(result.output.split())
    assert result.exit_code == 0, output
    n_points = len(plan_sweep(SMOKE_SPEC, storage=storage).points)
    assert output.count(" point ") == n_points
    assert f"total: {n_points} points" in output
    assert "estimated compute" in output
    assert not storage.exists()
    assert ray.is_initialized() == ray_was_running


def test_export_optuna_studies(smoke, tmp_path):
    import optuna

    storage_dir, result = smoke
    url = f"sqlite:///{tmp_path / 'study.db'}"
    exported = CliRunner().invoke(app, ["export-optuna", str(storage_dir / "ideal_gas_smoke"), "--storage", url])
    assert exported.exit_code == 0, exported.output
    diagram = load_sweep(storage_dir / "ideal_gas_smoke").diagram
    names = {s.study_name for s in optuna.get_all_study_summaries(storage=url)}
    assert names == {f"ideal_gas_smoke/{p}/noise=1.0" for p in ("elr", "lr", "sphere")}
    study = optuna.load_study(study_name="ideal_gas_smoke/elr/noise=1.0", storage=url)
    elr = diagram.filter(pl.col("protocol") == "elr")
    assert len(study.trials) == elr.height
    by_id = {row["point_id"]: row for row in elr.iter_rows(named=True)}
    for trial in study.trials:
        row = by_id[trial.user_attrs["point_id"]]
        assert trial.params == {"lr": pytest.approx(row["lr"]), "wd": pytest.approx(row["wd"])}
        assert trial.value == pytest.approx(row["U"])
    lr_study = optuna.load_study(study_name="ideal_gas_smoke/lr/noise=1.0", storage=url)
    failed = [t for t in lr_study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1  # the diverging point
    again = CliRunner().invoke(app, ["export-optuna", str(storage_dir / "ideal_gas_smoke"), "--storage", url])
    assert again.exit_code == 2
    assert "already exists" in again.output


def test_unreachable_address_fails_fast(tmp_path):
    from tests.conftest import free_port

    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(SweepError, match=f"cannot reach the Ray cluster at {address}"):
        run_sweep(SMOKE_SPEC, storage=tmp_path, address=address)
    assert not (tmp_path / "ideal_gas_smoke").exists()


def test_file_uri_storage(ray_local, tmp_path):
    # Storage given as a pyarrow.fs URI: file:// here, and s3:// and gs:// take the same path through
    # pyarrow. The sweep's files land in the folder it names and read back through the URI.
    spec = load(SMOKE_SPEC).model_copy(update={"name": "uri_storage", "grids": load(SMOKE_SPEC).grids[:1]})
    result = run_sweep(spec, storage=f"file://{tmp_path}")
    assert result.failed_chunks == {}
    sweep_dir = tmp_path / "uri_storage"
    for name in ("points.parquet", "diagram.parquet", "trajectories.parquet", "fits.json"):
        assert (sweep_dir / name).is_file(), name
    assert load_sweep(f"file://{tmp_path}/uri_storage").points.height == len(plan_sweep(spec, storage=tmp_path).points)
