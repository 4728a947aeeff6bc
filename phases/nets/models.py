"""Scale-invariant ConvNet, pre-activation ResNet-18 and MLP with a frozen classifier head.

Construction: no biases before a normalisation, and BatchNorm without affine parameters after
every trainable layer. The ResNet has an extra one before each 1x1 shortcut convolution, so the
shortcut scales like the main branch. The head is bias-free and frozen at a random initialisation
rescaled to a fixed Frobenius norm (10 for cross-entropy). The loss is then invariant to scaling
all trainable weights together, which form one vector with one radius r.

NOTE: BatchNorm's eps breaks the invariance by a relative O(eps / activation variance). The
default eps here is 1e-8, not PyTorch's 1e-5, so that the error stays below 1e-5 for scalings 0.1-10.
"""

from __future__ import annotations

import torch
from torch import nn

BN_EPS = 1e-8
HEAD_NORM = 10.0
HEAD_SEED = 4


def _norm2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, affine=False, eps=BN_EPS)


def _frozen_head(features: int, classes: int, norm: float, seed: int) -> nn.Linear:
    """Bias-free linear head at a seeded random initialisation, rescaled to Frobenius norm `norm`, frozen."""
    head = nn.Linear(features, classes, bias=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        weight = torch.randn(classes, features, generator=generator)
        head.weight.copy_(weight * (norm / weight.norm()))
    head.weight.requires_grad_(False)
    return head


class ScaleInvariant(nn.Module):
    """Base: the trainable weights are the scale-invariant vector; the head is frozen."""

    head: nn.Linear

    def si_parameters(self) -> list[nn.Parameter]:
        """Trainable scale-invariant parameters, in a fixed order (they form the vector w)."""
        return [p for p in self.parameters() if p.requires_grad]

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters that are not trained (the classifier head)."""
        return [p for p in self.parameters() if not p.requires_grad]

    def dim(self) -> int:
        """d: the number of scale-invariant parameters."""
        return sum(p.numel() for p in self.si_parameters())


class ConvNet(ScaleInvariant):
    """The 5-layer ConvNet family of width c: conv c, then c -> 2c -> 4c -> 8c with max pooling.

    d = 9 c_in c + 378 c^2 (27c + 378c^2 for 3 input channels).
    """

    def __init__(self, width: int = 8, in_channels: int = 3, classes: int = 10, head_norm: float = HEAD_NORM, head_seed: int = HEAD_SEED):
        super().__init__()
        c = width
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1, bias=False), _norm2d(c), nn.ReLU()]
        for k in (1, 2, 4):
            layers += [nn.Conv2d(k * c, 2 * k * c, 3, padding=1, bias=False), _norm2d(2 * k * c), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = _frozen_head(8 * c, classes, head_norm, head_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.norm1 = _norm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _norm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            # The extra normalisation makes the shortcut scale like the main branch.
            self.shortcut = nn.Sequential(_norm2d(in_channels), nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(x))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.norm2(out)))
        return out + shortcut


class PreActResNet18(ScaleInvariant):
    """Pre-activation ResNet-18 of width k (stages k, 2k, 4k, 8k). d = 2724 k^2 + 9 c_in k."""

    def __init__(self, width: int = 4, in_channels: int = 3, classes: int = 10, head_norm: float = HEAD_NORM, head_seed: int = HEAD_SEED):
        super().__init__()
        k = width
        self.stem = nn.Conv2d(in_channels, k, 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        channels = k
        for multiple, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            for index in range(2):
                blocks.append(_PreActBlock(channels, multiple * k, stride if index == 0 else 1))
                channels = multiple * k
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = _norm2d(channels)
        self.head = _frozen_head(channels, classes, head_norm, head_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.final_norm(self.blocks(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


class ScaleInvariantMLP(ScaleInvariant):
    """MLP with bias-free linear layers, each followed by BatchNorm1d without affine parameters and ReLU."""

    def __init__(self, in_features: int = 64, hidden: tuple[int, ...] = (64, 64), classes: int = 10,
                 head_norm: float = HEAD_NORM, head_seed: int = HEAD_SEED):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size, bias=False), nn.BatchNorm1d(size, affine=False, eps=BN_EPS), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = _frozen_head(width, classes, head_norm, head_seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(name: str, *, width: int, in_channels: int, classes: int, input_features: int) -> ScaleInvariant:
    """Build a model by name: convnet, resnet18 or mlp. Raises ValueError for other names."""
    if name == "convnet":
        return ConvNet(width, in_channels, classes)
    if name == "resnet18":
        return PreActResNet18(width, in_channels, classes)
    if name == "mlp":
        return ScaleInvariantMLP(input_features, (width, width), classes)
    raise ValueError(f"unknown model {name!r}; allowed: convnet, resnet18, mlp")


def si_radius(model: ScaleInvariant) -> torch.Tensor:
    """||w||: the norm of all scale-invariant parameters concatenated."""
    return torch.sqrt(sum((p.detach() ** 2).sum() for p in model.si_parameters()))
