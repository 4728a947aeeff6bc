"""Turn part files into the sweep's tables, run the analysis, and read finished sweeps back.

Writes `trajectories.parquet` (sorted by point_id, step), `points.parquet` (one row per point:
coordinates, stationary summary and thermodynamics), `diagram.parquet` (points + regimes, with the
spec and versions in its metadata), `fits.json` and `plots/*.png`. Kinds that sample (remask) add
`samples.parquet`, one row per point and sampling step count, and get a sample-quality analysis
instead of the thermodynamic one.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import yaml

from analysis.diagram import build_phase_diagram, diagram_metadata
from analysis.eos import closed_form_agreement, elr_collapse, fit_equation_of_state, maxwell_quadratic, maxwell_slopes
from analysis.plots import write_plots
from analysis.quality import quality_summary, write_quality_plots
from phases.schema import IDENTITY, PART_SCHEMA, POINTS_SCHEMA, SAMPLES_SCHEMA, TRAJECTORY_SCHEMA
from phases.storage import SCHEMA_VERSION, SweepStore, part_name

logger = logging.getLogger(__name__)


def compact(store: SweepStore, chunk_ids: list[str]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Read the finished parts; return (trajectories, summaries, samples) as polars frames.

    NOTE: parts are cast to the current PART_SCHEMA, so part files written by a version with other
    columns fail here; re-run such a sweep into a new directory.
    """
    tables = [store.read_table(part_name(chunk_id)).cast(PART_SCHEMA) for chunk_id in chunk_ids]
    if not tables:
        parts = pl.from_arrow(PART_SCHEMA.empty_table())
    else:
        parts = pl.from_arrow(pa.concat_tables(tables))
    identity = [c.name for c in IDENTITY]
    trajectories = (
        parts.select(identity + ["trajectory"]).explode("trajectory").unnest("trajectory").drop_nulls("step").sort(["point_id", "step"])
    )
    samples = (
        parts.select(identity + ["sample_quality"]).explode("sample_quality").unnest("sample_quality")
        .drop_nulls("sample_steps").sort(["point_id", "sample_steps"])
    )
    summaries = parts.drop("trajectory", "sample_quality").sort("point_id")
    return trajectories, summaries, samples


def analyse(
    store: SweepStore, summaries: pl.DataFrame, spec: dict[str, Any], version: str, trajectories: pl.DataFrame | None = None
) -> dict[str, Any]:
    """Run the analysis on the summaries (and trajectories) and write points, diagram, fits and plots."""
    if spec.get("kind") == "remask":
        return _analyse_quality(store, summaries, spec, version)
    diagram, extras = build_phase_diagram(summaries, trajectories, **(spec.get("analysis") or {}))
    diagram = _with_schema_columns(diagram)
    points = diagram.select([f.name for f in POINTS_SCHEMA])
    store.write_table("points.parquet", points.to_arrow().cast(POINTS_SCHEMA))
    store.write_table("diagram.parquet", diagram.to_arrow(), diagram_metadata(spec, version, SCHEMA_VERSION))

    fits = {
        "schema_version": SCHEMA_VERSION,
        "sweep": store.name,
        "n_points": diagram.height,
        "n_stationary": int(diagram["stationary"].fill_null(False).sum()),
        "n_diverged": int(diagram["diverged"].fill_null(False).sum()),
        "regimes": {row["regime"]: row["len"] for row in diagram.group_by("regime").len().iter_rows(named=True)},
        "equation_of_state": _fit_or_skip(fit_equation_of_state, diagram),
        "elr_collapse": _fit_or_skip(elr_collapse, diagram) if "elr" in diagram["protocol"].to_list() else None,
        "maxwell": _fit_or_skip(maxwell_slopes, diagram),
        "maxwell_quadratic": _fit_or_skip(maxwell_quadratic, diagram),
        "closed_forms": _fit_or_skip(closed_form_agreement, diagram),
        "temperature": extras["temperature"],
        "trajectory_temperature": diagram.filter(pl.col("T_trajectory").is_not_null())
        .select("point_id", "protocol", "lr", "wd", "radius", "noise", "regime", "T_trajectory")
        .sort("lr")
        .to_dicts(),
        "boundaries": extras["boundaries"],
    }
    store.write_json("fits.json", fits)
    _write_plots(store, diagram, fits)
    return fits


