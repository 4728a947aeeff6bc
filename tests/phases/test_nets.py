"""Scale-invariant models: the loss ignores the weights' scale, and d matches the closed forms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from phases.data import load_digits_dataset
from phases.nets import ConvNet, PreActResNet18, ScaleInvariantMLP, si_radius


def _loss_after_scaling(model: nn.Module, x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[float, float]:
    model.train()  # BatchNorm uses the batch's statistics, as during SGD
    loss = nn.functional.cross_entropy(model(x), y).item()
    with torch.no_grad():
        for p in model.si_parameters():
            p.mul_(alpha)
    scaled = nn.functional.cross_entropy(model(x), y).item()
    with torch.no_grad():
        for p in model.si_parameters():
            p.div_(alpha)
    return loss, scaled


@pytest.mark.parametrize("alpha", [0.1, 10.0])
@pytest.mark.parametrize(
    "build, shape",
    [
        (lambda: ConvNet(width=4, in_channels=1), (64, 1, 8, 8)),
        (lambda: PreActResNet18(width=2, in_channels=3), (16, 3, 32, 32)),
        (lambda: ScaleInvariantMLP(in_features=64, hidden=(32, 32)), (64, 64)),
    ],
    ids=["convnet", "resnet18", "mlp"],
)
def test_loss_is_scale_invariant(build, shape, alpha):
    # loss(alpha w) = loss(w) up to BatchNorm's eps (1e-8 here): relative difference below 1e-5.
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 10, (shape[0],))
    loss, scaled = _loss_after_scaling(model, x, y, alpha)
    assert abs(scaled - loss) / abs(loss) < 1e-5


def test_convnet_on_digits_is_scale_invariant():
    data = load_digits_dataset(seed=0)
    torch.manual_seed(1)
    model = ConvNet(width=8, in_channels=1)
    loss, scaled = _loss_after_scaling(model, data.x_train[:128], data.y_train[:128], 10.0)
    assert abs(scaled - loss) / loss < 1e-5


@pytest.mark.parametrize("width", [8, 16])
def test_convnet_dimension_formula(width):
    # d = 27 c + 378 c^2 for 3 input channels: 24,408 at c = 8 and 97,200 at c = 16.
    assert ConvNet(width=width, in_channels=3).dim() == 27 * width + 378 * width**2


@pytest.mark.parametrize("width", [4, 8])
def test_resnet_dimension_formula(width):
    # d = 2724 k^2 + 27 k for 3 input channels: 43,692 at k = 4.
    assert PreActResNet18(width=width, in_channels=3).dim() == 2724 * width**2 + 27 * width


def test_head_is_frozen_at_fixed_norm():
    model = ConvNet(width=4, in_channels=1)
    frozen = model.frozen_parameters()
    assert len(frozen) == 1
    assert frozen[0] is model.head.weight
    assert model.head.bias is None
    assert model.head.weight.norm().item() == pytest.approx(10.0, rel=1e-6)
    assert torch.equal(ConvNet(width=4, in_channels=1).head.weight, model.head.weight)  # same seed, same head
    assert all(p.requires_grad for p in model.si_parameters())


def test_gradient_is_tangent():
    # <grad L(w), w> = 0 for a scale-invariant loss; BatchNorm's eps (1e-8) leaves a relative
    # residue of order eps / variance, so the bound is 1e-6.
    torch.manual_seed(2)
    model = ScaleInvariantMLP(in_features=16, hidden=(16,)).double().train()
    x = torch.randn(32, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (32,))
    nn.functional.cross_entropy(model(x), y).backward()
    inner = sum((p * p.grad).sum() for p in model.si_parameters())
    norm = si_radius(model) * torch.sqrt(sum((p.grad**2).sum() for p in model.si_parameters()))
    assert abs(inner.item()) / norm.item() < 1e-6
