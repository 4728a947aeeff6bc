"""Regime labels of points: where training settles, diverges, or has not been classified.

Labels:
- `divergent`: the run diverged (non-finite values or a runaway norm).
- `equilibrium`: stationary at a finite loss over the stationary window.
- `unknown`: neither; for example still drifting at the end of the run.

NOTE: `converged` (loss and gradient still falling along log-time) and the boundaries between
regimes need a trajectory-based test and are not labelled yet.
"""

from __future__ import annotations

import polars as pl

from analysis.thermo import require_columns

REGIMES = ("converged", "equilibrium", "divergent", "unknown")


def label_regimes(points: pl.DataFrame) -> pl.DataFrame:
    """Add a `regime` column from the `diverged` and `stationary` columns."""
    require_columns(points, ("diverged", "stationary"), "label_regimes")
    regime = (
        pl.when(pl.col("diverged").fill_null(False))
        .then(pl.lit("divergent"))
        .when(pl.col("stationary").fill_null(False))
        .then(pl.lit("equilibrium"))
        .otherwise(pl.lit("unknown"))
    )
    return points.with_columns(regime=regime)
