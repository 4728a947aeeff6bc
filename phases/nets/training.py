"""One SGD step of a scale-invariant network under each protocol, and the gradient-noise measurement.

The scale-invariant parameters are handled as one flat vector w (`parameters_to_vector`), so the
radius r = ||w|| and the protocols act on all of them together:

- `sphere`: w <- (w - elr r0^2 g) rescaled to ||w|| = r0 (no weight decay).
- `elr`:    w <- w - lr_t (g + wd w) with lr_t = elr ||w||^2, the radius before the step.
- `lr`:     w <- w - lr (g + wd w), plain SGD with coupled weight decay.

g is the minibatch gradient plus optional isotropic noise sigma P_w xi / r (xi standard normal,
P_w the projection on the tangent space), the same noise model as the isotropic kind. Plain SGD,
no momentum.

`protocol_update`, `tangent_noise` and `minibatch_noise` act on rows of a (P, d) tensor, one row per
member of a population; `protocol_step` and `estimate_noise_trace` are their one-model forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

PROTOCOLS = ("sphere", "elr", "lr")


@dataclass(frozen=True)
class StepSettings:
    """Hyperparameters of one point: lr is the effective LR under sphere and elr."""

    protocol: str
    lr: float
    wd: float = 0.0
    radius: float = 1.0
    noise: float = 0.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; allowed: {', '.join(PROTOCOLS)}")


@dataclass(frozen=True)
class StepRecord:
    """Measurements of one step: the step size used, the radius before and the pre-projection norm."""

    lr_step: float
    radius_before: float
    norm_after_step: float


def tangent_noise(W: torch.Tensor, xi: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Injected noise sigma P_w xi / r for rows W (P, d): xi projected on each row's tangent space."""
    r = torch.linalg.vector_norm(W, dim=-1, keepdim=True)
    u = W / r
    return sigma * (xi - (xi * u).sum(dim=-1, keepdim=True) * u) / r


def protocol_update(
    W: torch.Tensor, g: torch.Tensor, protocol: str, lr: torch.Tensor | float, wd: torch.Tensor | float, radius: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Apply one protocol step to every row of W (P, d) with gradients g (P, d); settings broadcast as (P, 1).

    Returns (w after the step and before any projection, lr_t, r before the step). Under `sphere`
    the caller rescales to `radius` (and may first read the pre-projection norm, for lambda_eff).
    """
    r = torch.linalg.vector_norm(W, dim=-1, keepdim=True)
    if protocol == "sphere":
        lr_t = lr * radius**2 * torch.ones_like(r)
        return W - lr_t * g, lr_t, r
    lr_t = lr * r * r if protocol == "elr" else lr * torch.ones_like(r)
    return W * (1.0 - lr_t * wd) - lr_t * g, lr_t, r


def protocol_step(w: torch.Tensor, gradient: torch.Tensor, settings: StepSettings, generator: torch.Generator | None = None) -> tuple[torch.Tensor, StepRecord]:
    """Return the updated flat weight vector of one model after one step, and the step's record.

    w, gradient: flat tensors of the scale-invariant parameters and their minibatch gradient.
    """
    g = gradient
    if settings.noise > 0:
        xi = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device)
        g = g + tangent_noise(w, xi, settings.noise)
    wd = 0.0 if settings.protocol == "sphere" else settings.wd
    moved, lr_t, r = protocol_update(w[None], g[None], settings.protocol, settings.lr, wd, settings.radius)
    moved = moved[0]
    norm_after = torch.linalg.vector_norm(moved)
    if settings.protocol == "sphere":
        moved = moved * (settings.radius / norm_after)
    return moved, StepRecord(float(lr_t), float(r), float(norm_after))


def minibatch_noise(minibatch_gradients: Callable[[], torch.Tensor], full_gradient: torch.Tensor, minibatches: int) -> torch.Tensor:
    """rms^2 = mean ||g_b - g_full||^2 over `minibatches` draws, per row: an unbiased estimate of
    tr Cov(g_b), since g_full is the exact mean.

    minibatch_gradients: returns a fresh minibatch gradient per row, (P, d), at each call;
    full_gradient: (P, d). Returns (P,).
    """
    if minibatches < 1:
        raise ValueError(f"minibatches must be >= 1, got {minibatches}")
    total = torch.zeros(full_gradient.shape[:-1], dtype=torch.float64, device=full_gradient.device)
    for _ in range(minibatches):
        total += ((minibatch_gradients().to(torch.float64) - full_gradient.to(torch.float64)) ** 2).sum(dim=-1)
    return total / minibatches


def estimate_noise_trace(
    minibatch_gradient: Callable[[torch.Tensor], torch.Tensor],
    full_gradient: torch.Tensor,
    samples: int,
    batch_size: int,
    minibatches: int,
    radius: float,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Estimate one model's minibatch-gradient noise: (tr Sigma at unit radius, rms^2).

    Draws `minibatches` minibatches of `batch_size` indices uniformly with replacement and applies
    `minibatch_noise`; tr Sigma = rms^2 r^2 rescales to unit radius. sigma^2 is tr Sigma / (d - 1).

    minibatch_gradient: maps an index tensor (batch_size,) to the flat gradient of that minibatch.
    """
    if minibatches < 1 or batch_size < 1:
        raise ValueError(f"minibatches and batch_size must be >= 1, got {minibatches} and {batch_size}")
    rms2 = float(minibatch_noise(lambda: minibatch_gradient(torch.randint(samples, (batch_size,), generator=generator))[None], full_gradient[None], minibatches)[0])
    return rms2 * radius**2, rms2
