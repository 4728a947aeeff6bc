"""Regimes of fixed-learning-rate SGD and the boundaries between them.

Labels, checked in this order:

- `divergent`: non-finite values or a runaway norm (`diverged`), or loss and direction entropy at
  the levels of a uniformly random direction: |U - U_uniform| <= uniform_tolerance * |U_uniform| and
  S_direction >= S_uniform_direction - entropy_tolerance (nats). The uniform levels come from
  random directions sampled for the model at hand.
- `converged`: the trajectory fails the stationarity test, and over the last logged steps (from
  an eighth of the run on) ln(loss) falls against ln(step) with a slope below -min_slope that is
  significant at level alpha, and the gradient norm falls too: SGD is still minimising the loss,
  the temperature-zero regime.
  A point whose mean loss sits at the known minimum (U <= loss_min + minimum_tolerance) is
  `converged` too: it has reached the minimum, where the gradient and its noise vanish.
- `equilibrium`: stationary (see `analysis.stationarity`) at a finite loss.
- `unknown`: none of the above, for example still drifting at the end of the budget.

Boundaries: along every line of learning rates with all other coordinates fixed, two neighbouring
grid points with different labels bracket a boundary; its estimate is their geometric mean and its
uncertainty interval the two grid values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from analysis.thermo import require_columns

REGIMES = ("converged", "equilibrium", "divergent", "unknown")
DEFAULT_MIN_SLOPE = 0.05
DEFAULT_ALPHA = 0.01
DEFAULT_UNIFORM_TOLERANCE = 0.05
DEFAULT_ENTROPY_TOLERANCE = 0.1
DEFAULT_MINIMUM_TOLERANCE = 1e-9  # loss units
TAIL_FACTOR = 8.0  # the trend window is [last step / TAIL_FACTOR, last step]
SLICE_COORDINATES = ("protocol", "wd", "noise", "radius", "batch_size", "seed")


def convergence_trends(
    trajectories: pl.DataFrame, *, min_slope: float = DEFAULT_MIN_SLOPE, alpha: float = DEFAULT_ALPHA
) -> pl.DataFrame:
    """Per point, the log-log slopes of loss and gradient norm over [last step / 8, last step].

    trajectories: columns point_id, step, loss and optionally grad_norm. All points are fitted at
    once from per-point sums. Returns point_id, loss_slope, grad_norm_slope (null without
    grad_norm) and converging (loss slope below -min_slope with p < alpha, and a falling gradient
    norm where it is logged).
    """
    require_columns(trajectories, ("point_id", "step", "loss"), "convergence_trends")
    has_grad = "grad_norm" in trajectories.columns
    tail = (
        trajectories.select("point_id", "step", "loss", *(["grad_norm"] if has_grad else []))
        .filter((pl.col("step") > 0) & pl.col("loss").is_finite())
        .filter(pl.col("step") >= pl.col("step").max().over("point_id") / TAIL_FACTOR)
        .with_columns(x=pl.col("step").cast(pl.Float64).log(), y=pl.max_horizontal(pl.col("loss"), pl.lit(1e-300)).log())
    )
    fits = tail.group_by("point_id", maintain_order=True).agg(_log_log_fit("y").alias("loss"))
    if has_grad:
        tail = tail.with_columns(g=pl.max_horizontal(pl.col("grad_norm"), pl.lit(1e-300)).log())
        grads = tail.group_by("point_id", maintain_order=True).agg(
            _log_log_fit("g").alias("grad"), pl.col("grad_norm").is_null().any().alias("grad_missing")
        )
        fits = fits.join(grads, on="point_id", how="left")
    fits = fits.unnest("loss")
    p_value = 2.0 * stats.t.sf(fits["t"].to_numpy(), df=np.maximum(fits["n"].to_numpy() - 2, 1))
    fits = fits.with_columns(p=pl.Series(np.nan_to_num(p_value, nan=1.0)))
    enough = pl.col("n") >= 4
    falling = enough & (pl.col("slope") < -min_slope) & (pl.col("p") < alpha)
    grad_slope = pl.lit(None, dtype=pl.Float64)
    if has_grad:
        grad_slope = pl.when(~pl.col("grad_missing") & enough).then(pl.col("grad").struct.field("slope"))
        falling = falling & (grad_slope.is_null() | (grad_slope < 0))
    all_points = trajectories.select(pl.col("point_id").unique(maintain_order=True))
    result = fits.select(
        "point_id",
        pl.when(enough).then(pl.col("slope")).alias("loss_slope"),
        grad_slope.alias("grad_norm_slope"),
        falling.fill_null(False).alias("converging"),
    )
    return all_points.join(result, on="point_id", how="left").with_columns(pl.col("converging").fill_null(False)).select(
        pl.col("point_id").cast(pl.String),
        pl.col("loss_slope").cast(pl.Float64),
        pl.col("grad_norm_slope").cast(pl.Float64),
        pl.col("converging"),
    )


def _log_log_fit(y: str) -> pl.Expr:
    """Least-squares slope of `y` on x within a group, its t-statistic and the point count."""
    n = pl.len().cast(pl.Float64)
    sx, sy = pl.col("x").sum(), pl.col(y).sum()
    var_x = (pl.col("x") ** 2).sum() - sx * sx / n
    cov = (pl.col("x") * pl.col(y)).sum() - sx * sy / n
    var_y = (pl.col(y) ** 2).sum() - sy * sy / n
    slope = cov / var_x
    residual = pl.max_horizontal(var_y - slope * cov, pl.lit(0.0)) / pl.max_horizontal(n - 2, pl.lit(1.0))
    stderr = (residual / var_x).sqrt()
    t_stat = pl.when(stderr > 0).then(slope.abs() / stderr).when(slope == 0).then(pl.lit(0.0)).otherwise(pl.lit(float("inf")))
    return pl.struct(slope.alias("slope"), t_stat.fill_nan(0.0).alias("t"), n.alias("n"))


def label_regimes(
    points: pl.DataFrame,
    trends: pl.DataFrame | None = None,
    *,
    uniform_tolerance: float = DEFAULT_UNIFORM_TOLERANCE,
    entropy_tolerance: float = DEFAULT_ENTROPY_TOLERANCE,
    minimum_tolerance: float = DEFAULT_MINIMUM_TOLERANCE,
) -> pl.DataFrame:
    """Add a `regime` column (see the module docstring); `trends` from `convergence_trends`.

    Without trends no point is labelled `converged`; without U_uniform and S_uniform_direction
    columns only the `diverged` flag and non-finite U mark divergence.
    """
    require_columns(points, ("diverged", "stationary"), "label_regimes")
    frame = points
    if trends is not None:
        frame = frame.drop([c for c in ("loss_slope", "grad_norm_slope", "converging") if c in frame.columns])
        frame = frame.join(trends, on="point_id", how="left")
    converging = pl.col("converging").fill_null(False) if "converging" in frame.columns else pl.lit(False)
    if "trend_stationary" in frame.columns:
        converging = converging & ~pl.col("trend_stationary").fill_null(False)

    U = pl.col("U") if "U" in frame.columns else pl.lit(None, dtype=pl.Float64)
    uniform = pl.lit(False)
    if {"U_uniform", "S_uniform_direction", "S_direction"} <= set(frame.columns):
        uniform = (
            ((U - pl.col("U_uniform")).abs() <= uniform_tolerance * pl.col("U_uniform").abs())
            & (pl.col("S_direction") >= pl.col("S_uniform_direction") - entropy_tolerance)
        ).fill_null(False)
    non_finite = U.is_null() | ~U.is_finite().fill_null(False)
    if "loss_min" in frame.columns:
        at_minimum = (U <= pl.col("loss_min") + minimum_tolerance).fill_null(False)
        converging = converging | at_minimum

    regime = (
        pl.when(pl.col("diverged").fill_null(False) | non_finite | uniform)
        .then(pl.lit("divergent"))
        .when(converging)
        .then(pl.lit("converged"))
        .when(pl.col("stationary").fill_null(False))
        .then(pl.lit("equilibrium"))
        .otherwise(pl.lit("unknown"))
    )
    return frame.with_columns(regime=regime)


def regime_boundaries(diagram: pl.DataFrame) -> list[dict[str, Any]]:
    """Return the learning-rate boundaries between regimes along every line of fixed other coordinates.

    Each boundary: the line's coordinates, lower_regime and upper_regime (below and above), lr_low
    and lr_high (the bracketing grid values) and lr_boundary (their geometric mean).
    """
    require_columns(diagram, ("lr", "regime"), "regime_boundaries")
    keys = [c for c in SLICE_COORDINATES if c in diagram.columns]
    boundaries: list[dict[str, Any]] = []
    for key, line in diagram.group_by(keys, maintain_order=True):
        line = line.group_by("lr").agg(pl.col("regime").mode().first()).sort("lr")
        lrs = line["lr"].to_list()
        labels = line["regime"].to_list()
        for i in range(len(lrs) - 1):
            if labels[i] != labels[i + 1]:
                boundaries.append({
                    **dict(zip(keys, key)),
                    "lower_regime": labels[i],
                    "upper_regime": labels[i + 1],
                    "lr_low": lrs[i],
                    "lr_high": lrs[i + 1],
                    "lr_boundary": float(np.sqrt(lrs[i] * lrs[i + 1])),
                })
    return boundaries
