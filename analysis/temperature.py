"""Temperature of SGD from free-energy minimisation across learning rates.

At a fixed learning rate eta the stationary state minimises F = U - T S over the states SGD can
reach, for some temperature T(eta). Given the stationary (U_i, S_i) of a grid of learning rates, state i is the
minimum of F among all observed states exactly for T in an interval [T_min, T_max]: the slopes of
the supporting lines of the curve S -> U at point i (its Legendre dual). Units: T in loss units
when U is in loss units and S in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy import stats

from analysis.thermo import require_columns

# Default smoothing half-width in ln(lr), in grid spacings. The reference analysis used 0.3 on a grid
# of 14 points per decade (spacing 0.16), which is about two spacings. A coarser grid needs a wider
# kernel for the same effect, so the default scales with the grid.
DEFAULT_HALF_WIDTH_SPACINGS = 2.0
DEFAULT_SLACK = 0.0  # epsilon: how much higher than the minimum F a state may be


def smoothing_matrix(lr: np.ndarray, half_width: float) -> np.ndarray:
    """Row-normalised triangular kernel K_ij ∝ max(h - |ln lr_i - ln lr_j|, 0); endpoints unsmoothed.

    half_width 0 returns the identity (no smoothing).
    """
    n = lr.size
    if half_width <= 0 or n < 3:
        return np.eye(n)
    distance = np.abs(np.log(lr)[:, None] - np.log(lr)[None, :])
    kernel = np.maximum(half_width - distance, 0.0)
    kernel /= kernel.sum(axis=1, keepdims=True)
    kernel[0] = np.eye(n)[0]
    kernel[-1] = np.eye(n)[-1]
    return kernel


def free_energy_temperatures(
    frame: pl.DataFrame, *, half_width: float | None = None, slack: float = DEFAULT_SLACK
) -> pl.DataFrame:
    """Return, per learning rate, the interval of T where its state minimises F = U - T S.

    frame: one row per learning rate with columns lr, U and S (stationary means). half_width: the
    smoothing kernel's half-width in ln(lr); None uses two median grid spacings, 0 disables
    smoothing. slack: the epsilon of F_i <= F_j + epsilon, in loss units. Steps:
    sort by lr; smooth U and S across learning rates with `smoothing_matrix`; for every pair
    (i, j) require F_i <= F_j + slack, which bounds T from above when S_j > S_i and from below when
    S_j < S_i; an endpoint with a bound on one side only copies it to the other side.

    Returns lr, U_smooth, S_smooth, T_min, T_max, T (the geometric mean sqrt(T_min T_max), null
    when the interval is empty or unbounded) and feasible (T_min <= T_max).
    Raises ValueError for missing columns, fewer than 3 learning rates, repeated or non-positive
    learning rates, or non-finite U or S.
    """
    require_columns(frame, ("lr", "U", "S"), "free_energy_temperatures")
    rows = frame.select("lr", "U", "S").sort("lr")
    lr = rows["lr"].to_numpy().astype(np.float64)
    U = rows["U"].to_numpy().astype(np.float64)
    S = rows["S"].to_numpy().astype(np.float64)
    if lr.size < 3:
        raise ValueError(f"free-energy temperatures need at least 3 learning rates with stationary states, got {lr.size}")
    if np.any(lr <= 0) or np.unique(lr).size != lr.size:
        raise ValueError("learning rates must be positive and distinct; average repeated learning rates (seeds) first")
    if not (np.all(np.isfinite(U)) and np.all(np.isfinite(S))):
        raise ValueError("U and S must be finite; drop divergent and non-stationary points first")

    if half_width is None:
        half_width = DEFAULT_HALF_WIDTH_SPACINGS * float(np.median(np.diff(np.log(lr))))
    kernel = smoothing_matrix(lr, half_width)
    U_s, S_s = kernel @ U, kernel @ S
    T_min = np.zeros(lr.size)
    T_max = np.full(lr.size, np.inf)
    feasible = np.ones(lr.size, dtype=bool)
    for i in range(lr.size):
        for j in range(lr.size):
            if i == j:
                continue
            dS = S_s[j] - S_s[i]
            dU = U_s[j] - U_s[i] + slack
            if dS > 0:
                T_max[i] = min(T_max[i], dU / dS)
            elif dS < 0:
                T_min[i] = max(T_min[i], dU / dS)
            elif dU < 0:
                feasible[i] = False
    lower_only = (T_max == np.inf) & (T_min > 0)
    upper_only = (T_min == 0) & np.isfinite(T_max)
    T_max[lower_only] = T_min[lower_only]
    T_min[upper_only] = T_max[upper_only]
    feasible &= T_min <= T_max
    with np.errstate(invalid="ignore"):
        T = np.where(feasible & np.isfinite(T_max) & (T_min > 0), np.sqrt(T_min * T_max), np.nan)
    return pl.DataFrame(
        {"lr": lr, "U_smooth": U_s, "S_smooth": S_s, "T_min": T_min, "T_max": np.where(np.isfinite(T_max), T_max, np.nan),
         "T": T, "feasible": feasible}
    ).with_columns([pl.col(c).fill_nan(None) for c in ("T", "T_max")])


@dataclass(frozen=True)
class PowerLaw:
    """T ≈ b · lr^k, fitted in log-log by least squares, with 95% confidence intervals."""

    b: float
    k: float
    b_interval: tuple[float, float]
    k_interval: tuple[float, float]
    r2: float
    n: int

    def __call__(self, lr: np.ndarray | float) -> np.ndarray:
        return self.b * np.asarray(lr) ** self.k


def fit_power_law(lr: np.ndarray, T: np.ndarray, confidence: float = 0.95) -> PowerLaw:
    """Fit ln T = ln b + k ln lr by ordinary least squares; intervals from Student's t.

    Raises ValueError with fewer than 3 positive, finite pairs.
    """
    lr = np.asarray(lr, dtype=np.float64)
    T = np.asarray(T, dtype=np.float64)
    keep = np.isfinite(lr) & np.isfinite(T) & (lr > 0) & (T > 0)
    if keep.sum() < 3:
        raise ValueError(f"a power-law fit needs at least 3 positive (lr, T) pairs, got {int(keep.sum())}")
    x, y = np.log(lr[keep]), np.log(T[keep])
    fit = stats.linregress(x, y)
    n = int(keep.sum())
    t = stats.t.ppf(0.5 + confidence / 2, df=n - 2) if n > 2 else math.inf
    k_half = t * fit.stderr
    ln_b_half = t * fit.intercept_stderr
    return PowerLaw(
        b=float(math.exp(fit.intercept)),
        k=float(fit.slope),
        b_interval=(float(math.exp(fit.intercept - ln_b_half)), float(math.exp(fit.intercept + ln_b_half))),
        k_interval=(float(fit.slope - k_half), float(fit.slope + k_half)),
        r2=float(fit.rvalue**2),
        n=n,
    )


def trajectory_temperature(trajectory: pl.DataFrame, *, offset: int = 2, smoothing: float = 0.0) -> pl.DataFrame:
    """Estimate T(t) = dU/dS along one trajectory, for points that never become stationary.

    trajectory: columns step, loss and S_direction (the entropy at each logged step), logged on a
    log-spaced schedule. T(t_i) = (U_{i+offset} - U_{i-offset}) / (S_{i+offset} - S_{i-offset})
    over logged indices. `smoothing` > 0 first smooths U and S with a Gaussian kernel of that width
    in ln t. Returns step and T_trajectory (null where S does not change).
    """
    require_columns(trajectory, ("step", "loss", "S_direction"), "trajectory_temperature")
    rows = trajectory.select("step", "loss", "S_direction").drop_nulls().sort("step")
    rows = rows.filter(pl.col("step") > 0)
    if rows.height < 2 * offset + 1:
        raise ValueError(f"a trajectory temperature needs at least {2 * offset + 1} logged steps with entropy, got {rows.height}")
    steps = rows["step"].to_numpy().astype(np.float64)
    U = rows["loss"].to_numpy().astype(np.float64)
    S = rows["S_direction"].to_numpy().astype(np.float64)
    if smoothing > 0:
        log_t = np.log(steps)
        weights = np.exp(-0.5 * ((log_t[:, None] - log_t[None, :]) / smoothing) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        U, S = weights @ U, weights @ S
    dU = U[2 * offset :] - U[: -2 * offset]
    dS = S[2 * offset :] - S[: -2 * offset]
    with np.errstate(divide="ignore", invalid="ignore"):
        T = np.where(dS != 0, dU / dS, np.nan)
    return pl.DataFrame({"step": rows["step"][offset:-offset], "T_trajectory": T}).with_columns(pl.col("T_trajectory").fill_nan(None))
