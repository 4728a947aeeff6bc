"""The `scale_invariant` kind: real scale-invariant networks trained by SGD under a protocol.

A chunk's points, each with `replicas` members, train together as one population
(`phases.nets.population`). Members with the same width and batch size share one batched network.
Each member draws its minibatches (i.i.d., with replacement) and its injected noise from its own
random stream. A member's stream depends only on its point and replica index, so a
point trains the same whether it shares a chunk or trains alone.

Step of a member with flat weights w, r = ||w||, minibatch gradient g and injected tangent noise
sigma P_w xi / r (the isotropic kind's noise model, so `noise` is the same axis there and here):

- `sphere`: w <- w - elr r0^2 g, then rescaled to ||w|| = r0 (no weight decay);
- `elr`:    w <- w - lr_t (g + wd w) with lr_t = elr ||w||^2, the radius before the step;
- `lr`:     w <- w - lr (g + wd w).

Measurements, at the spec's logging steps (`log`), each with its own period in `params`:
full-batch train loss and accuracy; test loss and accuracy (`test_every`); the full gradient and
the gradient-noise trace from `noise_batches` minibatch gradients (`noise_every`); ||w||, the
effective LR and the angular update of the last step at every logging step. Per-step window sums
give r, r^2, the effective LR, the squared angular update and (sphere) lambda_eff. Every
`snapshot_every` steps of the window the unit weight vector goes into a queue of
`entropy.snapshots` entries for the direction entropy.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from analysis.entropy import direction_entropy
from phases.data.datasets import CIFAR_URL, Dataset, load_cifar, load_digits_dataset, teacher_student
from phases.grid import Chunk
from phases.nets.models import HEAD_NORM, HEAD_SEED, ConvNet, PreActResNet18, ScaleInvariant, ScaleInvariantMLP
from phases.nets.population import PopulationNet, architecture_of
from phases.nets.training import minibatch_noise, protocol_update, tangent_noise
from phases.spec import SweepSpec
from phases.trials.base import ChunkResult, TrialContext, TrialKind, train_with_checkpoints
from phases.trials.isotropic import _drift_z, _relative_drift, _significant, log_schedule

logger = logging.getLogger(__name__)

# Compilers torch.compile's CPU backend can use.
CXX_COMPILERS = ("g++", "clang++", "c++")
# Fraction of the free memory (host RAM, or the GPU's) that one slice's activations may use.
MEMORY_FRACTION = 0.25


class NetworkParams(BaseModel):
    """Fixed parameters of the scale_invariant kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Literal["convnet", "resnet18", "mlp"] = Field("convnet", description="network family")
    dataset: Literal["digits", "cifar10", "cifar100", "teacher_student"] = Field("digits", description="training data")
    data_dir: str | None = Field(None, description="CIFAR: folder holding cifar-10-batches-py/ or cifar-100-python/")
    data_seed: int = Field(1, ge=0, description="seed of the digits train/test split and of the teacher-student data")
    samples: int = Field(2000, ge=10, description="teacher_student: training samples")
    features: int = Field(32, ge=2, description="teacher_student: input features")
    width: int = Field(8, ge=1, description="ConvNet c, ResNet k or MLP hidden units, unless the grid sweeps `width`")
    head_norm: float = Field(HEAD_NORM, gt=0, description="Frobenius norm of the frozen classifier head")
    head_seed: int = Field(HEAD_SEED, ge=0, description="seed of the frozen head")
    init_seed: int = Field(1, ge=0, description="seed of the initial weights, shared by every point")
    radius0: float = Field(1.0, gt=0, description="initial ||w|| under elr and lr (sphere starts at its radius)")
    max_radius: float = Field(1e6, gt=1, description="a member whose ||w|| leaves [1/max_radius, max_radius] has diverged")
    layout: Literal["grouped", "bmm"] = Field("grouped", description="population layout of convolutional models")
    dtype: Literal["float32", "float64"] = Field("float32", description="arithmetic precision")
    eval_batch: int = Field(512, ge=1, description="samples per member per pass in full-batch evaluations")
    noise_batches: int = Field(32, ge=2, description="minibatch gradients per noise-trace measurement")
    noise_every: int = Field(1, ge=1, description="measure gradient and noise at every n-th logging step")
    test_every: int = Field(1, ge=1, description="evaluate the test set at every n-th logging step")
    snapshot_every: int = Field(25, ge=1, description="steps between weight snapshots for the entropy queue")
    max_members: int | None = Field(None, ge=1, description="members per batched slice; null: sized from free memory")
    compile: bool = Field(False, description="mlp: compile the training step with torch.compile (needs a C++ compiler; 10-30 s once per process)")

    @model_validator(mode="after")
    def _model_fits_data(self) -> "NetworkParams":
        if self.dataset == "teacher_student" and self.model != "mlp":
            raise ValueError(f"dataset teacher_student has feature vectors, not images; use model: mlp (got model: {self.model})")
        if self.compile and self.model != "mlp":
            raise ValueError(f"compile: true applies to model: mlp only (got model: {self.model}); set compile: false")
        if self.dataset.startswith("cifar") and not self.data_dir:
            raise ValueError(
                f"dataset {self.dataset} needs data_dir, the folder with the CIFAR 'python version' files; "
                "nothing is downloaded"
            )
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


