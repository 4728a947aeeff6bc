"""Stationarity test, regime labels and boundaries on trajectories with known behaviour."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from analysis.regimes import convergence_trends, label_regimes, regime_boundaries
from analysis.stationarity import detect_stationarity

STEPS = np.unique(np.round(np.geomspace(1, 1e5, 60))).astype(int)


def _trajectory(point_id: str, loss: np.ndarray, radius: np.ndarray | None = None) -> pl.DataFrame:
    radius = np.ones_like(loss) if radius is None else radius
    return pl.DataFrame({"point_id": point_id, "step": STEPS, "loss": loss, "radius_norm": radius,
                         "grad_norm": np.sqrt(np.abs(loss))})


def _relaxing(tau: float, level: float = 0.1, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return level * (1 + 5 * np.exp(-STEPS / tau)) * (1 + noise * rng.standard_normal(STEPS.size))


def test_relaxing_run_is_stationary_after_relaxation():
    # Relaxation time 1000 steps: after about 6 relaxation times the excess is below 2%.
    result = detect_stationarity(_trajectory("a", _relaxing(1000.0, noise=0.01)))
    assert result["trend_stationary"][0] is True
    assert 2000 <= result["stationary_from"][0] <= 50_000


def test_power_law_decay_is_not_stationary():
    result = detect_stationarity(_trajectory("a", 1.0 / STEPS))
    assert result["trend_stationary"][0] is False
    assert result["stationary_from"][0] is None


def test_drifting_radius_is_not_stationary():
    # Loss flat, radius growing like t^0.1: a 2% tolerance rejects it.
    result = detect_stationarity(_trajectory("a", _relaxing(10.0), radius=STEPS**0.1))
    assert result["trend_stationary"][0] is False


def test_stationarity_names_missing_columns():
    with pytest.raises(ValueError, match="point_id"):
        detect_stationarity(pl.DataFrame({"step": [1, 2], "loss": [1.0, 1.0]}))
    with pytest.raises(ValueError, match="at least one of the columns"):
        detect_stationarity(pl.DataFrame({"point_id": ["a"], "step": [1]}))


def _points(rows: list[dict]) -> pl.DataFrame:
    base = {"diverged": False, "stationary": True, "U": 0.1, "loss_min": 0.0, "U_uniform": 1.0,
            "S_direction": -2.0, "S_uniform_direction": 2.5, "protocol": "sphere", "wd": 0.0, "noise": 0.0,
            "radius": 1.0, "batch_size": 1, "seed": 0}
    return pl.DataFrame([{**base, **row} for row in rows])


def test_labels_follow_rules():
    trajectories = pl.concat([
        _trajectory("conv", 1.0 / STEPS),
        _trajectory("eq", _relaxing(100.0)),
        _trajectory("hot", _relaxing(10.0, level=1.0)),
        _trajectory("nan", _relaxing(10.0)),
    ])
    points = _points([
        {"point_id": "conv", "lr": 0.001, "stationary": False, "U": 1e-5},
        {"point_id": "eq", "lr": 0.01},
        {"point_id": "hot", "lr": 0.1, "U": 1.01, "S_direction": 2.45},
        {"point_id": "nan", "lr": 1.0, "U": None, "diverged": True},
    ])
    trends = convergence_trends(trajectories)
    stationarity = detect_stationarity(trajectories)
    labelled = label_regimes(points.join(stationarity, on="point_id"), trends)
    regimes = dict(zip(labelled["point_id"], labelled["regime"]))
    assert regimes == {"conv": "converged", "eq": "equilibrium", "hot": "divergent", "nan": "divergent"}


def test_point_at_minimum_is_converged():
    labelled = label_regimes(_points([{"point_id": "a", "lr": 0.1, "U": 0.0}]))
    assert labelled["regime"][0] == "converged"


def test_boundaries_bracket_label_changes():
    labels = ["converged", "converged", "equilibrium", "equilibrium", "divergent"]
    lrs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    diagram = _points([{"point_id": str(i), "lr": lr} for i, lr in enumerate(lrs)]).with_columns(regime=pl.Series(labels))
    boundaries = regime_boundaries(diagram)
    assert [(b["lower_regime"], b["upper_regime"]) for b in boundaries] == [("converged", "equilibrium"), ("equilibrium", "divergent")]
    assert boundaries[0]["lr_low"] == 1e-2
    assert boundaries[0]["lr_high"] == 1e-1
    assert boundaries[0]["lr_boundary"] == pytest.approx(np.sqrt(1e-3))
