"""Stationarity of a trajectory: from which logged step on does it stop trending?

Test: for a candidate start step t0, regress the quantity on ln t over the logged steps t >= t0.
A quantity that is positive throughout is regressed in ln, so that a loss falling by orders of
magnitude shows as the trend it is. The window counts as stationary when the fitted change across
it (|slope| * (ln t_end - ln t0), relative to the mean level for quantities not in ln) is below
`tolerance`, or is not significant at level `alpha` (two-sided t-test on the slope). Replica means logged on a log-spaced schedule are close to independent between
logs once the run mixes, which is what the t-test assumes. The tolerance keeps tiny but
significant drifts from counting as non-stationary. The earliest passing start among the
candidates (each logged step in the first half of the run) is reported, so the window is as long
as the data allow. Windows shorter than MIN_POINTS logs, or spanning less than a factor of 2 in t,
are never accepted.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy import stats

from analysis.thermo import require_columns

DEFAULT_TOLERANCE = 0.02
DEFAULT_ALPHA = 0.01
MIN_POINTS = 8


def detect_stationarity(
    trajectories: pl.DataFrame,
    quantities: tuple[str, ...] = ("loss", "radius_norm"),
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    alpha: float = DEFAULT_ALPHA,
) -> pl.DataFrame:
    """Decide per point whether its trajectory became stationary, and from which step.

    trajectories: columns point_id, step and the quantities (a quantity that is absent or entirely
    null is skipped; a constant one passes). Every candidate window of every point is tested at
    once: suffix sums per point give each window's regression, so the cost is linear in the rows.
    Returns point_id, stationary_from (null when never stationary), trend_change (the largest
    relative change over the accepted window) and trend_stationary.
    Raises ValueError when point_id, step or all the quantities are missing.
    """
    require_columns(trajectories, ("point_id", "step"), "detect_stationarity")
    present = [q for q in quantities if q in trajectories.columns and trajectories[q].null_count() < trajectories.height]
    if not present:
        raise ValueError(f"detect_stationarity needs at least one of the columns {', '.join(quantities)} with values")

    rows = (
        trajectories.select("point_id", "step", *present)
        .filter(pl.col("step") > 0)
        .drop_nulls(present)
        .filter(pl.all_horizontal([pl.col(q).is_finite() for q in present]))
        .sort(["point_id", "step"])
        .with_columns(x=pl.col("step").cast(pl.Float64).log())
        .with_columns(
            count=pl.col("x").cum_count(reverse=True).over("point_id").cast(pl.Float64),
            last_step=pl.col("step").max().over("point_id"),
            x_last=pl.col("x").max().over("point_id"),
            points=pl.len().over("point_id"),
        )
    )
    passing = (pl.col("step") <= pl.col("last_step") / 2) & (pl.col("count") >= MIN_POINTS) & (pl.col("points") >= MIN_POINTS)
    change_columns = []
    for q in present:
        logarithmic = (pl.col(q).min().over("point_id") > 0)
        y = pl.when(logarithmic).then(pl.col(q).log()).otherwise(pl.col(q))
        rows = rows.with_columns(_y=y, _log=logarithmic)
        rows = rows.with_columns(_window_trend(tolerance))
        p_value = 2.0 * stats.t.sf(rows["_t"].to_numpy(), df=np.maximum(rows["count"].to_numpy() - 2, 1))
        rows = rows.with_columns(pl.Series(f"_p_{q}", np.nan_to_num(p_value, nan=1.0)), pl.col("_change").alias(f"_change_{q}"))
        passing = passing & ((pl.col(f"_change_{q}") < tolerance) | (pl.col(f"_p_{q}") > alpha))
        change_columns.append(f"_change_{q}")

    verdicts = (
        rows.with_columns(_pass=passing, _worst=pl.max_horizontal(change_columns))
        .filter(pl.col("_pass"))
        .group_by("point_id")
        .agg(pl.col("step").first().alias("stationary_from"), pl.col("_worst").first().alias("trend_change"))
    )
    all_points = trajectories.select(pl.col("point_id").unique(maintain_order=True))
    return (
        all_points.join(verdicts, on="point_id", how="left")
        .with_columns(trend_stationary=pl.col("stationary_from").is_not_null())
        .select(
            pl.col("point_id").cast(pl.String),
            pl.col("stationary_from").cast(pl.Int64),
            pl.col("trend_change").cast(pl.Float64),
            pl.col("trend_stationary"),
        )
    )


def _window_trend(tolerance: float) -> list[pl.Expr]:
    """Expressions for the regression of _y on x over each suffix window of its point."""
    def suffix(expr: pl.Expr) -> pl.Expr:
        return expr.cum_sum(reverse=True).over("point_id")

    n = pl.col("count")
    sx, sy = suffix(pl.col("x")), suffix(pl.col("_y"))
    sxx, sxy, syy = suffix(pl.col("x") ** 2), suffix(pl.col("x") * pl.col("_y")), suffix(pl.col("_y") ** 2)
    var_x = sxx - sx * sx / n
    cov = sxy - sx * sy / n
    var_y = syy - sy * sy / n
    slope = cov / var_x
    residual = pl.max_horizontal(var_y - slope * cov, pl.lit(0.0)) / pl.max_horizontal(n - 2, pl.lit(1.0))
    stderr = (residual / var_x).sqrt()
    level = pl.when(pl.col("_log")).then(pl.lit(1.0)).otherwise(pl.max_horizontal((sy / n).abs(), pl.lit(1e-300)))
    t_stat = (
        pl.when(stderr > 0).then(slope.abs() / stderr).when(slope == 0).then(pl.lit(0.0)).otherwise(pl.lit(float("inf")))
    )
    change = (slope.abs() * (pl.col("x_last") - pl.col("x")) / level).fill_nan(0.0)
    return [t_stat.fill_nan(0.0).alias("_t"), change.alias("_change")]
