"""Stationarity of a trajectory: from which logged step on does it stop trending?

Test: for a candidate start step t0, regress the quantity on ln t over the logged steps t >= t0.
A quantity that is positive throughout is regressed in ln, so that a loss falling by orders of
magnitude shows as the trend it is. The window counts as stationary when the fitted change across
it (|slope| * (ln t_end - ln t0), relative to the mean level for quantities not in ln) is below
`tolerance`, or is not significant at level `alpha` (two-sided t-test on the slope). Replica means logged on a log-spaced schedule are close to independent between
logs once the run mixes, which is what the t-test assumes; the tolerance keeps tiny but
significant drifts from counting as non-stationary. The earliest passing start among the
candidates (each logged step in the first half of the run) is reported, so the window is as long
as the data allow, and windows shorter than `min_points` logs or spanning less than a factor of 2
in t are never accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from analysis.thermo import require_columns

DEFAULT_TOLERANCE = 0.02
DEFAULT_ALPHA = 0.01
MIN_POINTS = 8


@dataclass(frozen=True)
class TrendTest:
    """Outcome of the trend test on one window."""

    start: int
    relative_change: float
    p_value: float
    stationary: bool


def trend_test(steps: np.ndarray, values: np.ndarray, *, tolerance: float = DEFAULT_TOLERANCE, alpha: float = DEFAULT_ALPHA) -> TrendTest:
    """Test one window: values against ln(steps); see the module docstring."""
    x = np.log(steps.astype(np.float64))
    logarithmic = bool(np.all(values > 0))
    fit = stats.linregress(x, np.log(values) if logarithmic else values)
    level = 1.0 if logarithmic else max(abs(float(np.mean(values))), 1e-300)
    change = abs(fit.slope) * (x[-1] - x[0]) / level
    p_value = float(fit.pvalue) if np.isfinite(fit.pvalue) else 0.0
    return TrendTest(int(steps[0]), float(change), p_value, bool(change < tolerance or p_value > alpha))


def stationary_start(
    steps: np.ndarray, values: list[np.ndarray], *, tolerance: float = DEFAULT_TOLERANCE, alpha: float = DEFAULT_ALPHA
) -> TrendTest | None:
    """Return the test of the earliest window start where every quantity passes, or None.

    steps: (n,) logged steps, increasing and positive. values: arrays (n,) of each quantity. All
    candidate windows are regressed at once from suffix sums, one pass per quantity.
    """
    x = np.log(np.asarray(steps, dtype=np.float64))
    n = x.size
    count = np.arange(n, 0, -1, dtype=np.float64)  # points in the window starting at each index
    candidates = (np.asarray(steps) <= steps[-1] / 2) & (count >= MIN_POINTS)
    if not candidates.any():
        return None
    passing = candidates.copy()
    worst_change = np.zeros(n)
    worst_p = np.ones(n)
    for y in values:
        y = np.asarray(y, dtype=np.float64)
        logarithmic = bool(np.all(y > 0))
        change, p_value = _suffix_trends(x, np.log(y) if logarithmic else y, count, relative=not logarithmic)
        ok = (change < tolerance) | (p_value > alpha)
        passing &= ok
        larger = change > worst_change
        worst_change = np.where(larger, change, worst_change)
        worst_p = np.where(larger, p_value, worst_p)
    if not passing.any():
        return None
    index = int(np.argmax(passing))
    return TrendTest(int(steps[index]), float(worst_change[index]), float(worst_p[index]), True)


def _suffix_trends(x: np.ndarray, y: np.ndarray, count: np.ndarray, relative: bool) -> tuple[np.ndarray, np.ndarray]:
    """Fitted change (relative to the mean level if `relative`) and slope p-value of y on x over
    every suffix window x[i:]."""
    def suffix(values: np.ndarray) -> np.ndarray:
        return np.cumsum(values[::-1])[::-1]

    sx, sy = suffix(x), suffix(y)
    sxx, sxy, syy = suffix(x * x), suffix(x * y), suffix(y * y)
    with np.errstate(divide="ignore", invalid="ignore"):
        var_x = sxx - sx * sx / count
        cov_xy = sxy - sx * sy / count
        var_y = syy - sy * sy / count
        slope = cov_xy / var_x
        residual = np.maximum(var_y - slope * cov_xy, 0.0) / np.maximum(count - 2, 1)
        stderr = np.sqrt(residual / var_x)
        t_stat = np.where(stderr > 0, np.abs(slope) / stderr, np.where(slope == 0, 0.0, np.inf))
        level = np.maximum(np.abs(sy / count), 1e-300) if relative else 1.0
        change = np.abs(slope) * (x[-1] - x) / level
    p_value = 2.0 * stats.t.sf(t_stat, df=np.maximum(count - 2, 1))
    return np.nan_to_num(change, nan=0.0), np.nan_to_num(p_value, nan=1.0)


def detect_stationarity(
    trajectories: pl.DataFrame,
    quantities: tuple[str, ...] = ("loss", "radius_norm"),
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    alpha: float = DEFAULT_ALPHA,
) -> pl.DataFrame:
    """Decide per point whether its trajectory became stationary, and from which step.

    trajectories: columns point_id, step and the quantities (a quantity that is absent or entirely
    null is skipped; a quantity that is constant passes). Returns point_id, stationary_from (null
    when never stationary), trend_change (the largest relative change over the accepted window)
    and trend_stationary.
    Raises ValueError when point_id, step or all the quantities are missing.
    """
    require_columns(trajectories, ("point_id", "step"), "detect_stationarity")
    present = [q for q in quantities if q in trajectories.columns and trajectories[q].null_count() < trajectories.height]
    if not present:
        raise ValueError(f"detect_stationarity needs at least one of the columns {', '.join(quantities)} with values")

    rows = []
    for (point_id,), group in trajectories.sort("step").group_by(["point_id"], maintain_order=True):
        group = group.filter(pl.col("step") > 0).drop_nulls(present)
        steps = group["step"].to_numpy()
        result = None
        if len(steps) >= MIN_POINTS and all(np.all(np.isfinite(group[q].to_numpy())) for q in present):
            result = stationary_start(steps, [group[q].to_numpy().astype(np.float64) for q in present], tolerance=tolerance, alpha=alpha)
        rows.append({
            "point_id": point_id,
            "stationary_from": result.start if result else None,
            "trend_change": result.relative_change if result else None,
            "trend_stationary": result is not None,
        })
    return pl.DataFrame(rows, schema={"point_id": pl.String, "stationary_from": pl.Int64, "trend_change": pl.Float64, "trend_stationary": pl.Boolean})
