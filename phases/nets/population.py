"""Many copies of one scale-invariant network, evaluated together as batched matrix products.

A population holds P members' weights as one tensor W (P, d): row p is member p's flat vector of
scale-invariant parameters, in the order of `ScaleInvariant.si_parameters()`, so that a row equals
`parameters_to_vector` of the reference `nn.Module`. Each member gets its own minibatch, x (P, B, ...).

Layout, chosen for the CPU: activations are channels-last, (P, B, H, W, C). A convolution gathers
its k*k shifted views into one (P, B*H*W, k*k*C) matrix and multiplies it by each member's
(k*k*C, C_out) weight matrix in a single `torch.bmm`, so the output is channels-last again and no
transposes are needed between layers. BatchNorm (no affine parameters, batch statistics) reduces
over the middle axis of a (P, B*H*W, C) view. The per-operation overhead is paid once for the
population instead of once per member, and the matrix products are P times larger. The same code
runs on CUDA.

Every member uses batch statistics, in training and in evaluation alike: no running statistics are
kept, so the loss is a function of w alone and stays exactly scale-invariant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from phases.nets.models import BN_EPS, ConvNet, PreActResNet18, ScaleInvariant, ScaleInvariantMLP


class _Im2col(torch.autograd.Function):
    """Gather a channels-last input's k*k shifted windows into columns, zero padding included.

    x (P, B, H, W, C) is padded once. For each kernel row i, the k windows of a row form one strided
    view whose innermost k*C values are contiguous, so k copies build the columns. The backward
    adds each window's gradient in place into one padded buffer, instead of a zero-filled full-size
    buffer per window as autograd would for slices.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
        members, batch, height, width, channels = x.shape
        padded = F.pad(x, (0, 0, padding, padding, padding, padding)) if padding else x
        out_h = (height + 2 * padding - k) // stride + 1
        out_w = (width + 2 * padding - k) // stride + 1
        columns = x.new_empty(members, batch, out_h, out_w, k, k * channels)
        s_member, s_batch, s_row, s_col, _ = padded.stride()
        for i in range(k):
            rows = padded[:, :, i:]
            columns[:, :, :, :, i] = rows.as_strided(
                (members, batch, out_h, out_w, k * channels),
                (s_member, s_batch, stride * s_row, stride * s_col, 1),
                rows.storage_offset(),
            )
        ctx.geometry = (tuple(padded.shape), k, stride, padding, out_h, out_w)
        return columns.reshape(members, batch, out_h, out_w, k * k * channels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, k, stride, padding, out_h, out_w = ctx.geometry
        members, batch, height, width, channels = shape
        grad = grad.reshape(members, batch, out_h, out_w, k, k, channels)
        grad_padded = grad.new_zeros(shape)
        for i in range(k):
            for j in range(k):
                rows = slice(i, i + stride * (out_h - 1) + 1, stride)
                cols = slice(j, j + stride * (out_w - 1) + 1, stride)
                grad_padded[:, :, rows, cols] += grad[:, :, :, :, i, j]
        if padding:
            grad_padded = grad_padded[:, :, padding : height - padding, padding : width - padding]
        return grad_padded, None, None, None


class _NormRelu(torch.autograd.Function):
    """Batch normalisation without affine parameters over axis 1 of (P, N, C), optionally then ReLU.

    The means over axis 1 are batched products with a row of 1/N: PyTorch's reductions over a
    middle axis with a short contiguous last axis are several times slower.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, relu: bool) -> torch.Tensor:
        average = x.new_full((x.shape[0], 1, x.shape[1]), 1.0 / x.shape[1])
        centred = x - torch.bmm(average, x)
        scale = torch.rsqrt(torch.bmm(average, centred * centred) + BN_EPS)
        normalised = centred.mul_(scale)
        ctx.relu = relu
        ctx.save_for_backward(normalised, scale, average)
        return torch.relu(normalised) if relu else normalised

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normalised, scale, average = ctx.saved_tensors
        if ctx.relu:
            grad = torch.ops.aten.threshold_backward(grad, normalised, 0)
        out = grad - torch.bmm(average, grad)
        out.addcmul_(normalised, torch.bmm(average, grad * normalised), value=-1.0)
        return out.mul_(scale), None


def batch_norm(x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """Normalise each member's channels (last axis) over all other axes but the first, no affine;
    with `relu`, apply ReLU after it."""
    shape = x.shape
    return _NormRelu.apply(x.reshape(shape[0], -1, shape[-1]), relu).reshape(shape)


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    """Channels-last convolution of every member with its own kernel.

    x: (P, B, H, W, C_in); weight: (P, C_out, C_in, k, k) as in `nn.Conv2d`. Returns (P, B, H', W', C_out).
    """
    members, batch, height, width, channels = x.shape
    out_channels, k = weight.shape[1], weight.shape[-1]
    if k == 1 and padding == 0:
        columns = x[:, :, ::stride, ::stride, :]
    else:
        columns = _Im2col.apply(x, k, stride, padding)  # (P, B, H', W', k*k*C_in), ordered (i, j, c)
    out_h, out_w = columns.shape[2], columns.shape[3]
    matrix = weight.permute(0, 3, 4, 2, 1).reshape(members, k * k * channels, out_channels)
    out = torch.bmm(columns.reshape(members, batch * out_h * out_w, k * k * channels), matrix)
    return out.reshape(members, batch, out_h, out_w, out_channels)


class _MaxPool2(torch.autograd.Function):
    """2x2 max pooling, stride 2, channels-last; the gradient goes to each window's maximum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        corners = [x[:, :, i::2, j::2] for i in range(2) for j in range(2)]
        out = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
        ctx.save_for_backward(x, out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, out = ctx.saved_tensors
        grad_x = torch.zeros_like(x)
        assigned = torch.zeros_like(out, dtype=torch.bool)
        for i in range(2):
            for j in range(2):
                # The first maximum of a window takes the gradient, as in nn.MaxPool2d.
                hit = (x[:, :, i::2, j::2] == out) & ~assigned
                grad_x[:, :, i::2, j::2] = grad * hit
                assigned |= hit
        return grad_x


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """2x2 max pooling with stride 2 and ceil mode, channels-last (P, B, H, W, C)."""
    height, width = x.shape[2], x.shape[3]
    if height % 2 or width % 2:
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2), value=float("-inf"))
    return _MaxPool2.apply(x)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (P, B, F_in) times each member's (F_out, F_in) weight, as in `nn.Linear` without bias."""
    return torch.bmm(x, weight.transpose(1, 2))


