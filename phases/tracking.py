"""MLflow tracking of finished sweeps; only the driver calls this module.

One parent run per sweep (found again by its `phases.sweep_uid` tag, so logging twice creates no
duplicates), one nested run per point, or per chunk above `child_limit` points, and the sweep's
files as artifacts of the parent. Runs are created with `MlflowClient` and written with
`log_batch`: through a tracking server the fluent API costs a round trip per call.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from phases.storage import SweepStore

logger = logging.getLogger(__name__)

EXPERIMENT = "phases"
DEFAULT_CHILD_LIMIT = 1000
ARTIFACT_FILES = (
    "spec.yaml", "sweep.json", "fits.json", "failures.json", "points.parquet", "diagram.parquet", "trajectories.parquet",
    "samples.parquet",
)
CHILD_METRICS = (
    "U", "U_std", "U_sem", "r", "r2", "T", "p", "V", "S", "S_direction", "elr_mean", "lambda_eff",
    "eos_ratio", "eos_ratio_discrete", "grad_norm2", "sigma2",
    # remask: the head's evaluation and the sample quality at the diagram's step count
    "head_bce", "head_auroc", "head_f1", "head_base_rate", "head_train_loss", "validity", "reference_perplexity",
    "distinct_1", "distinct_2", "distinct_3", "unigram_entropy", "forward_passes",
)
CHILD_PARAMS = ("protocol", "lr", "wd", "noise", "radius", "batch_size", "seed")
# MLflow's log_batch accepts at most 1000 metrics and 100 params per call.
MAX_BATCH_METRICS = 1000


class TrackingError(RuntimeError):
    """MLflow could not be reached or rejected a write; the sweep's files are unaffected."""


@dataclass
class TrackingReport:
    parent_run_id: str
    experiment_id: str
    children_created: int
    children_existing: int


def default_tracking_uri(store: SweepStore) -> str | None:
    """MLFLOW_TRACKING_URI if set, else a SQLite file next to the sweep for local storage."""
    import os

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if not store.is_local:
        return None
    return f"sqlite:///{store.local_path().parent / 'mlflow.db'}"


def check_tracking(tracking_uri: str) -> str | None:
    """Return None if the tracking store responds, else the error as text."""
    try:
        _client(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"; the caller reports it
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def log_sweep(store: SweepStore, tracking_uri: str, *, experiment: str = EXPERIMENT, child_limit: int = DEFAULT_CHILD_LIMIT) -> TrackingReport:
    """Log a finished sweep directory to MLflow; safe to call again (missing runs are added).

    Raises TrackingError on any MLflow or network failure.
    """
    try:
        return _log_sweep(store, tracking_uri, experiment, child_limit)
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; all mean "not logged"
        raise TrackingError(f"{type(exc).__name__}: {exc}".splitlines()[0][:500]) from exc


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri)


def _log_sweep(store: SweepStore, tracking_uri: str, experiment: str, child_limit: int) -> TrackingReport:
    from mlflow.entities import Metric, Param, RunTag

    client = _client(tracking_uri)
    info = store.read_json("sweep.json")
    experiment_id = _experiment_id(client, experiment, store, tracking_uri)
    parent_id = _parent_run(client, experiment_id, info, store)

    points = pl.from_arrow(store.read_table("diagram.parquet"))
    existing = _existing_children(client, experiment_id, parent_id)
    spec = yaml.safe_load(store.read_text("spec.yaml"))
    # External logs have no chunks, so they always get one nested run per point.
    by_chunk = points.height > child_limit and spec.get("kind") != "external"
    children = _chunk_children(store, points) if by_chunk else _point_children(points)
    created = 0
    now = int(time.time() * 1000)
    for key, params, metrics in children:
        if key in existing:
            continue
        run = client.create_run(
            experiment_id,
            run_name=key,
            tags={"mlflow.parentRunId": parent_id, "phases.child": key, "phases.child_level": "chunk" if by_chunk else "point"},
        )
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        client.set_terminated(run.info.run_id, "FINISHED")
        created += 1

    fits = store.read_json("fits.json")
    parent_metrics = [Metric(k, v, now, 0) for k, v in _flatten_fits(fits).items()]
    for start in range(0, len(parent_metrics), MAX_BATCH_METRICS):
        client.log_batch(parent_id, metrics=parent_metrics[start : start + MAX_BATCH_METRICS])
    client.log_batch(parent_id, params=[Param(k, str(v)) for k, v in _spec_params(spec, points.height).items()],
                     tags=[RunTag("phases.tracking", "complete")])
    _log_artifacts(client, parent_id, store)
    client.set_terminated(parent_id, "FINISHED")
    return TrackingReport(parent_id, experiment_id, created, len(existing))


