"""Entropy estimators against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analysis.entropy import (
    direction_entropy,
    gaussian_direction_entropy,
    graph_length_entropy,
    kozachenko_leonenko,
    log_jacobian,
    to_hyperspherical,
    uniform_sphere_entropy,
    von_mises_fisher_entropy_s2,
)


@pytest.mark.parametrize("dim", [1, 2, 5])
def test_kozachenko_leonenko_gaussian(dim):
    # Exact: D/2 log(2 pi e) + 1/2 log det C for C = diag(0.5, 1, 2, ...). The estimator is
    # unbiased asymptotically; with 4000 samples the mean of 5 sets sits within 0.05 nats for D <= 5.
    rng = np.random.default_rng(1)
    scales = np.geomspace(0.5, 2.0, dim)
    exact = 0.5 * dim * math.log(2 * math.pi * math.e) + float(np.sum(np.log(scales)))
    estimates = [kozachenko_leonenko(rng.standard_normal((4000, dim)) * scales, k=3) for _ in range(5)]
    assert np.mean(estimates) == pytest.approx(exact, abs=0.05 * max(1, dim / 2))


def test_kozachenko_leonenko_rejects_too_few_samples():
    with pytest.raises(ValueError, match="need more than k = 3"):
        kozachenko_leonenko(np.zeros((3, 2)), k=3)


def test_von_mises_fisher_closed_form_matches_small_t():
    # At T <= 0.05 the exact S^2 entropy equals the Gaussian form log(2 pi e T) to ~1e-15.
    for temperature in (5e-4, 5e-3, 5e-2):
        assert von_mises_fisher_entropy_s2(temperature) == pytest.approx(
            gaussian_direction_entropy(temperature, 3), abs=1e-9
        )
    # Large T tends to the uniform law on S^2: log(4 pi).
    assert von_mises_fisher_entropy_s2(1e4) == pytest.approx(math.log(4 * math.pi), abs=1e-3)


@pytest.mark.parametrize("temperature", [5e-3, 5e-2])
def test_direction_entropy_von_mises_fisher(temperature):
    # 20 sets of 1000 i.i.d. vMF samples on S^2 with kappa = 1/T: the mean estimate lies within
    # 0.05 nats of the exact entropy (a single estimate spreads by about 0.05-0.07 nats).
    mu = np.array([0.3, -0.5, 0.8])
    mu /= np.linalg.norm(mu)
    law = stats.vonmises_fisher(mu, 1.0 / temperature)
    rng = np.random.default_rng(7)
    estimates = [direction_entropy(law.rvs(1000, random_state=rng)) for _ in range(20)]
    assert np.mean(estimates) == pytest.approx(float(von_mises_fisher_entropy_s2(temperature)), abs=0.05)


def test_direction_entropy_ignores_chart_position():
    # One cloud at the chart centre (e_2), on the branch cut (-e_2) and at a pole (e_1): the
    # estimator reflects each cloud's mean to the centre first, so the three estimates agree to
    # within the effect of the leftover rotation about the mean (0.03 nats).
    rng = np.random.default_rng(3)
    centred = stats.vonmises_fisher(np.array([0.0, 1.0, 0.0]), 100.0).rvs(2000, random_state=rng)
    on_cut = centred * np.array([1.0, -1.0, -1.0])
    at_pole = centred[:, [1, 0, 2]] * np.array([1.0, 1.0, -1.0])
    reference = direction_entropy(centred)
    assert direction_entropy(on_cut) == pytest.approx(reference, abs=0.03)
    assert direction_entropy(at_pole) == pytest.approx(reference, abs=0.03)


def test_direction_entropy_uniform_sphere():
    # Uniform on S^2 and S^4: the chart's boundaries cost some accuracy; 0.1 nats with 8000 samples.
    rng = np.random.default_rng(5)
    for dim in (3, 5):
        samples = rng.standard_normal((8000, dim))
        assert direction_entropy(samples) == pytest.approx(uniform_sphere_entropy(dim), abs=0.1)


def test_hyperspherical_round_trip_jacobian():
    # Integrating exp(log J) over the chart gives the sphere's area: Monte Carlo over the angle box.
    rng = np.random.default_rng(11)
    dim = 4
    n = 400_000
    angles = np.column_stack([rng.uniform(0, np.pi, n), rng.uniform(0, np.pi, n), rng.uniform(-np.pi, np.pi, n)])
    box_volume = np.pi * np.pi * 2 * np.pi
    area = box_volume * np.mean(np.exp(log_jacobian(angles)))
    assert area == pytest.approx(math.exp(uniform_sphere_entropy(dim)), rel=0.01)


def test_to_hyperspherical_known_points():
    angles = to_hyperspherical(np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    assert angles[0] == pytest.approx([np.pi / 2, 0.0])
    assert angles[1] == pytest.approx([0.0, 0.0])
    assert angles[2] == pytest.approx([np.pi / 2, np.pi / 2])


def test_graph_length_entropy_scales_with_spread():
    # Scaling the samples by c multiplies L_k by c^gamma, so the estimate moves by exactly m ln c.
    rng = np.random.default_rng(4)
    samples = rng.standard_normal((2000, 5))
    base = graph_length_entropy(samples, k=10, manifold_dim=5)
    assert graph_length_entropy(3.0 * samples, k=10, manifold_dim=5) - base == pytest.approx(5 * math.log(3.0), abs=1e-9)
    assert graph_length_entropy(3.0 * samples, k=10, gamma=2.0, manifold_dim=5) - graph_length_entropy(
        samples, k=10, gamma=2.0, manifold_dim=5
    ) == pytest.approx(5 * math.log(3.0), abs=1e-9)


def test_graph_length_entropy_tracks_von_mises_fisher_differences():
    # Defined up to a constant: the difference between two temperatures on S^2 must match the
    # exact entropy difference log(T2/T1) = log 10, within 0.15 nats (1000 samples, k = 50).
    rng = np.random.default_rng(8)
    mu = np.array([0.0, 1.0, 0.0])
    cold = stats.vonmises_fisher(mu, 1 / 5e-3).rvs(1000, random_state=rng)
    warm = stats.vonmises_fisher(mu, 1 / 5e-2).rvs(1000, random_state=rng)
    difference = graph_length_entropy(warm, k=50) - graph_length_entropy(cold, k=50)
    exact = float(von_mises_fisher_entropy_s2(5e-2) - von_mises_fisher_entropy_s2(5e-3))
    assert difference == pytest.approx(exact, abs=0.15)


def test_graph_length_entropy_rejects_too_few_samples():
    with pytest.raises(ValueError, match="more than k = 50"):
        graph_length_entropy(np.zeros((50, 3)), k=50)
