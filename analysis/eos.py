"""Equation-of-state and Maxwell-relation fits over a table of stationary states.

The ideal-gas equation of state of SGD on scale-invariant weights is p V = (d - 1) T / 2, that is
p r^2 = (d - 1) T, with p = wd (elr, lr) or the measured effective weight decay (sphere). The
Maxwell relations it implies, with S in nats and natural logs:

| protocol | slope                          | theory     |
|----------|--------------------------------|------------|
| elr      | dS/d log wd at fixed lr (elr)  | -(d - 1)/2 |
| lr       | dS/d log lr at fixed wd        | (d - 1)/2  |
| lr       | dS/d log wd at fixed lr        | 0          |
| sphere   | dS/d log radius at fixed lr    | d - 1      |

Only stationary, non-diverged points with finite values enter a fit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from analysis.thermo import require_columns

# Slopes fitted per protocol: (name, x axis, axis held fixed, theory as a multiple of d - 1).
MAXWELL_RELATIONS: dict[str, tuple[tuple[str, str, str, float], ...]] = {
    "elr": (("dS_dlog_wd_at_fixed_lr", "wd", "lr", -0.5),),
    "lr": (("dS_dlog_lr_at_fixed_wd", "lr", "wd", 0.5), ("dS_dlog_wd_at_fixed_lr", "wd", "lr", 0.0)),
    "sphere": (("dS_dlog_radius_at_fixed_lr", "radius", "lr", 1.0),),
}
MIN_LINE_POINTS = 3


def usable_points(points: pl.DataFrame, *, need_entropy: bool = True) -> pl.DataFrame:
    """Return the rows that may enter a fit: stationary, not diverged, T > 0, finite r2 and p, and
    (when `need_entropy`) a finite S."""
    require_columns(points, ("stationary", "diverged", "S", "T", "r2", "p"), "fits")
    condition = (
        pl.col("stationary").fill_null(False)
        & ~pl.col("diverged").fill_null(True)
        & pl.col("T").is_finite().fill_null(False)
        & (pl.col("T") > 0).fill_null(False)
        & pl.col("r2").is_finite().fill_null(False)
        & pl.col("p").is_finite().fill_null(False)
    )
    if need_entropy:
        condition = condition & pl.col("S").is_finite().fill_null(False)
    return points.filter(condition)


def require_usable(points: pl.DataFrame, *, need_entropy: bool = True) -> pl.DataFrame:
    """Return the usable rows; raises ValueError counting why none are left when that happens."""
    usable = usable_points(points, need_entropy=need_entropy)
    if usable.height == 0:
        diverged = int(points["diverged"].fill_null(True).sum())
        not_stationary = int((~points["stationary"].fill_null(False)).sum())
        no_temperature = int((~(pl.Series(points["T"].fill_null(0.0) > 0))).sum())
        no_entropy = int((~points["S"].is_finite().fill_null(False)).sum()) if need_entropy else 0
        raise ValueError(
            f"no point can enter a fit: of {points.height} points, {diverged} diverged, {not_stationary} are not stationary, "
            f"{no_temperature} have no temperature (T needs sigma2 and, for lr, dim)"
            + (f" and {no_entropy} have no entropy S" if need_entropy else "")
            + "; supply the missing columns, lengthen the runs or move the grid into the equilibrium regime"
        )
    return usable


def fit_equation_of_state(points: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Compare p r^2 with (d - 1) T per protocol, with the continuous and discrete predictions.

    Returns per protocol: n; median, mean and max of |p r^2 / ((d - 1) T) - 1| (continuous) and of
    the discrete-step ratio; and a least-squares line log(p r^2) = a + b log((d - 1) T) with b, its
    standard error and R^2 (theory: b = 1, a = 0). The entropy is not needed. Raises ValueError when
    no point is usable.
    """
    usable = require_usable(points, need_entropy=False)
    out: dict[str, dict[str, Any]] = {}
    for protocol in sorted(usable["protocol"].unique().to_list()):
        rows = usable.filter(pl.col("protocol") == protocol)
        if rows.height == 0:
            continue
        ratio = rows["eos_ratio"].to_numpy()
        result: dict[str, Any] = {"n": rows.height, **_error_stats(ratio, "continuous")}
        if "eos_ratio_discrete" in rows.columns:
            result.update(_error_stats(rows["eos_ratio_discrete"].to_numpy(), "discrete"))
        x = np.log((rows["dim"] - 1).to_numpy() * rows["T"].to_numpy())
        y = np.log(rows["p"].to_numpy() * rows["r2"].to_numpy())
        if rows.height >= 3 and np.ptp(x) > 0:
            fit = stats.linregress(x, y)
            result.update(
                loglog_slope=float(fit.slope),
                loglog_slope_stderr=float(fit.stderr),
                loglog_intercept=float(fit.intercept),
                loglog_r2=float(fit.rvalue**2),
            )
        out[protocol] = result
    return out


