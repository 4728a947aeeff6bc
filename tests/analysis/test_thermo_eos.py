"""Thermodynamic quantities and fits against the ideal-gas closed forms."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from analysis.eos import fit_equation_of_state, maxwell_quadratic, maxwell_slopes
from analysis.thermo import add_thermodynamics, temperature


@pytest.mark.parametrize(
    "protocol, lr, wd, expected",
    [
        ("elr", 1e-2, 1e-2, 5e-3),  # T = elr sigma^2 / 2
        ("elr", 0.1, 1e-3, 0.05),
        ("lr", 1e-2, 1e-2, 5e-3),  # T = sqrt(lr wd sigma^2 / (2 (d - 1)))
        ("lr", 0.1, 1e-3, 5e-3),  # same lr * wd, same T
        ("sphere", 1e-3, 0.0, 5e-4),
    ],
)
def test_temperature_check_values(protocol, lr, wd, expected):
    assert temperature(protocol, lr, wd, sigma2=1.0, dim=3) == pytest.approx(expected, rel=1e-12)


def _ideal_gas_table(noise_nats: float = 0.0, seed: int = 0) -> pl.DataFrame:
    """Stationary states exactly on the continuous theory for d = 3, sigma = 1, plus optional noise in S."""
    rng = np.random.default_rng(seed)
    rows = []
    for protocol in ("elr", "lr"):
        for lr in np.geomspace(1e-2, 1e-1, 5):
            for wd in np.geomspace(1e-2, 1e-1, 4):
                T = lr / 2 if protocol == "elr" else math.sqrt(lr * wd / 4)
                r2 = 2 * T / wd
                rows.append(_row(protocol, lr, wd, None, T, r2, rng, noise_nats))
    for lr in np.geomspace(1e-3, 1e-1, 4):
        for radius in np.geomspace(0.1, 10, 5):
            T = lr / 2
            rows.append(_row("sphere", lr, 0.0, radius, T, radius**2, rng, noise_nats, lambda_eff=2 * T / radius**2))
    return pl.DataFrame(rows)


def _row(protocol, lr, wd, radius, T, r2, rng, noise_nats, lambda_eff=None):
    return {
        "point_id": f"{protocol}-{lr}-{wd}-{radius}", "protocol": protocol, "lr": lr, "wd": wd, "radius": radius,
        "noise": 1.0, "seed": 0, "dim": 3, "sigma2": 1.0, "loss_min": 0.0, "grad_norm2": 0.0,
        "r": math.sqrt(r2), "r2": r2, "lambda_eff": lambda_eff, "U": T,
        "S_direction": math.log(2 * math.pi * math.e * T) + rng.normal(0, noise_nats) if noise_nats else math.log(2 * math.pi * math.e * T),
        "stationary": True, "diverged": False,
    }


def test_thermodynamics_on_theory_gives_unit_eos_ratio():
    table = add_thermodynamics(_ideal_gas_table())
    assert table["eos_ratio"].to_numpy() == pytest.approx(np.ones(table.height), rel=1e-12)
    sphere = table.filter(pl.col("protocol") == "sphere")
    assert sphere["p"].to_numpy() == pytest.approx(sphere["lambda_eff"].to_numpy())


def test_entropy_closed_forms_per_protocol():
    # Full entropy: elr (d-1)/2 log(2 pi e (d-1) T^2 / wd); lr (d-1)/2 log(pi e lr sigma^2).
    table = add_thermodynamics(_ideal_gas_table())
    for row in table.iter_rows(named=True):
        if row["protocol"] == "elr":
            expected = math.log(2 * math.pi * math.e * 2 * row["T"] ** 2 / row["wd"])
        elif row["protocol"] == "lr":
            expected = math.log(math.pi * math.e * row["lr"])
        else:
            expected = math.log(2 * math.pi * math.e * row["T"]) + 2 * math.log(row["radius"])
        assert row["S"] == pytest.approx(expected, abs=1e-10)


def test_maxwell_slopes_on_theory_match():
    fits = maxwell_slopes(add_thermodynamics(_ideal_gas_table()))
    assert fits["elr"]["dS_dlog_wd_at_fixed_lr"]["slope"] == pytest.approx(-1.0, abs=1e-10)
    assert fits["lr"]["dS_dlog_lr_at_fixed_wd"]["slope"] == pytest.approx(1.0, abs=1e-10)
    assert fits["lr"]["dS_dlog_wd_at_fixed_lr"]["slope"] == pytest.approx(0.0, abs=1e-10)
    assert fits["lr"]["difference"]["slope"] == pytest.approx(1.0, abs=1e-10)
    assert fits["sphere"]["dS_dlog_radius_at_fixed_lr"]["slope"] == pytest.approx(2.0, abs=1e-10)
    assert fits["elr"]["dS_dlog_wd_at_fixed_lr"]["theory"] == -1.0
    assert fits["sphere"]["dS_dlog_radius_at_fixed_lr"]["n_lines"] == 4


def test_maxwell_slope_uncertainty_covers_noise():
    # With 0.05 nats of noise in S, the fitted slopes stay within 4 standard errors of theory.
    fits = maxwell_slopes(add_thermodynamics(_ideal_gas_table(noise_nats=0.05, seed=2)))
    fit = fits["elr"]["dS_dlog_wd_at_fixed_lr"]
    assert fit["slope_sem"] > 0
    assert abs(fit["slope"] + 1.0) < 4 * fit["slope_sem"]


def test_maxwell_detects_wrong_entropy():
    # An entropy that ignores the radius must fail the elr relation: slope 0, not -1.
    table = add_thermodynamics(_ideal_gas_table()).with_columns(S=pl.col("S_direction"))
    fit = maxwell_slopes(table)["elr"]["dS_dlog_wd_at_fixed_lr"]
    assert fit["abs_error"] == pytest.approx(1.0, abs=1e-9)


def test_equation_of_state_fit_reports_errors():
    table = add_thermodynamics(_ideal_gas_table())
    # Push one elr point 10% off the equation of state.
    off = table["point_id"][0]
    table = table.with_columns(
        r2=pl.when(pl.col("point_id") == off).then(pl.col("r2") * 1.1).otherwise(pl.col("r2"))
    )
    fits = fit_equation_of_state(add_thermodynamics(table.drop("T", "p", "V", "S")))
    assert fits["elr"]["continuous_max_abs_rel_error"] == pytest.approx(0.1, rel=1e-9)
    assert fits["elr"]["continuous_median_abs_rel_error"] == pytest.approx(0.0, abs=1e-12)
    assert fits["lr"]["loglog_slope"] == pytest.approx(1.0, abs=1e-9)
    assert fits["lr"]["loglog_r2"] == pytest.approx(1.0, abs=1e-9)


def test_unusable_points_are_left_out():
    table = add_thermodynamics(_ideal_gas_table()).with_columns(
        stationary=pl.when(pl.col("protocol") == "elr").then(False).otherwise(True)
    )
    assert "elr" not in maxwell_slopes(table)
    assert "elr" not in fit_equation_of_state(table)


def test_missing_columns_named():
    with pytest.raises(ValueError, match="S_direction"):
        add_thermodynamics(_ideal_gas_table().drop("S_direction"))


def test_quadratic_maxwell_on_theory():
    # The ideal-gas entropy is linear in (ln lr, ln wd), so the quadratic fit is exact (R^2 = 1),
    # its derivatives equal the relations and the quadratic coefficients vanish.
    fits = maxwell_quadratic(add_thermodynamics(_ideal_gas_table()))
    for protocol, theory in (("elr", -1.0), ("lr", 1.0), ("sphere", 2.0)):
        assert fits[protocol]["r2"] == pytest.approx(1.0, abs=1e-9)
        assert fits[protocol]["theory"] == theory
        assert fits[protocol]["max_rel_error"] < 1e-8
        assert np.abs(fits[protocol]["quadratic_over_half_dof"]).max() < 1e-8


def test_quadratic_maxwell_detects_curvature():
    # An entropy with an extra 0.2 (ln wd)^2 term breaks the elr relation away from ln wd = 0.
    table = add_thermodynamics(_ideal_gas_table()).with_columns(S=pl.col("S") + 0.2 * pl.col("wd").log() ** 2)
    fit = maxwell_quadratic(table)["elr"]
    assert fit["quadratic_over_half_dof"][1] == pytest.approx(0.2, abs=1e-9)
    assert fit["max_rel_error"] > 0.5


def test_quadratic_maxwell_skips_small_grids():
    table = add_thermodynamics(_ideal_gas_table()).filter(pl.col("protocol") != "elr").head(4)
    fits = maxwell_quadratic(table)
    assert "skipped" in fits["lr"]


def test_all_divergent_points_named():
    table = add_thermodynamics(_ideal_gas_table()).with_columns(diverged=pl.lit(True))
    for fit in (fit_equation_of_state, maxwell_slopes, maxwell_quadratic):
        with pytest.raises(ValueError, match=f"of {table.height} points, {table.height} diverged"):
            fit(table)
