"""The network protocols' update rule and the gradient-noise estimator."""

from __future__ import annotations

import pytest
import torch

from phases.nets.training import StepSettings, estimate_noise_trace, protocol_step


def _tangent_gradient(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random gradient shaped like a scale-invariant one: tangent, and scaled by 1/||w||."""
    g = torch.randn(w.shape, generator=generator, dtype=w.dtype) / w.numel() ** 0.5
    return (g - (g @ w) / (w @ w) * w) / torch.linalg.vector_norm(w)


def test_sphere_keeps_radius():
    # The projection restores ||w|| = r0 after every step, to float64 precision.
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(500, dtype=torch.float64, generator=generator)
    w *= 2.5 / torch.linalg.vector_norm(w)
    settings = StepSettings("sphere", lr=0.05, radius=2.5, noise=1.0)
    for _ in range(200):
        w, record = protocol_step(w, _tangent_gradient(w, generator), settings, generator)
        assert float(torch.linalg.vector_norm(w)) == pytest.approx(2.5, rel=1e-12)
    assert record.norm_after_step > 2.5  # the step moves off the sphere before the projection


def test_elr_step_is_effective_lr_times_radius_squared():
    # lr_t / ||w||^2 equals the configured effective LR at every step, whatever the radius does.
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(300, dtype=torch.float64, generator=generator)
    w /= torch.linalg.vector_norm(w)
    settings = StepSettings("elr", lr=0.02, wd=0.1, noise=1.0)
    radii = []
    for _ in range(100):
        w, record = protocol_step(w, _tangent_gradient(w, generator), settings, generator)
        assert record.lr_step / record.radius_before**2 == pytest.approx(0.02, rel=1e-12)
        radii.append(record.radius_before)
    assert max(radii) / min(radii) > 1.01  # the radius did move


def test_lr_step_is_sgd_with_weight_decay():
    w = torch.tensor([3.0, 4.0], dtype=torch.float64)
    g = torch.tensor([0.4, -0.3], dtype=torch.float64)
    updated, record = protocol_step(w, g, StepSettings("lr", lr=0.1, wd=0.5))
    assert torch.allclose(updated, w - 0.1 * (g + 0.5 * w))
    assert record.lr_step == 0.1


def test_unknown_protocol_rejected():
    with pytest.raises(ValueError, match="unknown protocol 'adam'"):
        StepSettings("adam", lr=0.1)


def test_noise_trace_unbiased_on_linear_regression():
    # Least squares L = 1/(2n) sum (x_i . w - y_i)^2: per-sample gradients g_i = (x_i . w - y_i) x_i,
    # so a batch of B drawn with replacement has tr Cov = (mean ||g_i||^2 - ||g_full||^2) / B
    # exactly. 4000 minibatches estimate it within 5% (relative standard error about 2.5%).
    generator = torch.Generator().manual_seed(2)
    n, d, batch = 400, 10, 8
    x = torch.randn(n, d, dtype=torch.float64, generator=generator)
    y = torch.randn(n, dtype=torch.float64, generator=generator)
    w = torch.randn(d, dtype=torch.float64, generator=generator)
    per_sample = (x @ w - y)[:, None] * x  # (n, d)
    full = per_sample.mean(0)
    exact = float((per_sample.pow(2).sum(1).mean() - full.pow(2).sum()) / batch)

    trace, rms2 = estimate_noise_trace(lambda idx: per_sample[idx].mean(0), full, n, batch, 4000, radius=1.0, generator=generator)
    assert rms2 == pytest.approx(exact, rel=0.05)
    assert trace == pytest.approx(rms2)  # radius 1: no rescaling
    scaled, _ = estimate_noise_trace(lambda idx: per_sample[idx].mean(0), full, n, batch, 10, radius=3.0, generator=generator)
    assert scaled > 0


def test_population_noise_is_per_member():
    # Rows with different weights have different noise traces; each row's estimate matches its own
    # closed form (tr Cov of a batch of B = (mean ||g_i||^2 - ||g_full||^2) / B) within 5%.
    from phases.nets.training import minibatch_noise

    generator = torch.Generator().manual_seed(3)
    n, d, batch, members = 300, 6, 4, 3
    x = torch.randn(n, d, dtype=torch.float64, generator=generator)
    y = torch.randn(n, dtype=torch.float64, generator=generator)
    W = torch.randn(members, d, dtype=torch.float64, generator=generator) * torch.tensor([[0.1], [1.0], [3.0]], dtype=torch.float64)
    per_sample = (W @ x.T - y)[:, :, None] * x[None]  # (members, n, d)
    full = per_sample.mean(1)
    exact = (per_sample.pow(2).sum(2).mean(1) - full.pow(2).sum(1)) / batch

    def draw():
        index = torch.randint(n, (members, batch), generator=generator)
        return torch.stack([per_sample[m, index[m]].mean(0) for m in range(members)])

    estimate = minibatch_noise(draw, full, 4000)
    assert torch.allclose(estimate, exact, rtol=0.05)
    assert float(exact.max() / exact.min()) > 10  # the rows really differ
