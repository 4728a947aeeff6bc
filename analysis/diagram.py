"""Assemble the phase diagram and write it as Parquet with its metadata.

The diagram is the table of stationary summaries with thermodynamic quantities, closed-form
predictions, stationarity verdicts, regime labels and temperatures, one row per point. Its Parquet
key-value metadata contains the resolved spec (`phases.spec`, JSON), the package version
(`phases.version`) and the schema version (`phases.schema_version`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from analysis.eos import quadratic_entropy_residuals
from analysis.regimes import SLICE_COORDINATES, convergence_trends, label_regimes, regime_boundaries
from analysis.stationarity import detect_stationarity
from analysis.temperature import fit_power_law, free_energy_temperatures, trajectory_temperature
from analysis.thermo import add_thermodynamics

# Coordinates that define one line of learning rates for the free-energy temperature.
TEMPERATURE_SLICE = ("radius", "noise", "batch_size", "seed")
TEMPERATURE_COLUMNS = ("T_free_energy", "T_free_energy_min", "T_free_energy_max")


def build_phase_diagram(
    summaries: pl.DataFrame,
    trajectories: pl.DataFrame | None = None,
    *,
    temperature_half_width: float | None = None,
    temperature_slack: float = 0.0,
    stationarity_tolerance: float = 0.02,
    stationarity_alpha: float = 0.01,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Return the phase diagram and the fits that come with it (temperatures, boundaries).

    The keyword arguments are the thresholds of `free_energy_temperatures` (half_width, slack) and
    of `detect_stationarity` (tolerance, alpha).

    Steps, in order: the log-time stationarity test and the convergence trends, when trajectories
    are given (`stationary` then requires both the summary's own check and the trend test). Then
    T, p, V, S and predictions, and regime labels. Then free-energy temperatures on every `sphere`
    line of learning rates, trajectory temperatures for points not in equilibrium, and the regime
    boundaries.
    """
    frame = summaries
    trends = None
    if trajectories is not None and trajectories.height:
        frame = frame.drop([c for c in ("stationary_from", "trend_change", "trend_stationary") if c in frame.columns])
        verdicts = detect_stationarity(trajectories, tolerance=stationarity_tolerance, alpha=stationarity_alpha)
        frame = frame.join(verdicts, on="point_id", how="left").with_columns(
            stationary=pl.col("stationary").fill_null(False) & pl.col("trend_stationary").fill_null(False)
        )
        trends = convergence_trends(trajectories)
    diagram = label_regimes(add_thermodynamics(frame), trends)
    diagram, temperature_fits = _add_free_energy_temperatures(diagram, temperature_half_width, temperature_slack)
    diagram = _add_trajectory_temperatures(diagram, trajectories)
    boundaries = regime_boundaries(diagram)
    diagram = _add_nearest_boundaries(diagram, boundaries)
    diagram = diagram.join(quadratic_entropy_residuals(diagram), on="point_id", how="left")
    sort_keys = [c for c in ("protocol", "noise", "seed", "radius", "wd", "lr") if c in diagram.columns]
    diagram = diagram.sort(sort_keys, nulls_last=True)
    extras = {"temperature": temperature_fits, "boundaries": boundaries}
    return diagram, extras


def _add_nearest_boundaries(diagram: pl.DataFrame, boundaries: list[dict[str, Any]]) -> pl.DataFrame:
    """Add boundary_below and boundary_above: the nearest regime boundaries (lr) on each point's line."""
    if not boundaries:
        return diagram.with_columns(
            pl.lit(None, dtype=pl.Float64).alias("boundary_below"), pl.lit(None, dtype=pl.Float64).alias("boundary_above")
        )
    keys = [k for k in SLICE_COORDINATES if k in diagram.columns]
    table = pl.DataFrame(boundaries).select(*keys, "lr_boundary").cast({k: diagram.schema[k] for k in keys})
    pairs = diagram.select("point_id", "lr", *keys).join(table, on=keys, how="inner", nulls_equal=True)
    nearest = pairs.group_by("point_id").agg(
        pl.col("lr_boundary").filter(pl.col("lr_boundary") < pl.col("lr")).max().alias("boundary_below"),
        pl.col("lr_boundary").filter(pl.col("lr_boundary") > pl.col("lr")).min().alias("boundary_above"),
    )
    return diagram.join(nearest, on="point_id", how="left")


