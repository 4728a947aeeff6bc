"""Fit the phase diagram of training logs that phases did not write: CSV, Parquet or MLflow.

The logs are validated and summarised by `analysis.logs`, then go through the same analysis as a
sweep and produce the same files in an output directory.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from analysis.logs import missing_results, normalise_logs, read_logs, summarise_logs
from phases.schema import TRAJECTORY_SCHEMA
from phases.storage import SweepStore

logger = logging.getLogger(__name__)

LOSS_METRICS = ("loss", "train_loss")
NORM_METRICS = ("weight_norm", "radius_norm")
OPTIONAL_METRICS = ("grad_norm", "test_loss", "test_acc", "sigma2", "noise_trace", "entropy", "S_direction")
PARAMS = ("lr", "wd", "protocol", "noise", "radius", "batch_size", "seed", "dim")
MLFLOW_PREFIX = "mlflow://"


def read_mlflow_logs(experiment: str, tracking_uri: str) -> pl.DataFrame:
    """Read every run of an MLflow experiment as a log table: params lr and wd, metric histories.

    Each run needs params `lr` and `wd` and metrics `loss` (or `train_loss`) and `weight_norm`
    (or `radius_norm`) logged with their step. Raises ValueError naming what is missing.
    """
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"MLflow experiment {experiment!r} not found at {tracking_uri}")
    runs = client.search_runs([found.experiment_id], max_results=50000)
    if not runs:
        raise ValueError(f"MLflow experiment {experiment!r} at {tracking_uri} contains no runs")
    frames = []
    for run in runs:
        params = run.data.params
        missing = [p for p in ("lr", "wd") if p not in params]
        loss_key = next((k for k in LOSS_METRICS if k in run.data.metrics), None)
        norm_key = next((k for k in NORM_METRICS if k in run.data.metrics), None)
        if missing or loss_key is None or norm_key is None:
            needs = list(missing)
            if loss_key is None:
                needs.append("metric loss")
            if norm_key is None:
                needs.append("metric weight_norm")
            raise ValueError(f"MLflow run {run.info.run_id} lacks {', '.join(needs)}; every run needs params lr, wd and metrics loss, weight_norm")
        columns: dict[str, dict[int, float]] = {}
        for key, name in [(loss_key, "loss"), (norm_key, "weight_norm")] + [(k, k) for k in OPTIONAL_METRICS if k in run.data.metrics]:
            columns[name] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        steps = sorted(columns["loss"])
        row_data: dict[str, Any] = {"step": steps, **{name: [values.get(s) for s in steps] for name, values in columns.items()}}
        frame = pl.DataFrame(row_data)
        for key in PARAMS:
            if key in params:
                value = params[key]
                frame = frame.with_columns(pl.lit(value if key == "protocol" else float(value)).alias(key))
        frames.append(frame.with_columns(run=pl.lit(run.info.run_id)))
    return pl.concat(frames, how="diagonal_relaxed")


def fit_external(
    source: str, output: str | Path, *, dim: int | None = None, tracking_uri: str | None = None, analysis: dict[str, Any] | None = None
) -> tuple[SweepStore, dict[str, Any], list[str]]:
    """Analyse external logs into the directory `output`; returns (store, fits, skipped results).

    source: a .csv or .parquet path, or `mlflow://EXPERIMENT` (with `tracking_uri`). analysis: the
    thresholds of the spec's `analysis` section (temperature_half_width, temperature_slack, ...).
    Raises ValueError with one clear message for unreadable input, missing columns or wrong types.
    """
    from phases import __version__
    from phases.results import analyse

    if source.startswith(MLFLOW_PREFIX):
        if not tracking_uri:
            raise ValueError("reading from MLflow needs --tracking-uri (for example sqlite:///mlflow.db)")
        raw = read_mlflow_logs(source[len(MLFLOW_PREFIX):], tracking_uri)
    else:
        try:
            raw = read_logs(source)
        except pl.exceptions.PolarsError as error:
            raise ValueError(f"{source}: cannot read the file: {str(error).splitlines()[0]}") from None
    trajectories = normalise_logs(raw, dim=dim, source=source)
    summaries = summarise_logs(trajectories)

    output = Path(output)
    store = SweepStore(output.parent if str(output.parent) else ".", output.name)
    store.makedirs()
    spec = {"name": output.name, "kind": "external", "source": source, "dim": dim, "analysis": analysis or {}}
    store.write_text("spec.yaml", yaml.safe_dump(spec, sort_keys=False))
    if not store.exists("sweep.json"):
        # The uid lets `phases track` find this analysis's MLflow run again instead of duplicating it.
        digest = hashlib.sha256(f"{source}|{store.uri}".encode()).hexdigest()[:16]
        store.write_json("sweep.json", {"name": output.name, "uid": f"{output.name}-{digest}", "spec_digest": digest,
                                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "version": __version__})
    store.write_table("trajectories.parquet", _trajectory_table(trajectories))
    fits = analyse(store, summaries, spec, __version__, trajectories)
    notes = missing_results(trajectories)
    fits["skipped_results"] = notes
    store.write_json("fits.json", fits)
    return store, fits, notes


def _trajectory_table(trajectories: pl.DataFrame):
    empty = pl.from_arrow(TRAJECTORY_SCHEMA.empty_table())
    missing = [pl.lit(None, dtype=empty.schema[name]).alias(name) for name in empty.columns if name not in trajectories.columns]
    frame = trajectories.with_columns(missing).select(empty.columns)
    return frame.cast(empty.schema).to_arrow().cast(TRAJECTORY_SCHEMA)
