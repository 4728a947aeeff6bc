"""One SGD step of a scale-invariant network under each protocol, and the gradient-noise measurement.

The scale-invariant parameters are handled as one flat vector w (`parameters_to_vector`), so the
radius r = ||w|| and the protocols act on all of them together:

- `sphere`: w <- (w - elr r0^2 g) rescaled to ||w|| = r0 (no weight decay).
- `elr`:    w <- w - lr_t (g + wd w) with lr_t = elr ||w||^2, the radius before the step.
- `lr`:     w <- w - lr (g + wd w), plain SGD with coupled weight decay.

g is the minibatch gradient plus optional isotropic noise sigma P_w xi / r (xi standard normal,
P_w the projection on the tangent space), the same noise model as the isotropic kind. Plain SGD,
no momentum.

NOTE: this is the step of one model. The population training of a chunk, many points in one
batched model, is not built yet.
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


def protocol_step(w: torch.Tensor, gradient: torch.Tensor, settings: StepSettings, generator: torch.Generator | None = None) -> tuple[torch.Tensor, StepRecord]:
    """Return the updated flat weight vector after one step, and the step's record.

    w, gradient: flat tensors of the scale-invariant parameters and their minibatch gradient.
    """
    r = torch.linalg.vector_norm(w)
    g = gradient
    if settings.noise > 0:
        xi = torch.randn(w.shape, generator=generator, dtype=w.dtype, device=w.device)
        direction = w / r
        xi = xi - (xi @ direction) * direction
        g = g + settings.noise * xi / r

    if settings.protocol == "sphere":
        lr_step = settings.lr * settings.radius**2
        moved = w - lr_step * g
    elif settings.protocol == "elr":
        lr_step = float(settings.lr * r**2)
        moved = w - lr_step * (g + settings.wd * w)
    else:
        lr_step = settings.lr
        moved = w - lr_step * (g + settings.wd * w)

    norm_after = torch.linalg.vector_norm(moved)
    if settings.protocol == "sphere":
        moved = moved * (settings.radius / norm_after)
    return moved, StepRecord(float(lr_step), float(r), float(norm_after))


def estimate_noise_trace(
    minibatch_gradient: Callable[[torch.Tensor], torch.Tensor],
    full_gradient: torch.Tensor,
    samples: int,
    batch_size: int,
    minibatches: int,
    radius: float,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Estimate the minibatch-gradient noise: (tr Sigma at unit radius, rms^2).

    Draws `minibatches` minibatches of `batch_size` indices uniformly with replacement, computes
    rms^2 = mean ||g_b - g_full||^2 (an unbiased estimate of tr Cov(g_b), since g_full is the exact
    mean), and rescales to unit radius: tr Sigma = rms^2 r^2. sigma^2 is tr Sigma / (d - 1).

    minibatch_gradient: maps an index tensor (batch_size,) to the flat gradient of that minibatch.
    """
    if minibatches < 1 or batch_size < 1:
        raise ValueError(f"minibatches and batch_size must be >= 1, got {minibatches} and {batch_size}")
    total = 0.0
    for _ in range(minibatches):
        indices = torch.randint(samples, (batch_size,), generator=generator)
        total += float(torch.sum((minibatch_gradient(indices) - full_gradient) ** 2))
    rms2 = total / minibatches
    return rms2 * radius**2, rms2
