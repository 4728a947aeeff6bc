"""The two finite-sum toys on the sphere show the difference the free-energy picture predicts."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import yaml

from analysis.temperature import trajectory_temperature
from phases import load_sweep, run_sweep
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _smaller(name: str, steps: int = 12000) -> dict:
    # The shipped toy specs with fewer learning rates, steps and replicas, to fit a test budget.
    data = yaml.safe_load((REPO / "search_spaces" / f"{name}.yaml").read_text())
    data["steps"] = steps
    data["replicas"] = 32
    data["chunk_size"] = 10
    data["grids"][0]["axes"]["lr"] = {"log": [1.0e-3, 3.0, 10]}
    return data


def test_overparameterised_toy_converges_below_threshold(ray_local, tmp_path):
    result = run_sweep(_smaller("toy_sphere_op"), storage=tmp_path, track=False)
    diagram = load_sweep(result.path).diagram.sort("lr")
    regimes = diagram["regime"].to_list()
    assert regimes[0] == "converged"
    assert "equilibrium" in regimes
    boundaries = [b for b in result.fits["boundaries"] if b["lower_regime"] == "converged"]
    assert len(boundaries) == 1
    threshold = boundaries[0]["lr_boundary"]
    below = diagram.filter(pl.col("lr") < threshold)
    assert (below["regime"] == "converged").all()
    # The loss goes to zero: still falling (log-log slope below -0.05) or already at the minimum.
    for row in below.iter_rows(named=True):
        assert row["U"] < 1e-9 or row["loss_slope"] < -0.05, row
    # The trajectory temperature of the converging runs falls towards zero: by the end it is tiny
    # for most of them, and for each it is at most a fifth of its value early in the run.
    assert below["T_trajectory"].drop_nulls().len() == below.height
    assert below["T_trajectory"].abs().median() < 1e-6
    sweep = load_sweep(result.path)
    for point_id in below["point_id"]:
        trajectory = sweep.trajectories.filter(pl.col("point_id") == point_id)
        series = trajectory_temperature(trajectory).filter(pl.col("step") >= 100)["T_trajectory"].drop_nulls()
        assert abs(series[-1]) <= 0.2 * abs(series[0]), point_id
    above = diagram.filter(pl.col("lr") > threshold)
    assert above["U"].min() > below["U"].max()


def test_underparameterised_toy_has_finite_temperature(ray_local, tmp_path):
    result = run_sweep(_smaller("toy_sphere_up"), storage=tmp_path, track=False)
    diagram = load_sweep(result.path).diagram.sort("lr")
    assert (diagram["regime"] == "equilibrium").all()
    assert (diagram["U"] > 0.03).all()  # no interpolation: the loss floor is positive at every lr
    temperatures = diagram["T_free_energy"].to_numpy().astype(float)
    finite = temperatures[np.isfinite(temperatures)]
    assert finite.size >= 6
    assert np.all(finite > 0)
    law = result.fits["temperature"][0]["power_law"]
    assert law["k"] > 0.5  # T grows with the learning rate
    assert law["k_interval_95"][0] > 0