def _analyse_quality(store: SweepStore, summaries: pl.DataFrame, spec: dict[str, Any], version: str) -> dict[str, Any]:
    """Analyse a remask sweep: no thermodynamics, a diagram of sample quality over lr x wd x tau.

    A point whose head diverged gets regime `divergent`; the others have no regime (null).
    """
    diagram = _with_schema_columns(summaries.with_columns(
        regime=pl.when(pl.col("diverged").fill_null(False)).then(pl.lit("divergent")).otherwise(pl.lit(None, dtype=pl.String))
    ))
    diagram = diagram.sort(["noise", "seed", "wd", "lr"], nulls_last=True)
    points = diagram.select([f.name for f in POINTS_SCHEMA])
    store.write_table("points.parquet", points.to_arrow().cast(POINTS_SCHEMA))
    store.write_table("diagram.parquet", diagram.to_arrow(), diagram_metadata(spec, version, SCHEMA_VERSION))
    samples = pl.from_arrow(store.read_table("samples.parquet")) if store.exists("samples.parquet") else None
    fits = {
        "schema_version": SCHEMA_VERSION,
        "sweep": store.name,
        "kind": "remask",
        "n_points": diagram.height,
        "n_diverged": int(diagram["diverged"].fill_null(False).sum()),
        "quality": quality_summary(diagram, samples),
    }
    store.write_json("fits.json", fits)
    if store.is_local:
        write_quality_plots(diagram, samples, store.local_path("plots"))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_quality_plots(diagram, samples, tmp):
                store.write_bytes(f"plots/{path.name}", path.read_bytes())
    return fits


def _fit_or_skip(fit, diagram: pl.DataFrame) -> dict[str, Any]:
    """Run one fit; a ValueError (no usable points) is recorded as {"skipped": reason}."""
    try:
        return fit(diagram)
    except ValueError as error:
        logger.warning("%s skipped: %s", fit.__name__, error)
        return {"skipped": str(error)}


def _with_schema_columns(diagram: pl.DataFrame) -> pl.DataFrame:
    """Add every points.parquet column the analysis did not produce, as nulls of its type."""
    empty = pl.from_arrow(POINTS_SCHEMA.empty_table())
    missing = [pl.lit(None, dtype=empty.schema[name]).alias(name) for name in empty.columns if name not in diagram.columns]
    return diagram.with_columns(missing) if missing else diagram


def _write_plots(store: SweepStore, diagram: pl.DataFrame, fits: dict[str, Any]) -> None:
    if store.is_local:
        write_plots(diagram, store.local_path("plots"), fits)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_plots(diagram, tmp, fits):
            store.write_bytes(f"plots/{path.name}", path.read_bytes())


def write_tables(store: SweepStore, trajectories: pl.DataFrame, samples: pl.DataFrame | None = None) -> None:
    """Write trajectories.parquet, and samples.parquet when `samples` is given (kinds that sample),
    even with no rows, so that a sweep whose points all diverged still has the file."""
    store.write_table("trajectories.parquet", trajectories.to_arrow().cast(TRAJECTORY_SCHEMA))
    if samples is not None:
        store.write_table("samples.parquet", samples.to_arrow().cast(SAMPLES_SCHEMA))


@dataclass
class Sweep:
    """A finished sweep read back: its tables as polars frames, its fits and resolved spec."""

    path: str
    spec: dict[str, Any]
    trajectories: pl.DataFrame
    points: pl.DataFrame
    diagram: pl.DataFrame
    fits: dict[str, Any]
    samples: pl.DataFrame | None = None  # remask sweeps: sample quality per point and step count


def load_sweep(path: str | Path) -> Sweep:
    """Read a sweep directory (local path or URI) written by `run_sweep`.

    Raises FileNotFoundError naming the missing file and how to produce it.
    """
    store = SweepStore.from_sweep_dir(path)
    for name in ("spec.yaml", "points.parquet", "diagram.parquet", "fits.json", "trajectories.parquet"):
        if not store.exists(name):
            raise FileNotFoundError(
                f"{store.uri}/{name} not found; run `phases sweep` to finish the sweep or `phases fit {store.uri}` to redo the analysis"
            )
    return Sweep(
        path=store.uri,
        spec=yaml.safe_load(store.read_text("spec.yaml")),
        trajectories=pl.from_arrow(store.read_table("trajectories.parquet")),
        points=pl.from_arrow(store.read_table("points.parquet")),
        diagram=pl.from_arrow(store.read_table("diagram.parquet")),
        fits=store.read_json("fits.json"),
        samples=pl.from_arrow(store.read_table("samples.parquet")) if store.exists("samples.parquet") else None,
    )


__all__ = ["Sweep", "analyse", "compact", "load_sweep", "write_tables"]
