"""Temperature from free-energy minimisation, against the isotropic model's closed form."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from analysis.temperature import fit_power_law, free_energy_temperatures, smoothing_matrix, trajectory_temperature


def _ideal_curve(lr: np.ndarray) -> pl.DataFrame:
    # Isotropic model on the unit sphere, d = 3, sigma = 1: T = lr/2, U = T, S = log(2 pi e T).
    T = lr / 2
    return pl.DataFrame({"lr": lr, "U": T, "S": np.log(2 * np.pi * np.e * T)})


def test_exact_curve_recovers_temperature():
    # On a geometric grid with ratio q the supporting-line slopes are logarithmic means of the
    # neighbouring T, so their geometric mean is T * sqrt((q-1)^2 / (q ln^2 q)): 0.7% high at q = 1.5.
    lr = 0.01 * 1.5 ** np.arange(10)
    result = free_energy_temperatures(_ideal_curve(lr), half_width=0.0)
    interior = result[1:-1]
    assert interior["feasible"].all()
    assert interior["T"].to_numpy() == pytest.approx(interior["lr"].to_numpy() / 2, rel=0.01)
    assert (interior["T_min"] <= interior["T"]).all()
    assert (interior["T"] <= interior["T_max"]).all()


def test_endpoints_copy_the_one_sided_bound():
    lr = 0.01 * 1.5 ** np.arange(6)
    result = free_energy_temperatures(_ideal_curve(lr), half_width=0.0)
    assert result["T_min"][0] == result["T_max"][0]
    assert result["T_min"][-1] == result["T_max"][-1]


def test_isotropic_sweep_temperature_matches_theory():
    # Stationary U and S measured by the isotropic kind on the unit sphere (256 replicas, 5000
    # steps) for 10 learning rates. T recovered from U and S alone, with the default smoothing over
    # about two grid spacings, must match lr/2: the estimator spread of S (about 0.03 nats) over
    # steps of 0.33 in ln lr limits each interior estimate to about 15%; tolerance 25% on each
    # interior point and 10% on the median ratio.
    from phases.grid import chunk, expand
    from phases.spec import load
    from phases.trials import TrialContext, get_kind

    spec = load({"name": "t", "kind": "isotropic", "steps": 5000, "replicas": 256, "chunk_size": 100,
                 "entropy": {"snapshots": 8},
                 "grids": [{"protocol": "sphere", "axes": {"lr": {"log": [5e-3, 0.1, 10]}, "radius": [1.0]}}]})
    part = chunk(expand(spec), 100)[0]
    result = get_kind("isotropic").run(part, TrialContext(spec))
    frame = pl.DataFrame(
        [{"lr": p.coords["lr"], "U": result.summaries[p.point_id]["U"], "S": result.summaries[p.point_id]["S_direction"]}
         for p in part.points]
    )
    temperatures = free_energy_temperatures(frame)[1:-1]
    ratio = temperatures["T"].to_numpy() / (temperatures["lr"].to_numpy() / 2)
    assert np.all(np.abs(ratio - 1) < 0.25), ratio
    assert np.median(ratio) == pytest.approx(1.0, abs=0.1)

    law = fit_power_law(temperatures["lr"].to_numpy(), temperatures["T"].to_numpy())
    assert law.k_interval[0] - 0.1 < 1.0 < law.k_interval[1] + 0.1
    assert law.k == pytest.approx(1.0, abs=0.15)


def test_power_law_exact_and_intervals():
    lr = np.geomspace(1e-4, 1e-2, 8)
    law = fit_power_law(lr, 3.9e-3 * lr**0.85)
    assert law.k == pytest.approx(0.85, abs=1e-12)
    assert law.b == pytest.approx(3.9e-3, rel=1e-9)
    noisy = fit_power_law(lr, 3.9e-3 * lr**0.85 * np.exp(np.random.default_rng(0).normal(0, 0.1, lr.size)))
    assert noisy.k_interval[0] < 0.85 < noisy.k_interval[1]


def test_smoothing_rows_sum_to_one():
    kernel = smoothing_matrix(np.geomspace(1e-3, 1e-1, 12), 0.3)
    assert kernel.sum(axis=1) == pytest.approx(np.ones(12))
    assert kernel[0, 0] == 1.0
    assert kernel[-1, -1] == 1.0


def test_trajectory_temperature_of_cooling_run():
    # A converging run with U = c t^-1 and S = ln U + const has dU/dS = U: T(t) falls with U.
    steps = np.unique(np.round(np.geomspace(1, 1e5, 40))).astype(int)
    U = 1.0 / steps
    frame = pl.DataFrame({"step": steps, "loss": U, "S_direction": np.log(U)})
    result = trajectory_temperature(frame)
    T = result["T_trajectory"].to_numpy()
    assert np.all(np.diff(T) < 0)
    expected = (U[4:] - U[:-4]) / (np.log(U[4:]) - np.log(U[:-4]))
    assert T == pytest.approx(expected)


@pytest.mark.parametrize(
    "frame, message",
    [
        (pl.DataFrame({"lr": [0.1, 0.2], "U": [1.0, 2.0], "S": [0.0, 1.0]}), "at least 3 learning rates"),
        (pl.DataFrame({"lr": [0.1, 0.2, 0.3], "U": [1.0, 2.0, 3.0]}), "needs columns S"),
        (pl.DataFrame({"lr": [0.1, 0.1, 0.3], "U": [1.0, 2.0, 3.0], "S": [0.0, 1.0, 2.0]}), "distinct"),
        (pl.DataFrame({"lr": [0.1, 0.2, 0.3], "U": [1.0, float("nan"), 3.0], "S": [0.0, 1.0, 2.0]}), "finite"),
    ],
)
def test_bad_input_named(frame, message):
    with pytest.raises(ValueError, match=message):
        free_energy_temperatures(frame)


def test_power_law_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law(np.array([0.1, 0.2]), np.array([1.0, 2.0]))