# Grouped layout: the population is one network whose channels are the members' channels side by
# side, (B, P*C, H, W) in channels-last memory. Every convolution is grouped by member, so batch
# normalisation per channel is per member and channel.


def _grouped_conv(x: torch.Tensor, weight: torch.Tensor, stride: int = 1, padding: int = 0) -> torch.Tensor:
    members = weight.shape[0]
    return F.conv2d(x, weight.reshape(-1, *weight.shape[2:]), stride=stride, padding=padding, groups=members)


def _grouped_norm(x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    out = F.batch_norm(x, None, None, training=True, eps=BN_EPS)
    return torch.relu(out) if relu else out


LAYOUTS = ("grouped", "bmm")


@dataclass(frozen=True)
class Architecture:
    """Description of a reference model for a population: layer shapes, the frozen head, the forward.

    `features` maps the per-layer weights and a batch in `layout` to features: (P, B, F) for the
    bmm layout, (B, P*F) for the grouped layout.
    """

    name: str
    shapes: tuple[torch.Size, ...]
    head: torch.Tensor  # (classes, features), frozen
    features: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]
    layout: str
    image_input: bool

    @property
    def dim(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)


def _mlp_features(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    out = x.reshape(x.shape[0], x.shape[1], -1)
    for weight in weights:
        out = batch_norm(linear(out, weight), relu=True)
    return out


@dataclass(frozen=True)
class Layers:
    """The primitives of one layout: convolution, normalisation (with optional ReLU), 2x2 pooling."""

    conv: Callable[..., torch.Tensor]
    norm: Callable[..., torch.Tensor]
    pool: Callable[[torch.Tensor], torch.Tensor]
    spatial: tuple[int, int]  # axes of H and W


GROUPED = Layers(_grouped_conv, _grouped_norm, lambda x: F.max_pool2d(x, 2, ceil_mode=True), (2, 3))
BMM = Layers(conv2d, batch_norm, max_pool2, (2, 3))


def _convnet_features_for(layers: Layers) -> Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]:
    def features(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = layers.norm(layers.conv(x, weights[0], padding=1), relu=True)
        for weight in weights[1:]:
            out = layers.pool(layers.norm(layers.conv(out, weight, padding=1), relu=True))
        return out.amax(dim=layers.spatial)  # adaptive max pooling to 1x1

    return features


def _resnet_features_for(model: PreActResNet18, layers: Layers) -> Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]:
    # Per block: stride and whether it has a shortcut convolution (one more weight).
    plan = [(block.conv1.stride[0], block.shortcut is not None) for block in model.blocks]

    def features(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        out = layers.conv(x, weights[0], padding=1)
        index = 1
        for stride, has_shortcut in plan:
            branch = layers.conv(layers.norm(out, relu=True), weights[index], stride=stride, padding=1)
            branch = layers.conv(layers.norm(branch, relu=True), weights[index + 1], padding=1)
            if has_shortcut:
                shortcut = layers.conv(layers.norm(out), weights[index + 2], stride=stride)
                index += 3
            else:
                shortcut = out
                index += 2
            out = branch + shortcut
        return layers.norm(out, relu=True).mean(dim=layers.spatial)  # average pooling to 1x1

    return features


def architecture_of(model: ScaleInvariant, layout: str = "grouped") -> Architecture:
    """Describe a reference model for population training in a layout.

    `grouped` (the default for convolutional models) runs the population as one grouped-convolution
    network in channels-last memory, so oneDNN's blocked kernels do the work. `bmm` uses the
    im2col and batched-matrix-product layout above. The MLP always uses `bmm`: its layers are
    batched matrix products already. Raises TypeError for other modules, ValueError for other layouts.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown population layout {layout!r}; allowed: {', '.join(LAYOUTS)}")
    shapes = tuple(p.shape for p in model.si_parameters())
    head = model.head.weight.detach().clone()
    layers = GROUPED if layout == "grouped" else BMM
    if isinstance(model, ConvNet):
        return Architecture("convnet", shapes, head, _convnet_features_for(layers), layout, True)
    if isinstance(model, PreActResNet18):
        return Architecture("resnet18", shapes, head, _resnet_features_for(model, layers), layout, True)
    if isinstance(model, ScaleInvariantMLP):
        return Architecture("mlp", shapes, head, _mlp_features, "bmm", False)
    raise TypeError(f"no population layout for {type(model).__name__}; use ConvNet, PreActResNet18 or ScaleInvariantMLP")


class PopulationNet:
    """The forward pass of P members with stacked weights W (P, d).

    Data are prepared once (`prepare_inputs`), then each step gathers every member's minibatch
    from them (`gather`) in the architecture's layout.
    """

    def __init__(self, architecture: Architecture, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, compile: bool = False):
        self.architecture = architecture
        self.device = torch.device(device)
        self.dtype = dtype
        self.head = architecture.head.to(self.device, dtype)
        self.sizes = [int(torch.Size(s).numel()) for s in architecture.shapes]
        self.dim = sum(self.sizes)
        # The training step's loss and gradient. With `compile`, torch.compile (inductor) compiles
        # the MLP's hand-written step on its first call. Measurements stay eager, so their varying
        # batch shapes cause no recompilation.
        self.step_loss_and_gradient: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = self.loss_and_gradient
        if compile:
            if architecture.name != "mlp":
                raise ValueError(f"compile applies to the MLP's hand-written step only, not to {architecture.name}; set compile: false")
            self.step_loss_and_gradient = torch.compile(self._mlp_loss_and_gradient, dynamic=False)

    def prepare_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Put a data set on the device: images (N, C, H, W) as channels-last (N, H, W, C)."""
        x = x.to(self.device, self.dtype)
        if self.architecture.image_input and x.dim() == 4:
            return x.permute(0, 2, 3, 1).contiguous()
        return x.reshape(x.shape[0], -1)

    def gather(self, prepared: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Gather every member's minibatch, index (P, B), from the prepared data in the layout's shape."""
        if self.architecture.layout == "grouped":
            # index_select on the flattened index is several times faster than advanced indexing.
            batch = prepared.index_select(0, index.T.reshape(-1)).view(index.shape[1], index.shape[0], *prepared.shape[1:])
            b, members, height, width, channels = batch.shape
            # One copy into (B, H, W, P*C): the channels-last memory of (B, P*C, H, W).
            merged = batch.permute(0, 2, 3, 1, 4).reshape(b, height, width, members * channels).contiguous()
            return merged.permute(0, 3, 1, 2)
        return prepared.index_select(0, index.reshape(-1)).view(*index.shape, *prepared.shape[1:])

    def weights(self, W: torch.Tensor) -> list[torch.Tensor]:
        """Split W (P, d) into per-layer views shaped (P, *layer shape)."""
        members = W.shape[0]
        return [part.reshape(members, *shape) for part, shape in zip(torch.split(W, self.sizes, dim=1), self.architecture.shapes)]

    def logits(self, W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits (P, B, classes) of every member on its own minibatch x, from `gather`."""
        features = self.architecture.features(self.weights(W), x)
        if self.architecture.layout == "grouped":
            features = features.reshape(features.shape[0], W.shape[0], -1).transpose(0, 1)  # (P, B, F)
        return features @ self.head.T

    def losses(self, W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample cross-entropy (P, B) and logits (P, B, classes); x from `gather`, labels y (P, B)."""
        logits = self.logits(W, x)
        members, batch, classes = logits.shape
        per_sample = F.cross_entropy(logits.reshape(-1, classes), y.reshape(-1), reduction="none").reshape(members, batch)
        return per_sample, logits

    def evaluate(self, W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute each member's summed loss (P,) and number of correct predictions (P,), without gradients."""
        with torch.no_grad():
            per_sample, logits = self.losses(W, x, y)
            return per_sample.sum(dim=1), (logits.argmax(dim=-1) == y).sum(dim=1)

    def loss_and_gradient(self, W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute each member's mean minibatch loss (P,) and its gradient with respect to the member's row (P, d)."""
        if self.architecture.name == "mlp":
            return self._mlp_loss_and_gradient(W, x, y)
        W = W.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.losses(W, x, y)[0].mean(dim=1)
            (gradient,) = torch.autograd.grad(loss.sum(), W)
        return loss.detach(), gradient

    def _mlp_loss_and_gradient(self, W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the MLP's loss and gradient with the backward pass written out, without autograd.

        The MLP's steps are so small that autograd's per-node overhead would dominate them. Per
        layer: z = W a, n = batch-normalised z, a = relu(n); then logits = head a and the mean
        cross-entropy. The backward pass applies the chain rule to the same steps, and a test
        compares it with autograd on the reference model.

        Activations are feature-major, (P, features, B): batch statistics and the softmax then
        reduce along contiguous memory, and the frozen head's products are short-by-long matrix
        products, which run several times faster on the CPU than long-by-short ones.
        """
        weights = self.weights(W.detach())
        members, batch = x.shape[0], x.shape[1]
        inputs, normalised, scales = [], [], []
        out = x.reshape(members, batch, -1).transpose(1, 2)  # (P, F_in, B)
        for weight in weights:
            inputs.append(out)
            z = torch.bmm(weight, out)  # (P, F_out, B)
            centred = z - z.mean(dim=2, keepdim=True)
            scale = torch.rsqrt((centred * centred).mean(dim=2, keepdim=True) + BN_EPS)
            n = centred.mul_(scale)
            normalised.append(n)
            scales.append(scale)
            out = torch.relu(n)
        shifted = torch.matmul(self.head, out)  # logits (P, classes, B)
        shifted = shifted - shifted.amax(dim=1, keepdim=True)
        exponentials = shifted.exp()
        partition = exponentials.sum(dim=1, keepdim=True)
        target = y.unsqueeze(1)  # (P, 1, B)
        picked = shifted.gather(1, target) - partition.log()  # log-probability of each label
        loss = -picked.mean(dim=2)[:, 0]

        grad_logits = exponentials.div_(partition)
        grad_logits.scatter_add_(1, target, torch.full_like(picked, -1.0))
        grad_logits.mul_(1.0 / batch)
        grad_out = torch.matmul(self.head.T, grad_logits)  # (P, F, B)
        gradients = [torch.empty(0)] * len(weights)
        for layer in reversed(range(len(weights))):
            n, scale = normalised[layer], scales[layer]
            grad_n = torch.ops.aten.threshold_backward(grad_out, n, 0)
            grad_z = grad_n - grad_n.mean(dim=2, keepdim=True)
            grad_z.addcmul_(n, (grad_n * n).mean(dim=2, keepdim=True), value=-1.0)
            grad_z.mul_(scale)
            gradients[layer] = torch.bmm(grad_z, inputs[layer].transpose(1, 2))  # (P, out, in), as the weight
            if layer:
                grad_out = torch.bmm(weights[layer].transpose(1, 2), grad_z)
        return loss, torch.cat([g.reshape(members, -1) for g in gradients], dim=1)
