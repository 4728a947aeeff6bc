"""Training logs written by any code, turned into trajectories and stationary summaries.

Required columns (one row per run and logged step):

| column | meaning |
|---|---|
| `lr` | learning rate (effective LR under `sphere` and `elr`, plain step under `lr`) |
| `wd` | weight decay (coupled L2); 0 for `sphere` |
| `step` | SGD steps taken |
| `loss` | training loss |
| `weight_norm` | norm of the scale-invariant weights (`radius_norm` is accepted too) |

Optional columns, each enabling more results: `run` (identifies a run; default: one run per
distinct set of coordinates), `protocol` (default `lr`), `noise`, `radius`, `batch_size`, `seed`,
`grad_norm`, `test_loss`, `test_acc`, `sigma2` or `noise_trace` with `dim` (temperature and the
equation of state), `entropy` or `S_direction` (entropy: Maxwell relations, free-energy
temperatures). Missing optional columns leave their results null; `missing_results` lists them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl

from analysis.stationarity import detect_stationarity

REQUIRED = ("lr", "wd", "step", "loss")
NORM_COLUMNS = ("weight_norm", "radius_norm")
COORDINATES = ("protocol", "lr", "wd", "noise", "radius", "batch_size", "seed")
NUMERIC_OPTIONAL = ("noise", "radius", "grad_norm", "test_loss", "test_acc", "sigma2", "noise_trace", "S_direction")
PROTOCOLS = ("sphere", "elr", "lr")


def read_logs(path: str | Path) -> pl.DataFrame:
    """Read a CSV or Parquet log file; raises ValueError naming the file for anything else or an empty file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: the file is empty; it needs a header and rows with lr, wd, step, loss, weight_norm")
    if path.suffix.lower() == ".csv":
        frame = pl.read_csv(path, infer_schema_length=10000)
    elif path.suffix.lower() in (".parquet", ".pq"):
        frame = pl.read_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported log format {path.suffix!r}; give a .csv or .parquet file")
    if frame.height == 0:
        raise ValueError(f"{path}: the file contains no rows")
    return frame


def normalise_logs(frame: pl.DataFrame, *, dim: int | None = None, source: str = "logs") -> pl.DataFrame:
    """Validate external logs and return them as a trajectories table in phases' columns.

    Raises ValueError naming missing required columns, non-numeric columns, unknown protocols,
    or an empty table.
    """
    if frame.height == 0:
        raise ValueError(f"{source}: the table contains no rows")
    if "entropy" in frame.columns and "S_direction" not in frame.columns:
        frame = frame.rename({"entropy": "S_direction"})
    norm = next((c for c in NORM_COLUMNS if c in frame.columns), None)
    missing = [c for c in REQUIRED if c not in frame.columns] + ([] if norm else ["weight_norm"])
    if missing:
        raise ValueError(
            f"{source}: missing required columns {', '.join(missing)}; required: lr, wd, step, loss, weight_norm; "
            f"present: {', '.join(frame.columns)}"
        )
    frame = frame.rename({norm: "radius_norm"}) if norm != "radius_norm" else frame
    for column in (*REQUIRED, "radius_norm", *[c for c in NUMERIC_OPTIONAL if c in frame.columns]):
        if not frame.schema[column].is_numeric():
            raise ValueError(f"{source}: column {column!r} must be numeric, got {frame.schema[column]}")
    steps = frame["step"].cast(pl.Float64)
    if steps.null_count() or not (steps == steps.round(0)).all() or (steps < 0).any():
        raise ValueError(f"{source}: column 'step' must contain non-negative whole numbers of SGD steps")
    frame = frame.with_columns(pl.col("step").cast(pl.Int64))
    if "protocol" not in frame.columns:
        frame = frame.with_columns(protocol=pl.lit("lr"))
    unknown = sorted(set(frame["protocol"].unique().to_list()) - set(PROTOCOLS))
    if unknown:
        raise ValueError(f"{source}: unknown protocol values {unknown}; allowed: {', '.join(PROTOCOLS)}")
    if dim is not None:
        frame = frame.with_columns(dim=pl.lit(dim, dtype=pl.Int64))
    for column, dtype in (("noise", pl.Float64), ("radius", pl.Float64), ("batch_size", pl.Int64), ("seed", pl.Int64), ("dim", pl.Int64)):
        frame = frame.with_columns(pl.col(column).cast(dtype) if column in frame.columns else pl.lit(None, dtype=dtype).alias(column))
    if "sigma2" not in frame.columns and "noise_trace" in frame.columns:
        frame = frame.with_columns(sigma2=pl.col("noise_trace") / (pl.col("dim") - 1))
    run_keys = ["run"] if "run" in frame.columns else list(COORDINATES)
    frame = frame.with_columns(point_id=pl.concat_str([pl.col(k).cast(pl.String).fill_null("-") for k in run_keys], separator="|"))
    ids = {key: hashlib.sha256(key.encode()).hexdigest()[:16] for key in frame["point_id"].unique().to_list()}
    frame = frame.with_columns(pl.col("point_id").replace_strict(ids), kind=pl.lit("external"))
    return frame.with_columns(pl.col(c).cast(pl.Float64) for c in ("lr", "wd", "loss", "radius_norm")).sort(["point_id", "step"])