def _add_free_energy_temperatures(
    diagram: pl.DataFrame, half_width: float | None, slack: float
) -> tuple[pl.DataFrame, list[dict[str, Any]]]:
    fits: list[dict[str, Any]] = []
    found: list[pl.DataFrame] = []
    sphere = diagram.filter((pl.col("protocol") == "sphere") & (pl.col("regime") == "equilibrium") & pl.col("S").is_finite())
    keys = [c for c in TEMPERATURE_SLICE if c in sphere.columns]
    for key, line in sphere.group_by(keys, maintain_order=True):
        coords = dict(zip(keys, key))
        try:
            result = free_energy_temperatures(line.select("lr", "U", "S"), half_width=half_width, slack=slack)
        except ValueError as error:
            fits.append({**coords, "skipped": str(error)})
            continue
        ids = line.sort("lr").select("point_id", "lr")
        found.append(ids.join(result.select("lr", "T", "T_min", "T_max"), on="lr").select(
            "point_id", pl.col("T").alias("T_free_energy"), pl.col("T_min").alias("T_free_energy_min"),
            pl.col("T_max").alias("T_free_energy_max"),
        ))
        interior = result[1:-1]
        entry: dict[str, Any] = {**coords, "n": result.height,
                                 "points": result.select("lr", "T", "T_min", "T_max", "feasible").to_dicts()}
        try:
            law = fit_power_law(interior["lr"].to_numpy(), interior["T"].to_numpy())
            entry["power_law"] = {"b": law.b, "k": law.k, "b_interval_95": list(law.b_interval),
                                  "k_interval_95": list(law.k_interval), "r2": law.r2, "n": law.n}
        except ValueError as error:
            entry["power_law"] = {"skipped": str(error)}
        fits.append(entry)
    if found:
        diagram = diagram.join(pl.concat(found), on="point_id", how="left")
    else:
        diagram = diagram.with_columns([pl.lit(None, dtype=pl.Float64).alias(c) for c in TEMPERATURE_COLUMNS])
    return diagram, fits


def _add_trajectory_temperatures(diagram: pl.DataFrame, trajectories: pl.DataFrame | None) -> pl.DataFrame:
    values: dict[str, float] = {}
    if trajectories is not None and "S_direction" in trajectories.columns:
        unsettled = diagram.filter(pl.col("regime").is_in(["converged", "unknown"]))["point_id"]
        with_entropy = trajectories.filter(pl.col("point_id").is_in(unsettled.to_list()) & pl.col("S_direction").is_not_null())
        for (point_id,), trajectory in with_entropy.group_by(["point_id"]):
            try:
                estimate = trajectory_temperature(trajectory)["T_trajectory"].drop_nulls()
            except ValueError:
                continue
            if estimate.len():
                values[point_id] = float(np.median(estimate.to_numpy()[-3:]))
    column = pl.Series("T_trajectory", [values.get(p) for p in diagram["point_id"]], dtype=pl.Float64)
    return diagram.with_columns(column)


def diagram_metadata(spec: dict[str, Any], version: str, schema_version: str) -> dict[str, str]:
    return {"phases.spec": json.dumps(spec, sort_keys=True), "phases.version": version, "phases.schema_version": schema_version}


def read_diagram_metadata(path: str | Path) -> dict[str, Any]:
    """Return the metadata of a diagram.parquet: spec (dict), version and schema_version."""
    raw = pq.read_schema(path).metadata or {}
    meta = {k.decode(): v.decode() for k, v in raw.items() if k.decode().startswith("phases.")}
    return {
        "spec": json.loads(meta["phases.spec"]) if "phases.spec" in meta else None,
        "version": meta.get("phases.version"),
        "schema_version": meta.get("phases.schema_version"),
    }
