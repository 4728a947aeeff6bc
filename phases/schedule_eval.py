"""Evaluate a recommended learning-rate schedule against the usual baselines at the same budget.

Every method trains the diagram's model on the diagram's data (its spec's `params`), by plain SGD
with coupled weight decay at the diagram slice's batch size, width and injected noise, for the
same number of steps, once per seed. All methods and seeds train together as one population
(`phases.nets.population`), each member with its own schedule and random stream. Seed s draws the
same minibatches and initial weights (`init_seed + s`) for every method, so that methods are
compared on equal draws.

Methods:

- `recommended`: the recommendation's stages (`analysis.recommend`).
- `constant`: the best grid point (highest window-mean test accuracy of the slice, else lowest U)
  at its lr and weight decay throughout.
- `cosine`: cosine decay from the best grid point's lr to 0.
- `step`: the best grid point's lr, times 0.1 at 50% and again at 75% of the budget.
- `range_test_cosine`: an LR range test, then cosine decay. In the range test the lr rises
  exponentially from 1e-4 to 10 over `range_steps` steps from the initial weights, and the loss is
  smoothed by a bias-corrected exponential moving average (beta 0.98). The usual rule picks a tenth
  of the lr at the smallest smoothed loss. Training then restarts from the initial weights with
  cosine decay from the pick for the rest of the budget, so the range test's steps count against it.

A member whose norm leaves [1/max_radius, max_radius] or turns non-finite stops at its last finite
weights and is reported as diverged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import polars as pl
import torch

from analysis.recommend import Recommendation
from phases.nets.population import PopulationNet, architecture_of
from phases.nets.training import protocol_update, tangent_noise
from phases.trials.network import NetworkParams, build_network, load_dataset

METHODS = ("recommended", "constant", "cosine", "step", "range_test_cosine")
RANGE_LOW, RANGE_HIGH, RANGE_BETA = 1e-4, 10.0, 0.98


@dataclass(frozen=True)
class Method:
    """One schedule: lr and weight decay as functions of the step."""

    name: str
    description: str
    lr: Callable[[int], float]
    wd: Callable[[int], float]


@dataclass(frozen=True)
class Setting:
    """Training setting shared by every member: model and data parameters, width, batch size, injected noise."""

    params: NetworkParams
    width: int
    batch_size: int
    noise: float


def setting_from(spec: dict[str, Any], recommendation: Recommendation) -> Setting:
    """Build the training setting of a diagram's spec at the recommendation's slice."""
    if spec.get("kind") != "scale_invariant":
        raise ValueError(
            f"evaluate-schedule trains the diagram's network, so it needs a scale_invariant sweep; this diagram's kind is {spec.get('kind')!r}. "
            "Run it on a network sweep such as `phases sweep search_spaces/recommend_digits.yaml`"
        )
    params = NetworkParams.model_validate(spec.get("params") or {})
    selection = recommendation.selection
    width = int(selection.get("width") or params.width)
    batch = int(selection.get("batch_size") or 128)
    return Setting(params, width, batch, float(selection.get("noise") or 0.0))


def best_grid_point(diagram: pl.DataFrame, selection: dict[str, Any]) -> dict[str, Any]:
    """Return the slice's point (any weight decay) with the best window-mean test accuracy, else the
    lowest U. Non-finite and diverged points are left out, and ties go to the smaller lr, then wd."""
    rows = diagram.filter(pl.col("protocol") == "lr")
    for axis in ("noise", "batch_size", "width"):
        if axis in selection and axis in rows.columns:
            rows = rows.filter(pl.col(axis) == selection[axis])
    if "diverged" in rows.columns:
        rows = rows.filter(~pl.col("diverged").fill_null(False))
    has_test = "test_acc" in rows.columns and rows["test_acc"].drop_nulls().len() > 0
    metric = "test_acc" if has_test else "U"
    rows = rows.filter(pl.col(metric).is_finite()).group_by("lr", "wd").agg(pl.col(metric).mean())
    if rows.is_empty():
        raise ValueError("the diagram's slice has no finite point to take the baseline learning rate from")
    return rows.sort([pl.col(metric), pl.col("lr"), pl.col("wd")], descending=[has_test, False, False]).row(0, named=True) | {"metric": metric}


def cosine(lr0: float, length: int) -> Callable[[int], float]:
    """Return the cosine decay from lr0 to 0 over `length` steps, and 0 after them."""

    def lr(step: int) -> float:
        if step >= length:
            return 0.0
        return lr0 * 0.5 * (1.0 + math.cos(math.pi * step / length))

    return lr


def step_decay(lr0: float, steps: int) -> Callable[[int], float]:
    """Return lr0, times 0.1 from half the budget on and times 0.01 from three quarters on."""

    def lr(step: int) -> float:
        if step < steps // 2:
            return lr0
        if step < (3 * steps) // 4:
            return 0.1 * lr0
        return 0.01 * lr0

    return lr


def build_methods(recommendation: Recommendation, best: dict[str, Any], steps: int, range_lrs: list[float], range_steps: int) -> list[list[Method]]:
    """Per seed, the five methods (the range test's pick differs by seed)."""
    lr0, wd0 = float(best["lr"]), float(best["wd"])

    def stage_lr(step: int) -> float:
        return recommendation.stage_at(step).lr

    def stage_wd(step: int) -> float:
        return recommendation.stage_at(step).wd

    picks = f"lr {min(range_lrs):.3g}" if len(set(range_lrs)) == 1 else f"lr {min(range_lrs):.3g} to {max(range_lrs):.3g} by seed"
    first = recommendation.stages[0]
    per_seed = []
    for picked in range_lrs:
        per_seed.append([
            Method("recommended", f"{len(recommendation.stages)} stage(s) from lr {first.lr:.3g}, wd {first.wd:g}", stage_lr, stage_wd),
            Method("constant", f"lr {lr0:.3g}, wd {wd0:g} (best grid point)", lambda s: lr0, lambda s: wd0),
            Method("cosine", f"cosine from lr {lr0:.3g}, wd {wd0:g}", cosine(lr0, steps), lambda s: wd0),
            Method("step", f"lr {lr0:.3g}, x0.1 at 50% and 75%, wd {wd0:g}",
                   step_decay(lr0, steps), lambda s: wd0),
            Method("range_test_cosine", f"range test ({range_steps} steps) picks {picks}, then cosine, wd {wd0:g}",
                   cosine(picked, steps - range_steps), lambda s: wd0),
        ])
    return per_seed


class Trainer:
    """A population of members, each with its own initial weights, random stream and schedule."""

    def __init__(self, setting: Setting, seeds: list[int], device: torch.device):
        params = setting.params
        self.setting, self.device = setting, device
        self.data = load_dataset(params)
        self.initial: list[torch.Tensor] = []
        model = None
        for seed in seeds:
            model = build_network(params.model_copy(update={"init_seed": params.init_seed + seed}), setting.width, self.data.input_shape, self.data.classes)
            start = torch.nn.utils.parameters_to_vector(model.si_parameters()).detach().to(device, params.torch_dtype)
            self.initial.append(start / torch.linalg.vector_norm(start) * params.radius0)
        self.net = PopulationNet(architecture_of(model, params.layout), device, params.torch_dtype)
        self.x_train, self.y_train = self.net.prepare_inputs(self.data.x_train), self.data.y_train.to(device)
        self.x_test, self.y_test = self.net.prepare_inputs(self.data.x_test), self.data.y_test.to(device)

    def run(self, members: list[tuple[int, Method]], steps: int, progress: Callable[[str], None] | None = None,
            record_loss: bool = False) -> dict[str, np.ndarray]:
        """Train members (seed index, method) for `steps` steps; return final metrics per member and,
        with `record_loss`, every step's minibatch loss (members, steps)."""
        params, setting = self.setting.params, self.setting
        W = torch.stack([self.initial[seed] for seed, _ in members])
        generators = [torch.Generator(device=self.device).manual_seed(1_000_003 * (seed + 1)) for seed, _ in members]
        alive = torch.ones(len(members), dtype=torch.bool, device=self.device)
        losses = np.full((len(members), steps), np.nan) if record_loss else None
        sigma = torch.full((len(members), 1), setting.noise, dtype=torch.float64, device=self.device)
        report_every = max(1, steps // 10)
        started = time.perf_counter()
        for step in range(steps):
            index = torch.stack([torch.randint(len(self.y_train), (setting.batch_size,), generator=g, device=self.device) for g in generators])
            loss, gradient = self.net.loss_and_gradient(W, self.net.gather(self.x_train, index), self.y_train[index])
            if losses is not None:
                losses[:, step] = loss.detach().double().cpu().numpy()
            W64, g = W.to(torch.float64), gradient.to(torch.float64)
            if setting.noise > 0:
                xi = torch.stack([torch.randn(W.shape[1], generator=gen, device=self.device, dtype=torch.float64) for gen in generators])
                g = g + tangent_noise(W64, xi, sigma)
            lr = torch.tensor([[method.lr(step)] for _, method in members], dtype=torch.float64, device=self.device)
            wd = torch.tensor([[method.wd(step)] for _, method in members], dtype=torch.float64, device=self.device)
            moved, _, _ = protocol_update(W64, g, "lr", lr, wd, 1.0)
            norm = torch.linalg.vector_norm(moved, dim=1)
            alive &= torch.isfinite(norm) & (norm < params.max_radius) & (norm > 1.0 / params.max_radius)
            W = torch.where(alive[:, None], moved.to(W.dtype), W)
            if progress is not None and (step + 1) % report_every == 0:
                progress(f"step {step + 1}/{steps} ({time.perf_counter() - started:.0f} s)")
        train_loss, train_acc = self._evaluate(W, self.x_train, self.y_train)
        test_loss, test_acc = self._evaluate(W, self.x_test, self.y_test)
        out = {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss, "test_acc": test_acc, "diverged": (~alive).cpu().numpy()}
        if losses is not None:
            out["losses"] = losses
        return out

    def _evaluate(self, W: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        total, batch = len(y), self.setting.params.eval_batch
        loss = torch.zeros(W.shape[0], dtype=torch.float64)
        correct = torch.zeros(W.shape[0], dtype=torch.float64)
        for start in range(0, total, batch):
            index = torch.arange(start, min(total, start + batch), device=W.device).expand(W.shape[0], -1)
            s, c = self.net.evaluate(W, self.net.gather(x, index), y[index])
            loss += s.double().cpu()
            correct += c.double().cpu()
        return (loss / total).numpy(), (correct / total).numpy()


def range_test_pick(losses: np.ndarray, lrs: np.ndarray) -> float:
    """Pick a tenth of the lr at the smallest bias-corrected moving average of the loss (the usual rule)."""
    smoothed = np.empty_like(losses)
    average = 0.0
    for k, value in enumerate(losses):
        average = RANGE_BETA * average + (1 - RANGE_BETA) * (value if np.isfinite(value) else 1e30)
        smoothed[k] = average / (1 - RANGE_BETA ** (k + 1))
    return float(lrs[int(np.argmin(smoothed))] / 10.0)


def evaluate_schedule(
    recommendation: Recommendation, diagram: pl.DataFrame, spec: dict[str, Any], *, steps: int, seeds: int = 3,
    range_steps: int | None = None, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train every method with `seeds` seeds for `steps` steps; return the table and per-seed values."""
    if steps < 2 or seeds < 1:
        raise ValueError(f"steps must be >= 2 and seeds >= 1, got {steps} and {seeds}")
    if recommendation.steps != steps:
        raise ValueError(f"the recommendation is for {recommendation.steps} steps, not {steps}; recommend again with --steps {steps}")
    range_steps = range_steps or max(100, steps // 20)
    if range_steps >= steps:
        raise ValueError(f"the LR range test needs {range_steps} of the {steps} steps; give a larger --steps")
    setting = setting_from(spec, recommendation)
    best = best_grid_point(diagram, recommendation.selection)
    trainer = Trainer(setting, list(range(seeds)), torch.device("cpu"))
    say = progress or (lambda message: None)

    lrs = RANGE_LOW * (RANGE_HIGH / RANGE_LOW) ** (np.arange(range_steps) / (range_steps - 1))
    sweep = Method("range_test", "", lambda s: float(lrs[min(s, range_steps - 1)]), lambda s: float(best["wd"]))
    say(f"LR range test: {seeds} seed(s), {range_steps} steps, lr {RANGE_LOW:g} to {RANGE_HIGH:g}")
    ranged = trainer.run([(seed, sweep) for seed in range(seeds)], range_steps, record_loss=True)
    picks = [range_test_pick(ranged["losses"][seed], lrs) for seed in range(seeds)]

    per_seed = build_methods(recommendation, best, steps, picks, range_steps)
    members = [(seed, method) for seed in range(seeds) for method in per_seed[seed]]
    say(f"training {len(members)} members ({len(METHODS)} methods x {seeds} seeds) for {steps} steps")
    result = trainer.run(members, steps, progress=say)

    rows = []
    for name in METHODS:
        picked = [k for k, (_, method) in enumerate(members) if method.name == name]
        values = {key: result[key][picked] for key in ("test_acc", "train_loss", "test_loss", "train_acc")}
        rows.append({
            "method": name,
            "description": members[picked[0]][1].description,
            **{f"{key}_mean": float(np.mean(v)) for key, v in values.items()},
            **{f"{key}_std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for key, v in values.items()},
            "diverged": int(result["diverged"][picked].sum()),
            "per_seed": {key: [float(x) for x in v] for key, v in values.items()},
        })
    return {
        "steps": steps, "seeds": seeds, "range_steps": range_steps, "range_test_picks": picks,
        "best_grid_point": {"lr": float(best["lr"]), "wd": float(best["wd"]), "by": best["metric"]},
        "setting": {"model": setting.params.model, "dataset": setting.params.dataset, "width": setting.width,
                    "batch_size": setting.batch_size, "noise": setting.noise},
        "methods": rows,
        "recommendation": recommendation.to_dict(),
    }


def markdown_table(evaluation: dict[str, Any]) -> str:
    """Format the evaluation as a Markdown table: mean ± standard deviation over seeds."""
    setting = evaluation["setting"]
    lines = [
        f"{setting['model']} width {setting['width']} on {setting['dataset']}, batch {setting['batch_size']}, noise {setting['noise']:g}: "
        f"{evaluation['steps']} steps, {evaluation['seeds']} seeds (mean ± std)",
        "",
        "| method | schedule | final test accuracy | final train loss | diverged |",
        "|---|---|---|---|---|",
    ]
    for row in evaluation["methods"]:
        lines.append(
            f"| {row['method']} | {row['description']} | {row['test_acc_mean']:.4f} ± {row['test_acc_std']:.4f} | "
            f"{row['train_loss_mean']:.4f} ± {row['train_loss_std']:.4f} | {row['diverged']} |"
        )
    return "\n".join(lines) + "\n"