def load_dataset(params: NetworkParams) -> Dataset:
    """Load the data set the parameters name, whole, on the CPU."""
    if params.dataset == "digits":
        return load_digits_dataset(seed=params.data_seed)
    if params.dataset == "teacher_student":
        return teacher_student(samples=params.samples, features=params.features, seed=params.data_seed)
    return load_cifar(params.data_dir or "", classes=10 if params.dataset == "cifar10" else 100)


def build_network(params: NetworkParams, width: int, input_shape: tuple[int, ...], classes: int) -> ScaleInvariant:
    """Build the reference model of one width, its weights drawn with `init_seed`."""
    torch.manual_seed(params.init_seed)
    if params.model == "convnet":
        return ConvNet(width, input_shape[0], classes, params.head_norm, params.head_seed)
    if params.model == "resnet18":
        return PreActResNet18(width, input_shape[0], classes, params.head_norm, params.head_seed)
    features = int(np.prod(input_shape))
    return ScaleInvariantMLP(features, (width, width), classes, params.head_norm, params.head_seed)


def member_seed(point_id: str, seed: int, replica: int) -> int:
    """Seed of one member's random stream: its point, the point's seed coordinate and the replica."""
    material = [int(point_id, 16), int(seed), int(replica)]
    return int(np.random.SeedSequence(material).generate_state(1, dtype=np.uint64)[0] >> 1)


class Slice:
    """Members that share one batched network (same width and batch size), stepped together."""

    def __init__(self, net: PopulationNet, rows: list[int], width: int, batch_size: int, device: torch.device):
        self.net = net
        self.width = width
        self.rows = rows  # indices into the population's member list
        self.rows_tensor = torch.tensor(rows, device=device)
        # Consecutive rows index the population's per-member tensors as a view; others by gather.
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self.select: slice | torch.Tensor = slice(rows[0], rows[0] + len(rows)) if consecutive else self.rows_tensor
        self.batch_size = batch_size
        self.device = device
        self.any_diverged = False  # set once a member diverges; restored from `diverged` on resume
        self.index_cache = torch.empty(len(rows), 0, batch_size, dtype=torch.int64, device=device)
        self.cache_position = INDEX_BLOCK  # the first step draws a block
        # Per-member settings (M, 1) and the rows that draw injected noise, set by the population.
        self.lr = self.wd = self.sigma = self.radius = torch.empty(0)
        self.noisy: list[int] = []


