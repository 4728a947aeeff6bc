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

    trajectories: columns point_id, step, loss and optionally grad_norm. Returns point_id,
    loss_slope, grad_norm_slope (null without grad_norm) and converging.
    """
    require_columns(trajectories, ("point_id", "step", "loss"), "convergence_trends")
    has_grad = "grad_norm" in trajectories.columns
    rows = []
    for (point_id,), group in trajectories.sort("step").group_by(["point_id"], maintain_order=True):
        group = group.filter((pl.col("step") > 0) & pl.col("loss").is_finite())
        steps = group["step"].to_numpy().astype(np.float64)
        row: dict[str, Any] = {"point_id": point_id, "loss_slope": None, "grad_norm_slope": None, "converging": False}
        if steps.size >= 4:
            tail = steps >= steps[-1] / TAIL_FACTOR
            if tail.sum() >= 4:
                x = np.log(steps[tail])
                loss_fit = stats.linregress(x, np.log(np.maximum(group["loss"].to_numpy()[tail], 1e-300)))
                row["loss_slope"] = float(loss_fit.slope)
                falling = loss_fit.slope < -min_slope and loss_fit.pvalue < alpha
                if has_grad and group["grad_norm"].null_count() == 0:
                    grad_fit = stats.linregress(x, np.log(np.maximum(group["grad_norm"].to_numpy()[tail], 1e-300)))
                    row["grad_norm_slope"] = float(grad_fit.slope)
                    falling = falling and grad_fit.slope < 0
                row["converging"] = bool(falling)
        rows.append(row)
    return pl.DataFrame(rows, schema={"point_id": pl.String, "loss_slope": pl.Float64, "grad_norm_slope": pl.Float64, "converging": pl.Boolean})


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