def summarise_logs(trajectories: pl.DataFrame, *, default_start: float = 0.5) -> pl.DataFrame:
    """Return one stationary summary per run, averaged over its detected stationary window.

    The window starts at `stationary_from` of the log-time trend test, or at `default_start` of the
    run when the trend test finds none (the point is then not stationary). A run with a non-finite
    loss or norm is `diverged`.
    """
    verdicts = detect_stationarity(trajectories.filter(pl.col("loss").is_finite() & pl.col("radius_norm").is_finite()))
    last = trajectories.group_by("point_id").agg(pl.col("step").max().alias("window_end"))
    frame = trajectories.join(verdicts, on="point_id", how="left").join(last, on="point_id")
    frame = frame.with_columns(
        window_start=pl.coalesce(pl.col("stationary_from"), (pl.col("window_end") * default_start).cast(pl.Int64))
    )
    has = set(trajectories.columns)
    window = frame.filter(pl.col("step") >= pl.col("window_start"))
    aggregations = [
        pl.col("loss").mean().alias("U"),
        pl.col("loss").std().alias("U_std"),
        pl.col("radius_norm").mean().alias("r"),
        (pl.col("radius_norm") ** 2).mean().alias("r2"),
        pl.col("radius_norm").std().alias("r_std"),
    ]
    for column, name in (("S_direction", "S_direction"), ("sigma2", "sigma2"), ("noise_trace", "noise_trace")):
        if column in has:
            aggregations.append(pl.col(column).mean().alias(name))
    if "grad_norm" in has:
        aggregations.append((pl.col("grad_norm") ** 2).mean().alias("grad_norm2"))
    keys = ["point_id", "kind", "protocol", "lr", "wd", "noise", "radius", "batch_size", "seed", "dim", "window_start", "window_end"]
    summaries = window.group_by(keys).agg(aggregations)
    diverged = trajectories.group_by("point_id").agg(
        (~(pl.col("loss").is_finite() & pl.col("radius_norm").is_finite())).any().alias("diverged")
    )
    summaries = summaries.join(diverged, on="point_id").join(verdicts, on="point_id", how="left").with_columns(
        stationary=pl.col("trend_stationary").fill_null(False) & ~pl.col("diverged"),
        replicas=pl.lit(1, dtype=pl.Int64),
    )
    for column in ("S_direction", "sigma2", "grad_norm2", "noise_trace"):
        if column not in summaries.columns:
            summaries = summaries.with_columns(pl.lit(None, dtype=pl.Float64).alias(column))
    return summaries.with_columns(
        [pl.when(pl.col(c).is_finite()).then(pl.col(c)).otherwise(None).alias(c) for c in ("U", "r", "r2")]
    ).sort("point_id")


def missing_results(trajectories: pl.DataFrame) -> list[str]:
    """Name each result that the logs' columns do not allow, with the column it needs."""
    notes = []
    if "S_direction" not in trajectories.columns:
        notes.append("no entropy column (entropy or S_direction): entropy, Maxwell relations and free-energy temperatures are skipped")
    if "sigma2" not in trajectories.columns:
        notes.append("no sigma2 or noise_trace column: temperature T and the equation of state are skipped")
    if trajectories["dim"].null_count() == trajectories.height:
        notes.append("no dim column and no --dim: the lr-protocol temperature, S and the equation of state are skipped")
    if "grad_norm" not in trajectories.columns:
        notes.append("no grad_norm column: the convergence test uses the loss alone, and no discrete-step correction")
    return notes

