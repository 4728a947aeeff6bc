"""The isotropic kind, run directly (no Ray): update rule, closed forms, divergence, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from phases.grid import chunk, expand
from phases.spec import load
from phases.trials import TrialContext, get_kind
from phases.trials.isotropic import IsotropicParams, Landscape, Population, log_schedule


def _spec(protocol: str, axes: dict, steps: int = 6000, replicas: int = 64, **extra):
    return load({"name": "t", "kind": "isotropic", "steps": steps, "replicas": replicas, "chunk_size": 100,
                 "grids": [{"protocol": protocol, "axes": axes}], **extra})


def _run(spec):
    part = chunk(expand(spec), spec.chunk_size)[0]
    return part, get_kind("isotropic").run(part, TrialContext(spec))


def test_step_matches_update_rule():
    # One vectorised step equals w - lr_t (P_w (grad + sigma xi) / r + wd w) computed per replica.
    spec = _spec("elr", {"lr": [0.05, 0.1], "wd": [0.01, 0.3], "noise": [0.5]}, steps=10, replicas=3)
    part = chunk(expand(spec), 100)[0]
    population = Population(part, spec, IsotropicParams(), seed=5)
    population.w *= np.linspace(0.5, 2.0, population.replicas)  # distinct radii per replica
    before = population.w.copy()
    noise = np.random.default_rng(5).standard_normal(before.shape)  # the draw the step will make
    population.advance(1)

    mu = population.landscape.mu[:, 0, 0]
    for p, point in enumerate(part.points):
        lr, wd, sigma = point.coords["lr"], point.coords["wd"], point.coords["noise"]
        for rep in range(population.replicas):
            w = before[:, p, rep]
            r = np.linalg.norm(w)
            u = w / r
            projector = np.eye(3) - np.outer(u, u)
            g = projector @ (mu + sigma * noise[:, p, rep]) / r
            expected = w - lr * r**2 * (g + wd * w)
            assert population.w[:, p, rep] == pytest.approx(expected, rel=1e-12)


def test_elr_equilibrium_matches_closed_forms():
    # elr = 0.05, wd = 0.1: T = 0.025, r*^2 = (d - 1) T / wd = 0.5, U = (d - 1) T / 2 = 0.025.
    # Discrete-step corrections are O(T) = 2.5%; replica noise adds about 1%: tolerance 5%.
    spec = _spec("elr", {"lr": [0.05], "wd": [0.1]}, steps=8000, replicas=128)
    part, result = _run(spec)
    summary = result.summaries[part.points[0].point_id]
    assert summary["stationary"]
    assert summary["r2"] == pytest.approx(0.5, rel=0.05)
    assert summary["U"] == pytest.approx(0.025, rel=0.05)
    # Angular update per step: E||dw_bar||^2 = 2 (d - 1) elr T = 0.005, same tolerance.
    assert summary["angular_update2"] == pytest.approx(0.005, rel=0.05)
    # Entropy of the direction: log(2 pi e T) within 0.1 nats (1024 samples, estimator spread 0.05).
    assert summary["S_direction"] == pytest.approx(np.log(2 * np.pi * np.e * 0.025), abs=0.1)


def test_lr_equilibrium_radius():
    # lr = 0.1, wd = 0.01: r*^4 = lr sigma^2 (d - 1) / (2 wd) = 10, relaxation 1/(4 lr wd) = 250 steps.
    spec = _spec("lr", {"lr": [0.1], "wd": [0.01]}, steps=6000, replicas=64)
    part, result = _run(spec)
    summary = result.summaries[part.points[0].point_id]
    assert summary["r2"] == pytest.approx(np.sqrt(10.0), rel=0.04)
    assert summary["elr_mean"] == pytest.approx(0.1 / np.sqrt(10.0), rel=0.04)


def test_sphere_effective_weight_decay():
    # lambda_eff = (d - 1) T / r^2 = elr / r^2 for sigma = 1: 1e-2 at elr = 1e-2, r = 1; 1e-4 at r = 10.
    spec = _spec("sphere", {"lr": [1e-2], "radius": [1.0, 10.0]}, steps=4000, replicas=64)
    part, result = _run(spec)
    for point in part.points:
        summary = result.summaries[point.point_id]
        assert summary["r"] == pytest.approx(point.coords["radius"], rel=1e-12)
        assert summary["lambda_eff"] == pytest.approx(1e-2 / point.coords["radius"] ** 2, rel=0.03)


def test_quadratic_loss_equipartition():
    # L = 1/2 u^T A u with A = diag(0, 1, 1): curvature 1 on the sphere, U = (d - 1) T / 2 = T.
    spec = _spec("sphere", {"lr": [0.02], "radius": [1.0]}, steps=6000, replicas=128, params={"loss": "quadratic"})
    part, result = _run(spec)
    summary = result.summaries[part.points[0].point_id]
    assert summary["loss_min"] == 0.0
    assert summary["U"] == pytest.approx(0.01, rel=0.05)


def test_huge_lr_diverges_without_error():
    # lr wd = 100 > 2 makes (1 - lr wd) < -1: the radius grows geometrically.
    spec = _spec("lr", {"lr": [1000.0, 0.05], "wd": [0.1]}, steps=500, replicas=8)
    part, result = _run(spec)
    by_lr = {p.coords["lr"]: result.summaries[p.point_id] for p in part.points}
    assert by_lr[1000.0]["diverged"] is True
    assert by_lr[1000.0]["U"] is None
    assert by_lr[1000.0]["stationary"] is False
    assert by_lr[0.05]["diverged"] is False
    assert by_lr[0.05]["U"] is not None


def test_checkpoint_resume_is_exact():
    spec = _spec("elr", {"lr": [0.05], "wd": [0.1, 1.0]}, steps=2000, replicas=16)
    part = chunk(expand(spec), 100)[0]
    straight = Population(part, spec, IsotropicParams(), seed=9)
    straight.advance(2000)

    first = Population(part, spec, IsotropicParams(), seed=9)
    first.advance(1234)
    arrays, meta = first.state()
    resumed = Population(part, spec, IsotropicParams(), seed=0)
    resumed.load(arrays, meta)
    resumed.advance(2000)

    assert np.array_equal(straight.w, resumed.w)
    for name in straight.sums:
        assert np.array_equal(straight.sums[name], resumed.sums[name])
    assert np.array_equal(np.array(straight.log_rows), np.array(resumed.log_rows), equal_nan=True)


def test_log_schedule_covers_run():
    steps = log_schedule(10_000, 20, 5)
    assert steps[0] == 1
    assert steps[-1] == 10_000
    assert np.all(np.diff(steps) > 0)
    assert {2000, 4000, 6000, 8000} <= set(steps.tolist())


def test_landscape_gradient_is_tangent():
    params = IsotropicParams(dim=5)
    landscape = Landscape.from_params(params)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((5, 2, 3))
    u /= np.linalg.norm(u, axis=0)
    grad = np.broadcast_to(landscape.raw_gradient(u), u.shape)
    tangent = grad - np.sum(grad * u, axis=0) * u
    assert np.allclose(np.sum(tangent * u, axis=0), 0.0, atol=1e-12)
    assert landscape.value(-landscape.mu) == pytest.approx(np.zeros((1, 1)), abs=1e-12)


class _TrialCrashed(Exception):
    pass


def test_retried_trial_continues_from_checkpoint(tmp_path):
    # A trial that dies after its second checkpoint and is retried with that checkpoint ends with
    # exactly the results of an uninterrupted run: the kind restores its state, RNG included.
    from phases.trials.base import read_state_dir, write_state_dir

    spec = _spec("elr", {"lr": [0.05], "wd": [0.1, 1.0]}, steps=6000, replicas=8)
    part = chunk(expand(spec), 100)[0]
    kind = get_kind("isotropic")
    straight = kind.run(part, TrialContext(spec))

    saved: list[int] = []

    def save_then_crash(arrays, meta):
        write_state_dir(tmp_path, arrays, meta)
        saved.append(meta["step"])
        if len(saved) == 2:
            raise _TrialCrashed

    crashing = TrialContext(spec, save_state=save_then_crash, checkpoint_every_s=0.0)
    with pytest.raises(_TrialCrashed):
        kind.run(part, crashing)
    assert 0 < saved[-1] < 6000

    retried = kind.run(part, TrialContext(spec, load_state=lambda: read_state_dir(tmp_path)))
    for point in part.points:
        for key, value in straight.summaries[point.point_id].items():
            assert retried.summaries[point.point_id][key] == value, key
        for key, column in straight.trajectories[point.point_id].items():
            assert np.array_equal(retried.trajectories[point.point_id][key], column, equal_nan=True), key
