"""The schedule recommender on diagrams built from known laws, and its degraded and error cases."""

from __future__ import annotations

import math

import polars as pl
import pytest

from analysis.recommend import DEFAULT_E_FOLDS, Recommendation, recommend

# The generating laws of the synthetic diagram: T = A lr^B, U = U0 + C T in equilibrium.
A, B, U0, C = 0.02, 0.5, 0.05, 40.0
LRS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0]
REGIMES = ["converged", "converged", "equilibrium", "equilibrium", "equilibrium", "equilibrium", "equilibrium", "divergent"]
ACCURACY = [0.80, 0.85, 0.95, 0.97, 0.93, 0.90, 0.85, 0.10]


def _diagram(wds=(3e-3, 3e-2), regimes=REGIMES, accuracy=ACCURACY, hold=400.0, drop: tuple[str, ...] = ()) -> pl.DataFrame:
    rows = []
    for w_index, wd in enumerate(wds):
        for lr, regime, acc in zip(LRS, regimes, accuracy):
            T = A * lr**B
            if regime == "equilibrium":
                U = U0 + C * T
            elif regime == "converged":
                U = 0.01
            else:
                U = 2.3
            rows.append({
                "protocol": "lr", "lr": lr, "wd": wd, "noise": 0.0, "batch_size": 128, "width": 2, "regime": regime,
                "T": T, "U": U,
                "test_acc": acc - 0.01 * w_index, "stationary_from": hold, "window_start": 2000.0,
            })
    return pl.DataFrame(rows).drop(list(drop))


def test_recommendation_follows_the_algorithm_on_known_laws():
    rec = recommend(_diagram(), steps=20_000)
    # The equilibrium band at wd 3e-3 is 0.05..1; its lower half in ln lr is lr <= sqrt(0.05 * 1) = 0.22,
    # where the best test accuracy is at lr 0.1. The wd 3e-3 line is 0.01 better in accuracy.
    first = rec.stages[0]
    assert (first.step, first.lr, first.wd) == (0, 0.1, 3e-3)
    assert rec.threshold == pytest.approx(math.sqrt(0.02 * 0.05), rel=1e-12)
    assert rec.stages[1].step == 400  # hold: the measured stationary_from
    # The fitted laws recover the generating ones.
    assert rec.temperature_law["prefactor"] == pytest.approx(A, rel=1e-9)
    assert rec.temperature_law["exponent"] == pytest.approx(B, rel=1e-9)
    assert rec.loss_law["intercept"] == pytest.approx(U0, rel=1e-9)
    assert rec.loss_law["slope"] == pytest.approx(C, rel=1e-9)
    cooling = rec.stages[1:]
    # Geometric from 0.1 down to the grid's smallest lr 0.01, every stage long enough to re-equilibrate.
    assert cooling[-1].lr == pytest.approx(0.01, rel=1e-12)
    ratios = [b.lr / a.lr for a, b in zip(rec.stages, rec.stages[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    ends = [s.step for s in cooling[1:]] + [rec.steps]
    for stage, end in zip(cooling, ends):
        assert end - stage.step >= math.floor(DEFAULT_E_FOLDS / (4.0 * stage.lr * stage.wd)) - 1
        assert stage.predicted_loss == pytest.approx(U0 + C * A * stage.lr**B, rel=1e-9)
    assert f"{rec.steps - cooling[-1].step} steps" in cooling[-1].reason  # the last stage runs to the end
    assert not rec.degraded


def test_recommendation_is_deterministic_and_round_trips():
    diagram = _diagram()
    first, second = recommend(diagram, steps=20_000), recommend(diagram.sample(fraction=1.0, shuffle=True, seed=3), steps=20_000)
    assert first.to_dict() == second.to_dict()
    assert Recommendation.from_dict(first.to_dict()) == first


def test_target_loss_sets_the_final_lr():
    target = U0 + C * A * 0.05**B  # the loss law's value at lr 0.05
    rec = recommend(_diagram(), steps=20_000, target_loss=target)
    assert rec.stages[-1].lr == pytest.approx(0.05, rel=1e-9)
    assert rec.stages[-1].predicted_loss == pytest.approx(target, rel=1e-9)


def test_short_budget_limits_cooling():
    # One e-folding at wd 3e-2 takes 1/(4 lr wd) = 83 steps at lr 0.1 and 833 at lr 0.01, more than the
    # 800 steps left after the hold, so the final lr is raised to the one that fits: 0.0104.
    rec = recommend(_diagram(), steps=1200, wd=3e-2)
    assert len(rec.stages) == 2
    assert rec.stages[-1].lr == pytest.approx(1.0 / (4.0 * 3e-2 * 800), rel=1e-9)
    too_short = recommend(_diagram(hold=5000.0), steps=3000)
    assert too_short.degraded and len(too_short.stages) == 1
    assert "shorter than the measured equilibration time of 5000 steps" in too_short.warnings[0]


def test_no_equilibrium_point_gives_a_flagged_constant():
    regimes = ["converged"] * 5 + ["divergent"] * 3
    rec = recommend(_diagram(regimes=regimes), steps=5000)
    assert rec.degraded and len(rec.stages) == 1
    assert rec.stages[0].lr == 0.2  # the largest converged lr
    assert "no equilibrium point" in rec.warnings[0]
    with pytest.raises(ValueError, match="no equilibrium and no converged point"):
        recommend(_diagram(regimes=["divergent"] * 8), steps=5000)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"drop": ("regime", "T")}, "lacks the column\\(s\\) regime, T"),
        ({"wd": 1e-4}, "--wd 0.0001 is not in the diagram; its weight decays are 0.003, 0.03"),
        ({"noise": 1.0}, "--noise 1 is not in the diagram"),
        ({"steps": 0}, "steps must be >= 1"),
    ],
)
def test_bad_input_is_named(change, message):
    diagram = _diagram(drop=change.pop("drop", ()))
    with pytest.raises(ValueError, match=message):
        recommend(diagram, **{"steps": 5000, **change})


def test_other_protocols_are_refused():
    diagram = _diagram().with_columns(protocol=pl.lit("elr"))
    with pytest.raises(ValueError, match="no protocol lr points \\(it has: elr\\)"):
        recommend(diagram, steps=5000)


def test_predictions_never_fall_below_the_lowest_measured_loss():
    # A loss law with a negative intercept would predict negative losses at small lr. Predictions
    # are held at the line's lowest measured loss instead: 0.01, at the converged points.
    diagram = _diagram().with_columns(
        U=pl.when(pl.col("regime") == "equilibrium").then(-0.1 + C * pl.col("T")).otherwise(pl.col("U"))
    )
    rec = recommend(diagram, steps=20_000)
    assert rec.loss_law["intercept"] == pytest.approx(-0.1, rel=1e-9)
    assert rec.stages[-1].lr == pytest.approx(0.01)
    assert rec.stages[-1].predicted_loss == 0.01
    assert all(stage.predicted_loss >= 0.01 for stage in rec.stages)
    assert "held at the line's lowest measured loss" in rec.stages[-1].reason