def _error_stats(ratio: np.ndarray, label: str) -> dict[str, float | None]:
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size == 0:
        return {f"{label}_median_abs_rel_error": None, f"{label}_max_abs_rel_error": None, f"{label}_mean_ratio": None}
    error = np.abs(ratio - 1.0)
    return {
        f"{label}_median_abs_rel_error": float(np.median(error)),
        f"{label}_max_abs_rel_error": float(np.max(error)),
        f"{label}_mean_ratio": float(np.mean(ratio)),
    }


def maxwell_slopes(points: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Fit S linearly in log x along every grid line where the other axis is fixed.

    A line is the set of usable points sharing protocol, dim, noise, seed and the fixed axis; lines
    with fewer than 3 points are skipped. Returns, per protocol and relation: the mean slope over
    lines, its standard deviation across lines and standard error of the mean, the mean of the
    per-line least-squares standard errors, the number of lines, the theory value, and the
    per-line slopes. Raises ValueError when no point is usable.
    """
    usable = require_usable(points)
    out: dict[str, dict[str, Any]] = {}
    for protocol, relations in MAXWELL_RELATIONS.items():
        rows = usable.filter(pl.col("protocol") == protocol)
        if rows.height == 0:
            continue
        out[protocol] = {}
        for name, x_axis, fixed_axis, multiple in relations:
            out[protocol][name] = _fit_lines(rows, x_axis, fixed_axis, multiple)
        if protocol == "lr":
            along_lr = out[protocol]["dS_dlog_lr_at_fixed_wd"]
            along_wd = out[protocol]["dS_dlog_wd_at_fixed_lr"]
            if along_lr["slope"] is not None and along_wd["slope"] is not None:
                out[protocol]["difference"] = {
                    "slope": along_lr["slope"] - along_wd["slope"],
                    "slope_sem": math.hypot(along_lr["slope_sem"] or 0.0, along_wd["slope_sem"] or 0.0),
                    "theory": along_lr["theory"],
                }
    return out


def _fit_lines(rows: pl.DataFrame, x_axis: str, fixed_axis: str, multiple: float) -> dict[str, Any]:
    keys = [c for c in ("dim", "noise", "seed", fixed_axis) if c in rows.columns]
    slopes: list[float] = []
    stderrs: list[float] = []
    lines: list[dict[str, Any]] = []
    dims = {int(d) for d in rows["dim"].unique().to_list()}
    rows = rows.filter(pl.col(x_axis) > 0)  # log axes: wd = 0 (no weight decay) cannot enter
    for key, line in rows.group_by(keys, maintain_order=True):
        line = line.sort(x_axis)
        x = np.log(line[x_axis].to_numpy().astype(np.float64))
        if line.height < MIN_LINE_POINTS or np.ptp(x) == 0:
            continue
        fit = stats.linregress(x, line["S"].to_numpy())
        slopes.append(float(fit.slope))
        stderrs.append(float(fit.stderr))
        lines.append({**dict(zip(keys, key)), "slope": float(fit.slope), "stderr": float(fit.stderr), "n": line.height})

    theory = multiple * (dims.pop() - 1) if len(dims) == 1 else None
    if not slopes:
        return {
            "slope": None, "slope_std": None, "slope_sem": None, "n_lines": 0, "theory": theory, "lines": [],
            "skipped": f"no line of at least {MIN_LINE_POINTS} usable points along {x_axis} with {fixed_axis} fixed",
        }
    values = np.array(slopes)
    spread = float(values.std(ddof=1)) if values.size > 1 else None
    return {
        "slope": float(values.mean()),
        "slope_std": spread,
        "slope_sem": spread / math.sqrt(values.size) if spread is not None else float(stderrs[0]),
        "line_stderr_mean": float(np.mean(stderrs)),
        "n_lines": int(values.size),
        "theory": theory,
        "abs_error": abs(float(values.mean()) - theory) if theory is not None else None,
        "lines": lines,
    }


def closed_form_agreement(points: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Compare U and S_direction with the small-T closed forms, per protocol.

    Returns the median relative error of U - loss_min against (d - 1) T / 2 and the median
    absolute error (nats) of S_direction against (d - 1)/2 log(2 pi e T). Raises ValueError when
    no point is usable.
    """
    usable = require_usable(points)
    out: dict[str, dict[str, Any]] = {}
    for protocol in sorted(usable["protocol"].unique().to_list()):
        rows = usable.filter(pl.col("protocol") == protocol)
        loss_min = rows["loss_min"].fill_null(0.0).to_numpy() if "loss_min" in rows.columns else 0.0
        u_error = np.abs((rows["U"].to_numpy() - loss_min) / (rows["U_theory"].to_numpy() - loss_min) - 1.0)
        s_error = np.abs(rows["S_direction"].to_numpy() - rows["S_direction_theory"].to_numpy())
        out[protocol] = {
            "n": rows.height,
            "U_median_rel_error": float(np.median(u_error)),
            "S_direction_median_abs_error": float(np.median(s_error)),
        }
    return out


# Quadratic-fit Maxwell checks: (protocol, y axis, derivative compared, theory as a multiple of
# d - 1). "y" is dS/dy, "x_minus_y" is dS/dx - dS/dy, with x = ln lr.
QUADRATIC_RELATIONS = {"elr": ("wd", "y", -0.5), "lr": ("wd", "x_minus_y", 0.5), "sphere": ("radius", "y", 1.0)}


def maxwell_quadratic(points: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Fit S = a0 + a1 x + a2 y + a3 x^2 + a4 y^2 + a5 x y per protocol and compare derivatives.

    x = ln lr; y = ln wd (elr, lr) or ln radius (sphere). Raw entropy of a network is too noisy to
    difference, so the smooth fit is differentiated instead: dS/dx = a1 + 2 a3 x + a5 y and
    dS/dy = a2 + 2 a4 y + a5 x, evaluated at every usable point and compared with the relation of
    the protocol (elr: dS/dy = -(d-1)/2; lr: dS/dx - dS/dy = (d-1)/2; sphere: dS/dy = d - 1).
    Returns per protocol: the coefficients, R^2, the theory value, the mean derivative, the maximum
    relative error of the derivative over the points, and the quadratic coefficients divided by
    (d-1)/2. A protocol with fewer than 6 usable points or a single dim value is skipped with the
    reason. Raises ValueError when no point is usable.
    """
    usable = require_usable(points)
    out: dict[str, dict[str, Any]] = {}
    for protocol, (y_axis, derivative, multiple) in QUADRATIC_RELATIONS.items():
        rows = usable.filter((pl.col("protocol") == protocol) & (pl.col(y_axis) > 0))
        if rows.height == 0:
            continue
        dims = rows["dim"].unique().to_list()
        if rows.height < 6 or len(dims) != 1:
            out[protocol] = {"skipped": f"needs at least 6 usable points of one dimension, got {rows.height} points, dims {dims}"}
            continue
        x = np.log(rows["lr"].to_numpy().astype(np.float64))
        y = np.log(rows[y_axis].to_numpy().astype(np.float64))
        S = rows["S"].to_numpy()
        design = np.column_stack([np.ones_like(x), x, y, x * x, y * y, x * y])
        if np.linalg.matrix_rank(design) < 6:
            out[protocol] = {"skipped": "the grid does not vary both axes enough for a quadratic fit (rank < 6)"}
            continue
        coefficients, *_ = np.linalg.lstsq(design, S, rcond=None)
        a0, a1, a2, a3, a4, a5 = coefficients
        fitted = design @ coefficients
        r2 = 1.0 - float(np.sum((S - fitted) ** 2) / max(np.sum((S - S.mean()) ** 2), 1e-300))
        dS_dx = a1 + 2 * a3 * x + a5 * y
        dS_dy = a2 + 2 * a4 * y + a5 * x
        value = dS_dy if derivative == "y" else dS_dx - dS_dy
        dof = dims[0] - 1
        theory = multiple * dof
        out[protocol] = {
            "n": rows.height,
            "coefficients": [float(c) for c in coefficients],
            "r2": r2,
            "relation": "dS/dlog_" + y_axis if derivative == "y" else "dS/dlog_lr - dS/dlog_wd",
            "theory": theory,
            "mean_derivative": float(np.mean(value)),
            "max_rel_error": float(np.max(np.abs(value - theory)) / abs(theory)),
            "quadratic_over_half_dof": [float(c / (dof / 2)) for c in (a3, a4, a5)],
        }
    return out


def quadratic_entropy_residuals(points: pl.DataFrame) -> pl.DataFrame:
    """Residual S - S_fit of every usable point from its protocol's quadratic fit (nats).

    Returns point_id and S_quadratic_residual; protocols that `maxwell_quadratic` skips are absent.
    """
    usable = usable_points(points)
    frames = []
    for protocol, (y_axis, _, _) in QUADRATIC_RELATIONS.items():
        rows = usable.filter((pl.col("protocol") == protocol) & (pl.col(y_axis) > 0))
        if rows.height < 6 or rows["dim"].n_unique() != 1:
            continue
        x = np.log(rows["lr"].to_numpy().astype(np.float64))
        y = np.log(rows[y_axis].to_numpy().astype(np.float64))
        design = np.column_stack([np.ones_like(x), x, y, x * x, y * y, x * y])
        if np.linalg.matrix_rank(design) < 6:
            continue
        coefficients, *_ = np.linalg.lstsq(design, rows["S"].to_numpy(), rcond=None)
        frames.append(pl.DataFrame({"point_id": rows["point_id"], "S_quadratic_residual": rows["S"].to_numpy() - design @ coefficients}))
    if not frames:
        return pl.DataFrame(schema={"point_id": pl.String, "S_quadratic_residual": pl.Float64})
    return pl.concat(frames)


COLLAPSE_QUANTITIES = ("U", "sigma2", "T")


def elr_collapse(points: pl.DataFrame) -> dict[str, Any]:
    """Under `elr`, U, sigma2 and T should depend on the effective LR only, not on wd.

    For each effective LR with at least two usable points (stationary, not diverged, finite T),
    reports each quantity's spread across wd: (max - min) / mean and the coefficient of variation.
    With injected noise (a `noise` column above 0) the minibatch part sigma2 - noise^2 is reported
    as `sigma2_minibatch` too, since the injected part is the same for every point by construction.
    Also whether T increases with the effective LR (the medians per LR, in LR order) and the
    Spearman rank correlation of T with LR over all usable points. Raises ValueError when no
    `elr` point is usable.
    """
    require_columns(points, ("protocol", "lr", "wd", *COLLAPSE_QUANTITIES), "elr_collapse")
    usable = usable_points(points.filter(pl.col("protocol") == "elr"), need_entropy=False)
    if usable.height == 0:
        raise ValueError("no usable elr point: the collapse across weight decays needs stationary elr points")
    quantities = COLLAPSE_QUANTITIES
    if "noise" in usable.columns and usable["noise"].fill_null(0.0).max() > 0:
        # With injected noise, sigma2 = noise^2 + the measured minibatch part; report that part too.
        usable = usable.with_columns(sigma2_minibatch=pl.col("sigma2") - pl.col("noise").fill_null(0.0) ** 2)
        quantities = (*COLLAPSE_QUANTITIES, "sigma2_minibatch")
    lines: list[dict[str, Any]] = []
    for (lr,), rows in sorted(usable.group_by(["lr"]), key=lambda item: item[0][0]):
        entry: dict[str, Any] = {"lr": float(lr), "n": rows.height, "wd": sorted(rows["wd"].to_list())}
        for name in quantities:
            values = rows[name].to_numpy().astype(float)
            mean = float(np.mean(values))
            entry[f"{name}_mean"] = mean
            if rows.height >= 2 and mean != 0:
                entry[f"{name}_range_rel"] = float(np.ptp(values) / abs(mean))
                entry[f"{name}_cv"] = float(np.std(values, ddof=1) / abs(mean))
        lines.append(entry)
    compared = [line for line in lines if line["n"] >= 2]
    summary: dict[str, Any] = {"n_points": usable.height, "n_lr": len(lines), "per_lr": lines}
    for name in quantities:
        spreads = [line[f"{name}_range_rel"] for line in compared if f"{name}_range_rel" in line]
        summary[f"{name}_median_range_rel"] = float(np.median(spreads)) if spreads else None
        summary[f"{name}_max_range_rel"] = float(np.max(spreads)) if spreads else None
    medians = [float(np.median(usable.filter(pl.col("lr") == line["lr"])["T"].to_numpy())) for line in lines]
    # Null when fewer than two effective LRs leave nothing to compare.
    summary["T_increases_with_lr"] = bool(all(b > a for a, b in zip(medians, medians[1:]))) if len(medians) >= 2 else None
    if usable.height >= 3:
        rho = stats.spearmanr(usable["lr"].to_numpy(), usable["T"].to_numpy())
        summary["T_lr_spearman"] = float(rho.statistic)
        summary["T_lr_spearman_p"] = float(rho.pvalue)
    return summary