class NetworkPopulation:
    """Every member of a chunk: weights, random streams, window sums, logs and snapshots."""

    def __init__(self, chunk: Chunk, spec: SweepSpec, params: NetworkParams, data: Dataset, device: torch.device):
        self.params = params
        self.protocol = chunk.protocol
        self.steps = chunk.steps
        self.replicas = spec.replicas
        self.device = device
        self.dtype = params.torch_dtype
        self.n_points = len(chunk.points)
        self.classes = data.classes

        widths = [int(p.coords.get("width") or params.width) for p in chunk.points]
        batches = [int(p.coords.get("batch_size") or 128) for p in chunk.points]
        self.members = [(p, r) for p in range(self.n_points) for r in range(self.replicas)]
        n = len(self.members)

        def column(name: str, default: float) -> torch.Tensor:
            values = [chunk.points[p].coords.get(name) for p, _ in self.members]
            return torch.tensor([[default if v is None else float(v)] for v in values], dtype=torch.float64, device=device)

        self.lr = column("lr", 0.0)  # (M, 1)
        self.wd = column("wd", 0.0) if self.protocol != "sphere" else torch.zeros_like(self.lr)
        self.sigma = column("noise", 0.0)
        self.radius = column("radius", 1.0)

        # One reference model per width: its initial weights are every member's start.
        self.models: dict[int, ScaleInvariant] = {}
        self.x_train: dict[int, torch.Tensor] = {}
        for width in sorted(set(widths)):
            self.models[width] = build_network(params, width, data.input_shape, data.classes)
        self.dims = {w: sum(p.numel() for p in m.si_parameters()) for w, m in self.models.items()}
        self.member_width = [widths[p] for p, _ in self.members]
        self.member_dim = torch.tensor([[self.dims[w]] for w in self.member_width], dtype=torch.float64, device=device)

        # Slices: members grouped by (width, batch size), cut to the memory budget.
        self.slices: list[Slice] = []
        self.nets: dict[int, PopulationNet] = {}
        self.train: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.test: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        keys = sorted({(self.member_width[m], batches[self.members[m][0]]) for m in range(n)})
        for width, batch in keys:
            net = self.nets.get(width)
            if net is None:
                net = PopulationNet(architecture_of(self.models[width], params.layout), device, self.dtype, params.compile)
                self.nets[width] = net
                self.train[width] = (net.prepare_inputs(data.x_train), data.y_train.to(device))
                self.test[width] = (net.prepare_inputs(data.x_test), data.y_test.to(device))
            rows = [m for m in range(n) if self.member_width[m] == width and batches[self.members[m][0]] == batch]
            size = params.max_members or members_per_slice(self.models[width], data.input_shape, max(batch, params.eval_batch), self.dtype, device)
            for start in range(0, len(rows), size):
                self.slices.append(Slice(net, rows[start : start + size], width, batch, device))
        self.member_batch = [batches[p] for p, _ in self.members]
        for piece in self.slices:
            piece.lr, piece.wd = self.lr[piece.select], self.wd[piece.select]
            piece.sigma, piece.radius = self.sigma[piece.select], self.radius[piece.select]
            piece.noisy = [row for row, member in enumerate(piece.rows) if float(self.sigma[member, 0]) > 0]

        # Weights: one tensor per slice (rows of equal dim); the start is shared by all points.
        self.initial = {w: torch.nn.utils.parameters_to_vector(m.si_parameters()).detach().to(device, self.dtype) for w, m in self.models.items()}
        self.W: list[torch.Tensor] = []
        for piece in self.slices:
            start = torch.stack([self.initial[self.member_width[m]] for m in piece.rows])
            target = self.radius[piece.rows] if self.protocol == "sphere" else torch.full_like(self.radius[piece.rows], params.radius0)
            self.W.append(start / torch.linalg.vector_norm(start, dim=1, keepdim=True) * target.to(self.dtype))

        self.generators = [torch.Generator(device=device) for _ in range(n)]
        self.measure_generators = [torch.Generator(device=device) for _ in range(n)]
        for m, (p, r) in enumerate(self.members):
            point = chunk.points[p]
            seed = member_seed(point.point_id, int(point.coords.get("seed") or 0), r)
            self.generators[m].manual_seed(seed)
            self.measure_generators[m].manual_seed(seed ^ 0x5DEECE66D)

        self.step = 0
        self.window_start = int(math.floor(spec.stationary.start * self.steps))
        self.window_mid = (self.window_start + self.steps) // 2
        self.log_steps = log_schedule(self.steps, spec.log.points, spec.log.linear)
        self.snapshot_steps = snapshot_steps(self.window_start, self.steps, spec.entropy.snapshots, params.snapshot_every)
        self.snapshots = [
            torch.zeros(len(self.snapshot_steps), len(piece.rows), self.W[i].shape[1], dtype=torch.float32, device=device)
            for i, piece in enumerate(self.slices)
        ]

        # Per-step window sums per member and window half: r, r^2, elr, angle^2, lambda_eff.
        self.step_sums = torch.zeros(len(STEP_SUMS), 2, n, dtype=torch.float64, device=device)
        self.step_count = torch.zeros(2, dtype=torch.float64)
        # Per-log window sums per member and half: loss, loss^2, noise, grad^2, and their counts.
        self.log_sums = torch.zeros(len(LOG_SUMS), 2, n, dtype=torch.float64, device=device)
        self.log_counts = torch.zeros(len(LOG_SUMS), 2, n, dtype=torch.float64, device=device)
        self.last_angle = torch.zeros(n, dtype=torch.float64, device=device)
        self.last_lambda_eff = torch.full((n,), float("nan"), dtype=torch.float64, device=device)
        self.diverged = torch.zeros(n, dtype=torch.bool, device=device)
        self.diverged_step = np.full(n, -1, dtype=np.int64)
        self.log_rows: list[np.ndarray] = []  # each (n, LOG_COLUMNS)

    # -- stepping ---------------------------------------------------------------------------

    def advance(self, until: int) -> None:
        """Run steps until `self.step == until`, measuring at logging steps."""
        log_set = set(self.log_steps.tolist())
        log_index = {int(s): i for i, s in enumerate(self.log_steps)}
        snapshot_index = {int(s): i for i, s in enumerate(self.snapshot_steps)}
        while self.step < until:
            half = 0 if self.step < self.window_mid else 1
            in_window = self.step >= self.window_start
            record_angle = (self.step + 1) in log_set
            for index, piece in enumerate(self.slices):
                self.W[index] = self._step_slice(piece, self.W[index], in_window, half, record_angle)
            if in_window:
                self.step_count[half] += 1
            self.step += 1
            if self.step in snapshot_index:
                for index, piece in enumerate(self.slices):
                    W = self.W[index]
                    self.snapshots[index][snapshot_index[self.step]] = (W / torch.linalg.vector_norm(W, dim=1, keepdim=True)).float()
            if self.step in log_set:
                self.log_rows.append(self._measure(log_index[self.step]))

    def _step_slice(self, piece: Slice, W: torch.Tensor, in_window: bool, half: int, record_angle: bool) -> torch.Tensor:
        x_all, y_all = self.train[piece.width]
        index = self._next_minibatches(piece, len(y_all))
        loss, gradient = piece.net.step_loss_and_gradient(W, piece.net.gather(x_all, index), torch.take(y_all, index))

        W64 = W.to(torch.float64)
        g = gradient.to(torch.float64)
        if piece.noisy:
            # Only members with noise draw it, so a member's stream does not depend on its neighbours.
            xi = torch.zeros_like(g)
            for row in piece.noisy:
                torch.randn(W.shape[1], generator=self.generators[piece.rows[row]], device=piece.device, dtype=torch.float64, out=xi[row])
            g = g + tangent_noise(W64, xi, piece.sigma)
        moved, lr_t, r = protocol_update(W64, g, self.protocol, piece.lr, piece.wd, piece.radius)
        norm_after = torch.linalg.vector_norm(moved, dim=1, keepdim=True)

        # A non-finite loss or gradient makes the norm NaN, and NaN fails both comparisons.
        healthy = (norm_after[:, 0] < self.params.max_radius) & (norm_after[:, 0] > 1.0 / self.params.max_radius)
        if not bool(healthy.all()):
            newly = ~healthy & ~self.diverged[piece.select]
            for row in torch.nonzero(newly).flatten().tolist():
                self.diverged_step[piece.rows[row]] = self.step + 1
            self.diverged[piece.select] |= ~healthy
            piece.any_diverged = True
        parked = self.diverged[piece.select]
        if piece.any_diverged:
            # Keep diverged members finite at their start; their points are reported diverged.
            start = torch.stack([self.initial[self.member_width[m]] for m in piece.rows]).to(torch.float64)
            moved = torch.where(parked[:, None], start, torch.nan_to_num(moved))
            norm_after = torch.linalg.vector_norm(moved, dim=1, keepdim=True)

        u_new = moved / norm_after if self.protocol == "sphere" or in_window or record_angle else None
        if in_window or record_angle:
            angle2 = ((u_new - W64 / r) ** 2).sum(dim=1)
            if record_angle:
                self.last_angle[piece.select] = 2.0 * torch.arcsin(torch.clamp(angle2.sqrt() / 2.0, max=1.0))
        lambda_eff = None
        if self.protocol == "sphere":
            lambda_eff = ((norm_after - piece.radius) / (piece.lr * piece.radius**3))[:, 0]
            self.last_lambda_eff[piece.select] = lambda_eff
            moved = u_new * piece.radius
        if in_window:
            r1 = r[:, 0]
            values = torch.stack([r1, r1 * r1, (lr_t / (r * r)).expand_as(r)[:, 0], angle2, lambda_eff if lambda_eff is not None else torch.zeros_like(r1)])
            self.step_sums[:, half, piece.select] += values.masked_fill_(parked, 0.0)
        return moved.to(self.dtype)

    def _next_minibatches(self, piece: Slice, samples: int) -> torch.Tensor:
        """Return this step's minibatch indices (P, B), drawn with replacement.

        Each member draws INDEX_BLOCK steps of indices at once from its own stream, so the per-call
        cost is paid once per block. The draws depend only on the member's stream, not on its slice.
        """
        if piece.cache_position >= INDEX_BLOCK:
            piece.index_cache = torch.stack(
                [torch.randint(samples, (INDEX_BLOCK, piece.batch_size), generator=self.generators[m], device=piece.device) for m in piece.rows]
            )
            piece.cache_position = 0
        index = piece.index_cache[:, piece.cache_position]
        piece.cache_position += 1
        return index

    # -- measurements -----------------------------------------------------------------------

    def _full_pass(self, piece: Slice, W: torch.Tensor, data: tuple[torch.Tensor, torch.Tensor], gradient: bool):
        """Full-data loss (P,), accuracy (P,) and, with `gradient`, the full gradient (P, d)."""
        x_all, y_all = data
        total = len(y_all)
        members = W.shape[0]
        loss_sum = torch.zeros(members, dtype=torch.float64, device=W.device)
        correct = torch.zeros(members, dtype=torch.float64, device=W.device)
        grad = torch.zeros(W.shape, dtype=torch.float64, device=W.device) if gradient else None
        for start in range(0, total, self.params.eval_batch):
            index = torch.arange(start, min(total, start + self.params.eval_batch), device=W.device).expand(members, -1)
            x, y = piece.net.gather(x_all, index), y_all[index]
            s, c = piece.net.evaluate(W, x, y)
            loss_sum += s.to(torch.float64)
            correct += c.to(torch.float64)
            if grad is not None:
                _, g = piece.net.loss_and_gradient(W, x, y)
                grad += g.to(torch.float64) * (index.shape[1] / total)
        return loss_sum / total, correct / total, grad

    def _noise_trace(self, piece: Slice, W: torch.Tensor, full_gradient: torch.Tensor) -> torch.Tensor:
        """Mean ||g_b - g_full||^2 over `noise_batches` minibatch gradients per member (P,).

        Minibatches come from each member's measurement stream, so measuring does not change training.
        """
        x_all, y_all = self.train[self.member_width[piece.rows[0]]]

        def draw() -> torch.Tensor:
            index = torch.stack(
                [torch.randint(len(y_all), (piece.batch_size,), generator=self.measure_generators[m], device=W.device) for m in piece.rows]
            )
            return piece.net.loss_and_gradient(W, piece.net.gather(x_all, index), y_all[index])[1]

        return minibatch_noise(draw, full_gradient, self.params.noise_batches)

    def _measure(self, log_position: int) -> np.ndarray:
        """Measure every member at a logging step, add the window sums, and return the log row (M, LOG_COLUMNS)."""
        n = len(self.members)
        row = torch.full((n, LOG_COLUMNS), float("nan"), dtype=torch.float64, device=self.device)
        row[:, 0] = float(self.step)
        noise_now = log_position % self.params.noise_every == 0 or self.step == self.steps
        test_now = log_position % self.params.test_every == 0 or self.step == self.steps
        in_window = self.step > self.window_start
        half = 0 if self.step <= self.window_mid else 1

        for index, piece in enumerate(self.slices):
            W = self.W[index]
            rows = piece.rows_tensor
            r = torch.linalg.vector_norm(W.to(torch.float64), dim=1)
            loss, accuracy, full_gradient = self._full_pass(piece, W, self.train[self.member_width[piece.rows[0]]], noise_now)
            row[rows, 1], row[rows, 2], row[rows, 3] = loss, accuracy, r
            elr = self.lr[piece.rows, 0] if self.protocol != "lr" else self.lr[piece.rows, 0] / (r * r)
            row[rows, 4] = elr
            row[rows, 5] = self.last_angle[rows]
            row[rows, 13] = self.last_lambda_eff[rows]
            if test_now:
                test_loss, test_accuracy, _ = self._full_pass(piece, W, self.test[self.member_width[piece.rows[0]]], False)
                row[rows, 6], row[rows, 7] = test_loss, test_accuracy
            if noise_now and full_gradient is not None:
                dim = self.member_dim[piece.rows, 0]
                minibatch = self._noise_trace(piece, W, full_gradient) * r * r
                noise = minibatch + self.sigma[piece.rows, 0] ** 2 * (dim - 1)
                grad_norm = torch.linalg.vector_norm(full_gradient, dim=1) * r
                sigma2 = noise / (dim - 1)
                row[rows, 8], row[rows, 9], row[rows, 10] = grad_norm, noise, sigma2
                row[rows, 11] = grad_norm / noise.clamp_min(1e-300).sqrt()
                row[rows, 12] = temperature(self.protocol, self.lr[piece.rows, 0], self.wd[piece.rows, 0], sigma2, dim)

        valid = ~self.diverged
        if in_window:
            for k, column in enumerate((1, 9, 8, 6, 7, 2)):
                values = row[:, column] if column != 8 else row[:, 8] ** 2
                present = torch.isfinite(values) & valid
                self.log_sums[k, half] += torch.where(present, values, 0.0)
                self.log_counts[k, half] += present.to(torch.float64)
            present = torch.isfinite(row[:, 1]) & valid
            self.log_sums[LOG_SUMS.index("loss2"), half] += torch.where(present, row[:, 1] ** 2, 0.0)
            self.log_counts[LOG_SUMS.index("loss2"), half] += present.to(torch.float64)

        row[self.diverged] = torch.where(torch.arange(LOG_COLUMNS, device=self.device) == 0, row[self.diverged], float("nan"))
        return row.cpu().numpy()

    # -- checkpoints ------------------------------------------------------------------------

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays: dict[str, np.ndarray] = {
            "step_sums": self.step_sums.cpu().numpy(),
            "step_count": self.step_count.numpy(),
            "log_sums": self.log_sums.cpu().numpy(),
            "log_counts": self.log_counts.cpu().numpy(),
            "last_angle": self.last_angle.cpu().numpy(),
            "last_lambda_eff": self.last_lambda_eff.cpu().numpy(),
            "diverged": self.diverged.cpu().numpy(),
            "diverged_step": self.diverged_step,
            "log_rows": np.array(self.log_rows).reshape(len(self.log_rows), len(self.members), LOG_COLUMNS),
            "generators": np.stack([g.get_state().cpu().numpy() for g in self.generators]),
            "measure_generators": np.stack([g.get_state().cpu().numpy() for g in self.measure_generators]),
        }
        for index, piece in enumerate(self.slices):
            arrays[f"W{index}"] = self.W[index].cpu().numpy()
            arrays[f"snapshots{index}"] = self.snapshots[index].cpu().numpy()
            arrays[f"index_cache{index}"] = piece.index_cache.cpu().numpy()
        positions = [piece.cache_position for piece in self.slices]
        return arrays, {"step": self.step, "slices": len(self.slices), "cache_positions": positions}

    def load(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if int(meta["slices"]) != len(self.slices):
            raise RuntimeError(
                f"cannot resume: the checkpoint has {meta['slices']} slices but this machine makes {len(self.slices)}; set params.max_members so that both agree"
            )
        device = self.device
        self.step_sums = torch.as_tensor(arrays["step_sums"], device=device).clone()
        self.step_count = torch.as_tensor(arrays["step_count"]).clone()
        self.log_sums = torch.as_tensor(arrays["log_sums"], device=device).clone()
        self.log_counts = torch.as_tensor(arrays["log_counts"], device=device).clone()
        self.last_angle = torch.as_tensor(arrays["last_angle"], device=device).clone()
        self.last_lambda_eff = torch.as_tensor(arrays["last_lambda_eff"], device=device).clone()
        self.diverged = torch.as_tensor(arrays["diverged"], device=device).clone()
        for piece in self.slices:
            piece.any_diverged = bool(self.diverged[piece.rows_tensor].any())
        self.diverged_step = arrays["diverged_step"].copy()
        self.log_rows = list(arrays["log_rows"])
        for generator, state in zip(self.generators, arrays["generators"]):
            generator.set_state(torch.as_tensor(state))
        for generator, state in zip(self.measure_generators, arrays["measure_generators"]):
            generator.set_state(torch.as_tensor(state))
        for index, piece in enumerate(self.slices):
            self.W[index] = torch.as_tensor(arrays[f"W{index}"], device=device).clone()
            self.snapshots[index] = torch.as_tensor(arrays[f"snapshots{index}"], device=device).clone()
            piece.index_cache = torch.as_tensor(arrays[f"index_cache{index}"], device=device).clone()
            piece.cache_position = int(meta["cache_positions"][index])
        self.step = int(meta["step"])


STEP_SUMS = ("r", "r2", "elr", "angular2", "lambda_eff")
# Steps of minibatch indices each member draws at once.
INDEX_BLOCK = 64
LOG_SUMS = ("loss", "noise", "grad2", "test_loss", "test_acc", "train_acc", "loss2")
# Log row: step, loss, train_acc, radius, elr, angle, test_loss, test_acc, grad_norm, noise_trace,
# sigma2, snr, temperature, lambda_eff.
LOG_COLUMNS = 14


def temperature(protocol: str, lr: torch.Tensor, wd: torch.Tensor, sigma2: torch.Tensor, dim: torch.Tensor) -> torch.Tensor:
    """T per protocol: elr sigma^2 / 2 (sphere, elr), sqrt(lr wd sigma^2 / (2 (d - 1))) (lr)."""
    if protocol == "lr":
        return torch.sqrt(lr * wd * sigma2 / (2.0 * (dim - 1)))
    return lr * sigma2 / 2.0


def snapshot_steps(window_start: int, steps: int, count: int, every: int) -> np.ndarray:
    """Return the last `count` multiples of `every` up to `steps` inside the window (window_start, steps]."""
    candidates = steps - every * np.arange(count, dtype=np.int64)
    return np.unique(candidates[candidates > window_start])


def members_per_slice(model: ScaleInvariant, input_shape: tuple[int, ...], batch: int, dtype: torch.dtype, device: torch.device) -> int:
    """Return how many members one batched slice may hold, keeping activations within MEMORY_FRACTION of free memory.

    The activation size per sample comes from one forward pass of the reference model. A member's
    training step keeps about four such tensors alive (outputs, saved inputs, gradients).
    NOTE: the factor four is an estimate; set params.max_members where it is off.
    """
    sizes: list[int] = []
    hooks = [module.register_forward_hook(lambda _m, _i, out: sizes.append(out[0].numel())) for module in model.modules() if not list(module.children())]
    try:
        with torch.no_grad():
            model.train()
            model(torch.zeros(2, *input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    per_member = 4 * sum(sizes) * batch * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        free = min(free, int(torch.cuda.get_per_process_memory_fraction(device) * total))
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(1, int(MEMORY_FRACTION * free // max(per_member, 1)))


class NetworkKind(TrialKind):
    """Scale-invariant ConvNet, ResNet-18 or MLP under sphere, elr or lr, as a population."""

    name = "scale_invariant"
    params_model = NetworkParams

    def axes_for(self, protocol: str) -> tuple[str, ...]:
        if protocol == "sphere":
            return ("lr", "radius", "noise", "batch_size", "seed", "width")
        return ("lr", "wd", "noise", "batch_size", "seed", "width")

    def required_axes(self, protocol: str) -> tuple[str, ...]:
        return ("lr",) if protocol == "sphere" else ("lr", "wd")

    def axis_defaults(self, protocol: str, params: BaseModel | None = None) -> dict[str, Any]:
        width = params.width if isinstance(params, NetworkParams) else NetworkParams().width
        defaults: dict[str, Any] = {"noise": 0.0, "seed": 0, "batch_size": 128, "width": width}
        if protocol == "sphere":
            defaults.update(radius=1.0, wd=0.0)
        return defaults

    def check_inputs(self, spec: SweepSpec, store: Any = None) -> None:
        """CIFAR: every batch file must exist under data_dir (checked here, on the driver)."""
        params = self.validate_params(spec.params)
        if params.compile and not any(shutil.which(name) for name in CXX_COMPILERS):
            raise RuntimeError(
                f"params.compile is true, but no C++ compiler ({', '.join(CXX_COMPILERS)}) is on PATH, and torch.compile needs one "
                "on every node; install one (for example: apt install g++) or set compile: false"
            )
        if params.dataset.startswith("cifar"):
            missing = [path for path in cifar_files(params) if not path.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"CIFAR file {missing[0]} not found (params.data_dir = {params.data_dir!r}); download the CIFAR "
                    f"'python version' archive from {CIFAR_URL}, extract it, and set data_dir to the folder that contains "
                    f"{missing[0].parent.name}/"
                )
            # Reading the files once here (seconds) turns a malformed file into an error before Ray starts.
            load_dataset(params)

    def estimate_seconds(self, chunks: list[Chunk], spec: SweepSpec) -> float:
        params = self.validate_params(spec.params)
        total = 0.0
        for chunk in chunks:
            for point in chunk.points:
                width = int(point.coords.get("width") or params.width)
                batch = int(point.coords.get("batch_size") or 128)
                per_step = measured_seconds_per_sample(params, width) * batch
                logs = len(log_schedule(chunk.steps, spec.log.points, spec.log.linear))
                samples = dataset_size(params)
                measurement = logs * (samples * 3 + params.noise_batches * batch * 3 / params.noise_every) / batch
                total += spec.replicas * per_step * (chunk.steps + measurement)
        return total

    def run(self, chunk: Chunk, context: TrialContext) -> ChunkResult:
        spec = context.spec
        params = self.validate_params(spec.params)
        torch.set_num_threads(max(1, int(spec.resources.cpu)))
        device = torch.device(context.device)
        if device.type == "cuda" and 0 < spec.resources.gpu < 1:
            # A trial given a GPU fraction keeps its CUDA allocations within that fraction.
            # NOTE: not run on a GPU here; bench/gpu_check.py is the check for GPU machines.
            torch.cuda.set_per_process_memory_fraction(spec.resources.gpu, device)
        data = load_dataset(params)
        population = NetworkPopulation(chunk, spec, params, data, device)
        logger.info(
            "chunk %s: %d members in %d slices on %s", chunk.chunk_id, len(population.members), len(population.slices), device
        )

        train_with_checkpoints(population, chunk.steps, max(10, chunk.steps // 100), context, chunk.chunk_id)
        return ChunkResult(_trajectories(chunk, population), _summaries(chunk, population, spec))


def cifar_files(params: NetworkParams) -> list[Path]:
    """List the files `load_cifar` reads for the parameters' CIFAR data set."""
    root = Path(params.data_dir or "")
    folder_name = "cifar-10-batches-py" if params.dataset == "cifar10" else "cifar-100-python"
    folder = root if root.name == folder_name else root / folder_name
    if params.dataset == "cifar10":
        return [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    return [folder / "train", folder / "test"]


def dataset_size(params: NetworkParams) -> int:
    """Training samples of the data set, for estimates."""
    return {"digits": 1437, "cifar10": 50000, "cifar100": 50000}.get(params.dataset, params.samples)


_SAMPLE_SECONDS: dict[tuple[str, int, str], float] = {}


def measured_seconds_per_sample(params: NetworkParams, width: int) -> float:
    """Seconds per training sample of one member's step, from a short probe of an 8-member slice."""
    key = (params.model, width, params.dataset)
    if key not in _SAMPLE_SECONDS:
        shape = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32)}.get(params.dataset, (params.features,))
        classes = 100 if params.dataset == "cifar100" else 10
        model = build_network(params, width, shape, classes)
        net = PopulationNet(architecture_of(model, params.layout))
        members, batch = 8, 32
        x = net.prepare_inputs(torch.randn(batch, *shape))
        index = torch.randint(batch, (members, batch))
        W = torch.randn(members, net.dim)
        y = torch.randint(classes, (batch,))
        net.loss_and_gradient(W, net.gather(x, index), y[index])
        started = time.perf_counter()
        for _ in range(2):
            net.loss_and_gradient(W, net.gather(x, index), y[index])
        _SAMPLE_SECONDS[key] = (time.perf_counter() - started) / (2 * members * batch)
    return _SAMPLE_SECONDS[key]


def _trajectories(chunk: Chunk, population: NetworkPopulation) -> dict[str, dict[str, Any]]:
    rows = np.array(population.log_rows)  # (logs, members, LOG_COLUMNS)
    out: dict[str, dict[str, Any]] = {}
    replicas = population.replicas
    for p, point in enumerate(chunk.points):
        table = rows[:, p * replicas : (p + 1) * replicas, :]  # (logs, R, columns)
        with np.errstate(invalid="ignore"):
            mean = np.nanmean(table, axis=1) if replicas > 1 else table[:, 0, :]
            loss_std = np.nanstd(table[:, :, 1], axis=1) if replicas > 1 else np.full(len(table), np.nan)
        out[point.point_id] = {
            "step": rows[:, 0, 0].astype(np.int64),
            "loss": mean[:, 1],
            "loss_std": loss_std,
            "train_acc": mean[:, 2],
            "radius_norm": mean[:, 3],
            "elr": mean[:, 4],
            "angular_update": mean[:, 5],
            "test_loss": mean[:, 6],
            "test_acc": mean[:, 7],
            "grad_norm": mean[:, 8],
            "noise_trace": mean[:, 9],
            "sigma2": mean[:, 10],
            "snr": mean[:, 11],
            "temperature": mean[:, 12],
            "lambda_eff": mean[:, 13],
        }
    return out


def _summaries(chunk: Chunk, population: NetworkPopulation, spec: SweepSpec) -> dict[str, dict[str, Any]]:
    replicas = population.replicas
    step_sums = population.step_sums.cpu().numpy()  # (STEP_SUMS, 2, members)
    step_count = population.step_count.numpy()  # (2,)
    log_sums = population.log_sums.cpu().numpy()  # (LOG_SUMS, 2, members)
    log_counts = population.log_counts.cpu().numpy()
    diverged = population.diverged.cpu().numpy()
    snapshots = {}
    for index, piece in enumerate(population.slices):
        for row, member in enumerate(piece.rows):
            snapshots[member] = population.snapshots[index][:, row, :].cpu().numpy()

    uniform = uniform_levels(population, spec)
    out: dict[str, dict[str, Any]] = {}
    for p, point in enumerate(chunk.points):
        members = list(range(p * replicas, (p + 1) * replicas))
        width = population.member_width[members[0]]
        dim = population.dims[width]
        is_diverged = bool(diverged[members].any())
        steps_done = int(population.diverged_step[members][population.diverged_step[members] >= 0].min()) if is_diverged else None
        summary: dict[str, Any] = {
            "dim": dim,
            "replicas": replicas,
            "window_start": population.window_start,
            "window_end": population.steps,
            "diverged": is_diverged,
            "diverged_step": steps_done,
            "loss_min": None,
            "U_uniform": uniform[width][0],
            "S_uniform_direction": uniform[width][1],
        }
        total_steps = step_count.sum() * replicas
        count = log_counts[:, :, members].sum(axis=(1, 2))  # (LOG_SUMS,)
        if is_diverged or total_steps == 0 or count[0] == 0:
            out[point.point_id] = {**summary, "stationary": False}
            continue

        def step_mean(name: str) -> float:
            return float(step_sums[STEP_SUMS.index(name)][:, members].sum() / total_steps)

        def log_mean(name: str) -> float | None:
            k = LOG_SUMS.index(name)
            return float(log_sums[k][:, members].sum() / count[k]) if count[k] else None

        U = log_mean("loss")
        r_mean, r2 = step_mean("r"), step_mean("r2")
        noise = log_mean("noise")
        grad2 = log_mean("grad2")
        half_U = log_sums[0][:, members].sum(axis=1) / np.maximum(log_counts[0][:, members].sum(axis=1), 1)
        half_r2 = step_sums[1][:, members].sum(axis=1) / np.maximum(step_count * replicas, 1)
        replica_U = log_sums[0][:, members] / np.maximum(log_counts[0][:, members], 1)  # (2, R)
        replica_r2 = step_sums[1][:, members] / np.maximum(step_count[:, None], 1)
        directions = np.concatenate([snapshots[m] for m in members])
        directions = directions[np.linalg.norm(directions, axis=1) > 0]
        entropy = direction_entropy(directions, k=spec.entropy.k, standardise=False) if len(directions) > spec.entropy.k + 1 else None
        replica_means = log_sums[0][:, members].sum(axis=0) / np.maximum(log_counts[0][:, members].sum(axis=0), 1)
        measured = {
            "U": U,
            "U_std": math.sqrt(max(log_mean("loss2") - U * U, 0.0)),
            "U_sem": float(replica_means.std(ddof=1) / math.sqrt(replicas)) if replicas > 1 else None,
            "r": r_mean,
            "r2": r2,
            "r_std": math.sqrt(max(r2 - r_mean**2, 0.0)),
            "elr_mean": step_mean("elr"),
            "angular_update2": step_mean("angular2"),
            "grad_norm2": grad2,
            "noise_trace": noise,
            "sigma2": noise / (dim - 1) if noise is not None else None,
            "snr": math.sqrt(grad2 / noise) if noise and grad2 is not None else None,
            "lambda_eff": step_mean("lambda_eff") if population.protocol == "sphere" else None,
            "S_direction": entropy,
            "entropy_samples": int(len(directions)),
            "drift_r2": _relative_drift(half_r2),
            "drift_U": _relative_drift(half_U),
            "drift_z_r2": _drift_z(replica_r2),
            "drift_z_U": _drift_z(replica_U) if replicas > 1 else _half_z(log_sums, log_counts, members),
            "test_loss": log_mean("test_loss"),
            "test_acc": log_mean("test_acc"),
            "train_acc": log_mean("train_acc"),
        }
        stationary = not (
            _significant(measured["drift_r2"], measured["drift_z_r2"]) or _significant(measured["drift_U"], measured["drift_z_U"])
        )
        out[point.point_id] = {**summary, **measured, "stationary": bool(stationary)}
    return out


def _half_z(log_sums: np.ndarray, log_counts: np.ndarray, members: list[int]) -> float | None:
    """z-score of the loss change between window halves of one chain, from its logged values.

    Logged losses are treated as independent samples of each half, because they are hundreds of
    steps apart, much longer than the loss's correlation time in the stationary state.
    """
    k, k2 = LOG_SUMS.index("loss"), LOG_SUMS.index("loss2")
    n = log_counts[k][:, members].sum(axis=1)
    if (n < 2).any():
        return None
    mean = log_sums[k][:, members].sum(axis=1) / n
    var = np.maximum(log_sums[k2][:, members].sum(axis=1) / n - mean**2, 0.0) * n / (n - 1)
    spread = math.sqrt(var[0] / n[0] + var[1] / n[1])
    if spread == 0:
        return 0.0 if mean[1] == mean[0] else float(np.sign(mean[1] - mean[0]) * np.inf)
    return float((mean[1] - mean[0]) / spread)


def uniform_levels(population: NetworkPopulation, spec: SweepSpec) -> dict[int, tuple[float, float | None]]:
    """Per width: mean train loss at random directions, and the entropy estimate of as many uniform
    directions as the ensemble estimate uses (same estimator, so the two are comparable)."""
    out: dict[int, tuple[float, float | None]] = {}
    generator = torch.Generator(device=population.device).manual_seed(12345)
    samples = max(len(population.snapshot_steps) * population.replicas, spec.entropy.k + 2)
    for width, net in population.nets.items():
        piece = Slice(net, [0] * 4, width, 128, population.device)
        W = torch.randn(4, net.dim, generator=generator, device=population.device, dtype=population.dtype)
        loss, _, _ = population._full_pass(piece, W, population.train[width], False)
        directions = torch.randn(samples, net.dim, generator=generator, device=population.device, dtype=torch.float64).cpu().numpy()
        out[width] = (float(loss.mean()), direction_entropy(directions, k=spec.entropy.k, standardise=False))
    return out