def log_schedule_evaluation(store: SweepStore, tracking_uri: str, evaluation: dict[str, Any], *, experiment: str = EXPERIMENT) -> str:
    """Log a schedule evaluation as a run nested under the sweep's parent run; return its run id.

    Metrics are `<method>.<metric>_mean` and `_std`; the evaluation JSON and table are artifacts.
    Raises TrackingError on any MLflow or network failure.
    """
    from mlflow.entities import Metric, Param

    try:
        client = _client(tracking_uri)
        experiment_id = _experiment_id(client, experiment, store, tracking_uri)
        parent_id = _parent_run(client, experiment_id, store.read_json("sweep.json"), store)
        run = client.create_run(experiment_id, run_name="schedule-evaluation",
                                tags={"mlflow.parentRunId": parent_id, "phases.child": "schedule-evaluation"})
        now = int(time.time() * 1000)
        metrics = [
            Metric(f"{row['method']}.{key}", float(row[key]), now, 0)
            for row in evaluation["methods"]
            for key in row
            if key.endswith(("_mean", "_std")) and _finite(row[key])
        ]
        params = [Param("steps", str(evaluation["steps"])), Param("seeds", str(evaluation["seeds"])),
                  *[Param(f"setting.{k}", str(v)) for k, v in evaluation["setting"].items()]]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        with tempfile.TemporaryDirectory() as folder:
            for name in ("schedule_evaluation.json", "schedule_evaluation.md"):
                if store.exists(name):
                    target = Path(folder) / name
                    target.write_text(store.read_text(name))
                    client.log_artifact(run.info.run_id, str(target))
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types; all mean "not logged"
        raise TrackingError(f"{type(exc).__name__}: {exc}".splitlines()[0][:500]) from exc


def _experiment_id(client, name: str, store: SweepStore, tracking_uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:") and store.is_local:
        location = (store.local_path().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _parent_run(client, experiment_id: str, info: dict[str, Any], store: SweepStore) -> str:
    uid = info["uid"]
    runs = client.search_runs([experiment_id], filter_string=f"tags.`phases.sweep_uid` = '{uid}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(
        experiment_id,
        run_name=info["name"],
        tags={"phases.sweep_uid": uid, "phases.sweep_dir": store.uri, "phases.version": str(info.get("version"))},
    )
    return run.info.run_id


def _existing_children(client, experiment_id: str, parent_id: str) -> set[str]:
    keys: set[str] = set()
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000, page_token=token
        )
        keys.update(run.data.tags.get("phases.child", "") for run in page)
        token = page.token
        if not token:
            return keys


def _point_children(points: pl.DataFrame):
    for row in points.iter_rows(named=True):
        params = {k: row[k] for k in CHILD_PARAMS if row.get(k) is not None}
        if row.get("regime") is not None:
            params["regime"] = row["regime"]
        if row.get("sample_steps") is not None:
            params["sample_steps"] = row["sample_steps"]
        metrics = {k: float(row[k]) for k in CHILD_METRICS if _finite(row.get(k))}
        metrics["stationary"] = float(bool(row.get("stationary")))
        metrics["diverged"] = float(bool(row.get("diverged")))
        yield row["point_id"], params, metrics


def _chunk_children(store: SweepStore, points: pl.DataFrame):
    from phases.sweep import plan_sweep

    plan = plan_sweep(yaml.safe_load(store.read_text("spec.yaml")), storage=store.storage)
    by_id = {row["point_id"]: row for row in points.iter_rows(named=True)}
    for chunk in plan.chunks:
        rows = [by_id[p.point_id] for p in chunk.points if p.point_id in by_id]
        if not rows:
            continue
        params = {"chunk_id": chunk.chunk_id, "protocol": chunk.protocol, "points": len(rows)}
        metrics: dict[str, float] = {}
        for key in ("U", "T", "S", "eos_ratio"):
            values = [r[key] for r in rows if _finite(r.get(key))]
            if values:
                metrics[f"mean_{key}"] = float(sum(values) / len(values))
        metrics["stationary_fraction"] = sum(bool(r["stationary"]) for r in rows) / len(rows)
        metrics["diverged_fraction"] = sum(bool(r["diverged"]) for r in rows) / len(rows)
        yield chunk.chunk_id, params, metrics


def _spec_params(spec: dict[str, Any], n_points: int) -> dict[str, Any]:
    params = {
        "name": spec["name"],
        "kind": spec["kind"],
        "protocols": ",".join(sorted({g["protocol"] for g in spec.get("grids", [])})),
        "points": n_points,
        **{key: spec[key] for key in ("steps", "replicas", "chunk_size", "source") if spec.get(key) is not None},
        **{f"params.{k}": v for k, v in (spec.get("params") or {}).items()},
    }
    return {key: value for key, value in params.items() if value != ""}


def _flatten_fits(fits: dict[str, Any]) -> dict[str, float]:
    """Numeric leaves of fits.json as MLflow metric keys, e.g. `maxwell.elr.dS_dlog_wd_at_fixed_lr.slope`."""
    out: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
            out[prefix] = float(value)

    for section in ("equation_of_state", "maxwell", "closed_forms"):
        walk(section, fits.get(section, {}))
    quality = fits.get("quality") or {}
    for section in ("best", "head_auroc"):
        walk(f"quality.{section}", quality.get(section) or {})
    for key in ("n_points", "n_stationary", "n_diverged"):
        if key in fits:
            out[key] = float(fits[key])
    return out


def _log_artifacts(client, run_id: str, store: SweepStore) -> None:
    if store.is_local:
        for name in ARTIFACT_FILES:
            if store.exists(name):
                client.log_artifact(run_id, str(store.local_path(name)))
        if store.exists("plots"):
            client.log_artifacts(run_id, str(store.local_path("plots")), artifact_path="plots")
        return
    with tempfile.TemporaryDirectory() as tmp:
        for name in ARTIFACT_FILES:
            if store.exists(name):
                target = Path(tmp) / name
                with store.filesystem.open_input_stream(store.path(name)) as stream:
                    target.write_bytes(stream.read())
                client.log_artifact(run_id, str(target))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
