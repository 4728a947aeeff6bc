"""Scale-invariant networks: every trainable weight feeds a normalisation without affine
parameters, so the loss is unchanged when all of them are scaled together."""

from phases.nets.models import ConvNet, PreActResNet18, ScaleInvariantMLP, build_model, si_radius

__all__ = ["ConvNet", "PreActResNet18", "ScaleInvariantMLP", "build_model", "si_radius"]
