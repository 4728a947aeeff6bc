"""The collapse of elr states across weight decays."""

from __future__ import annotations

import polars as pl
import pytest

from analysis.eos import elr_collapse


def test_elr_collapse_of_ideal_states():
    # Ideal elr states: U, sigma2 and T depend on lr only, so every spread across wd is 0 and T
    # rises with lr. A wd-dependent U gives a spread equal to the injected (max - min) / mean.
    rows = []
    for lr in (1e-3, 2e-3, 4e-3):
        for wd in (1e-3, 1e-2):
            sigma2 = 0.5
            T = lr * sigma2 / 2
            rows.append(dict(protocol="elr", lr=lr, wd=wd, U=10 * T, sigma2=sigma2, T=T, r2=1000 * T / wd, p=wd, S=0.0,
                             stationary=True, diverged=False, noise=0.0))
    ideal = elr_collapse(pl.DataFrame(rows))
    assert ideal["U_max_range_rel"] == pytest.approx(0.0, abs=1e-12)
    assert ideal["T_increases_with_lr"] is True
    assert "sigma2_minibatch_max_range_rel" not in ideal

    skewed = pl.DataFrame(rows).with_columns(U=pl.when(pl.col("wd") == 1e-2).then(pl.col("U") * 1.1).otherwise(pl.col("U")))
    assert elr_collapse(skewed)["U_median_range_rel"] == pytest.approx(0.1 / 1.05, rel=1e-9)


def test_elr_collapse_needs_usable_points():
    frame = pl.DataFrame(dict(protocol=["lr"], lr=[0.1], wd=[0.1], U=[1.0], sigma2=[1.0], T=[0.1], r2=[1.0], p=[0.1], S=[0.0],
                              stationary=[True], diverged=[False]))
    with pytest.raises(ValueError, match="no usable elr point"):
        elr_collapse(frame)
