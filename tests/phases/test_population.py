"""Population layouts: many members in one batched network give each member's own loss and gradient."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.nn.functional import cross_entropy
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from phases.nets.models import ConvNet, PreActResNet18, ScaleInvariantMLP
from phases.nets.population import PopulationNet, architecture_of

MODELS = {
    "convnet-digits": (lambda: ConvNet(3, 1, 10), (1, 8, 8)),
    "convnet-odd": (lambda: ConvNet(2, 3, 10), (3, 9, 9)),  # odd sizes exercise ceil-mode pooling
    "resnet18": (lambda: PreActResNet18(2, 3, 10), (3, 16, 16)),
    "mlp": (lambda: ScaleInvariantMLP(64, (12, 12), 10), (1, 8, 8)),
}


def _members_and_data(name: str, layout: str, members: int = 3, batch: int = 12, seed: int = 0):
    torch.manual_seed(seed)
    build, shape = MODELS[name]
    model = build().double()
    net = PopulationNet(architecture_of(model, layout), dtype=torch.float64)
    W = torch.randn(members, net.dim, dtype=torch.float64)
    data = torch.randn(40, *shape, dtype=torch.float64)
    labels = torch.randint(10, (40,))
    index = torch.randint(40, (members, batch))
    return model, net, W, data, labels, index


@pytest.mark.parametrize("layout", ["grouped", "bmm"])
@pytest.mark.parametrize("name", list(MODELS))
def test_population_matches_reference_model(name, layout):
    # Every member's loss and gradient equal those of the nn.Module with the member's weights on
    # the member's minibatch, to float64 round-off (relative 1e-10).
    model, net, W, data, labels, index = _members_and_data(name, layout)
    loss, gradient = net.loss_and_gradient(W, net.gather(net.prepare_inputs(data), index), labels[index])
    for member in range(W.shape[0]):
        vector_to_parameters(W[member].clone(), model.si_parameters())
        model.zero_grad()
        reference = cross_entropy(model(data[index[member]]), labels[index[member]])
        reference.backward()
        expected = parameters_to_vector([p.grad for p in model.si_parameters()])
        assert float(loss[member]) == pytest.approx(float(reference), rel=1e-10)
        assert float(torch.linalg.vector_norm(gradient[member] - expected)) < 1e-10 * float(torch.linalg.vector_norm(expected))


@pytest.mark.parametrize("alpha", [0.1, 10.0])
@pytest.mark.parametrize("name", list(MODELS))
def test_population_loss_is_scale_invariant(name, alpha):
    # Batch statistics only, no running statistics: loss(alpha w) = loss(w) for each member.
    _, net, W, data, labels, index = _members_and_data(name, "grouped")
    x = net.gather(net.prepare_inputs(data), index)
    base, _ = net.loss_and_gradient(W, x, labels[index])
    scaled, _ = net.loss_and_gradient(alpha * W, x, labels[index])
    assert torch.allclose(scaled, base, rtol=1e-5, atol=0)


def test_unknown_layout_rejected():
    with pytest.raises(ValueError, match="unknown population layout 'vmap'"):
        architecture_of(ConvNet(2, 1, 10), "vmap")


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++", "c++")), reason="torch.compile needs a C++ compiler")
def test_compiled_mlp_step_matches_eager():
    # The compiled training step (inductor C++ kernels) gives the eager step's loss and gradient;
    # fused reductions may add in another order, so the tolerance is float64 round-off (1e-10).
    model, _, W, data, labels, index = _members_and_data("mlp", "bmm", members=4, batch=16)
    eager = PopulationNet(architecture_of(model), dtype=torch.float64)
    compiled = PopulationNet(architecture_of(model), dtype=torch.float64, compile=True)
    x, y = eager.gather(eager.prepare_inputs(data), index), labels[index]
    loss, gradient = eager.step_loss_and_gradient(W, x, y)
    compiled_loss, compiled_gradient = compiled.step_loss_and_gradient(W, x, y)
    assert torch.allclose(compiled_loss, loss, rtol=1e-10, atol=0)
    assert float(torch.linalg.vector_norm(compiled_gradient - gradient)) < 1e-10 * float(torch.linalg.vector_norm(gradient))


def test_compile_rejected_for_convolutional_models():
    with pytest.raises(ValueError, match="compile applies to the MLP's hand-written step only, not to convnet"):
        PopulationNet(architecture_of(ConvNet(2, 1, 10)), compile=True)
