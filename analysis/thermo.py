"""Temperature, pressure, volume and entropy of stationary states, per protocol.

Conventions: time in SGD steps, T in loss units, entropies in nats, natural logs. `lr` is the
effective learning rate elr = lr_t / ||w||^2 under `sphere` and `elr`, and the plain step under `lr`.

| protocol | T                                | p          | V      |
|----------|----------------------------------|------------|--------|
| sphere   | elr sigma^2 / 2                  | lambda_eff | r^2/2  |
| elr      | elr sigma^2 / 2                  | wd         | r^2/2  |
| lr       | sqrt(lr wd sigma^2 / (2 (d-1)))  | wd         | r^2/2  |

S = S_direction + (d - 1) log r: the direction's entropy on the unit sphere plus the log of the
surface-area factor of a radius-r sphere.
"""

from __future__ import annotations

import numpy as np
import polars as pl

REQUIRED = ("protocol", "lr", "wd", "sigma2", "dim", "r", "r2", "S_direction")


def require_columns(frame: pl.DataFrame, columns: tuple[str, ...] | list[str], caller: str) -> None:
    """Raise ValueError naming the columns `caller` needs and the frame lacks."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{caller} needs columns {', '.join(missing)}, which the table does not have; present: {', '.join(frame.columns)}")


def temperature(protocol: str, lr: float, wd: float, sigma2: float, dim: int) -> float:
    """Return T (loss units) of the stationary state from hyperparameters and sigma^2 (continuous theory)."""
    if protocol in ("sphere", "elr"):
        return lr * sigma2 / 2.0
    if protocol == "lr":
        return float(np.sqrt(lr * wd * sigma2 / (2.0 * (dim - 1))))
    raise ValueError(f"unknown protocol {protocol!r}; allowed: sphere, elr, lr")


def add_thermodynamics(points: pl.DataFrame) -> pl.DataFrame:
    """Add T, p, V, S and the closed-form predictions to a table of stationary summaries.

    Adds: T, p, V, S, U_theory (loss_min + (d-1) T / 2, equipartition), S_direction_theory
    ((d-1)/2 log(2 pi e T), the small-T Gaussian form), r2_theory ((d-1) T / p, the continuous
    equation of state; for sphere the imposed radius^2), eos_ratio (p r2 / ((d-1) T)) and
    eos_ratio_discrete (p r2 over the discrete-step prediction, which adds ||grad L(w_bar)||^2 to
    tr Sigma and, for elr and lr, includes the (1 - lr_t wd)^2 shrink factor).
    """
    require_columns(points, REQUIRED, "add_thermodynamics")
    dof = pl.col("dim") - 1
    sigma2 = pl.col("sigma2")
    lr, wd = pl.col("lr"), pl.col("wd")
    protocol = pl.col("protocol")

    T = (
        pl.when(protocol == "lr")
        .then((lr * wd * sigma2 / (2.0 * dof)).sqrt())
        .otherwise(lr * sigma2 / 2.0)
    )
    lambda_eff = pl.col("lambda_eff") if "lambda_eff" in points.columns else pl.lit(None, dtype=pl.Float64)
    p = pl.when(protocol == "sphere").then(lambda_eff).otherwise(wd)
    loss_min = pl.col("loss_min") if "loss_min" in points.columns else pl.lit(0.0)
    grad2 = pl.col("grad_norm2") if "grad_norm2" in points.columns else pl.lit(0.0)

    frame = points.with_columns(
        T=T,
        p=p,
        V=pl.col("r2") / 2.0,
        S=pl.col("S_direction") + dof * pl.col("r").log(),
    )
    # Discrete-step prediction of p r^2, from the radial recursion with ||grad||^2 kept:
    # elr/sphere: elr (tr Sigma + ||grad||^2) / 2; lr: sqrt(lr p (tr Sigma + ||grad||^2) / 2).
    # The exact shrink factor (1 - lr_t p)^2 divides elr by (1 - lr_t p / 2) and lr by its root.
    noise_plus_grad = sigma2 * dof + grad2
    lr_step_times_p = pl.when(protocol == "elr").then(pl.col("lr") * pl.col("r2") * pl.col("p")).otherwise(lr * pl.col("p"))
    discrete = (
        pl.when(protocol == "lr")
        .then((lr * pl.col("p") * noise_plus_grad / 2.0 / (1.0 - lr_step_times_p / 2.0)).sqrt())
        .when(protocol == "elr")
        .then(lr * noise_plus_grad / 2.0 / (1.0 - lr_step_times_p / 2.0))
        .otherwise(lr * noise_plus_grad / 2.0)
    )
    frame = frame.with_columns(
        U_theory=loss_min + dof * pl.col("T") / 2.0,
        S_direction_theory=dof / 2.0 * (2.0 * np.pi * np.e * pl.col("T")).log(),
        r2_theory=pl.when(protocol == "sphere").then(pl.col("radius") ** 2).otherwise(dof * pl.col("T") / pl.col("p")),
        eos_ratio=pl.col("p") * pl.col("r2") / (dof * pl.col("T")),
        eos_ratio_discrete=pl.col("p") * pl.col("r2") / discrete,
    )
    return frame.with_columns(
        [pl.when(pl.col(c).is_nan()).then(None).otherwise(pl.col(c)).alias(c) for c in ("T", "p", "V", "S", "eos_ratio", "eos_ratio_discrete")]
    )
