"""Population training of the scale_invariant kind against training the same points one by one.

(a) Small MLP on digits, 32 points: points x steps per second of one 32-member population
    (`NetworkPopulation.advance`, plain SGD with weight decay), eager and with `compile: true`,
    against the same 32 points trained one after another in this process, each as an nn.Module
    with torch.optim.SGD.
(b) The digits ConvNet at the demo's width, the same comparison, for each population layout.
(c) Both as achieved FLOP/s (FLOPs of one step counted by torch's FlopCounterMode) over this
    machine's float32 matrix-multiply rate (2048 x 2048, measured in the same run, same threads).
(d) The cost share of each measurement over a run of the network demo at its default periods.
    Training steps, the full-batch train pass with gradient, the test pass, the noise trace, the
    snapshots and the final entropy estimate are each timed on the demo's first chunk and
    multiplied by their count in a run.

Usage: python bench/population.py [--quick] [--threads 1] [--out bench/out/population.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.entropy import direction_entropy  # noqa: E402
from phases.grid import chunk, expand  # noqa: E402
from phases.spec import load  # noqa: E402
from phases.trials.isotropic import log_schedule  # noqa: E402
from phases.trials.network import NetworkParams, NetworkPopulation, build_network, load_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
POINTS = 32
BATCH = 128


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """float32 FLOP/s of a size x size matrix product (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def _spec(params: dict, steps: int = 1_000_000) -> object:
    return load({
        "name": "bench", "kind": "scale_invariant", "steps": steps, "replicas": 1, "chunk_size": POINTS,
        "params": params, "log": {"points": 2, "linear": 0}, "entropy": {"snapshots": 3},
        "grids": [{"protocol": "lr", "axes": {"lr": {"log": [0.01, 0.1, POINTS]}, "wd": [1e-3]}}],
    })


def population_rate(params: dict, steps: int) -> float:
    """Points x steps per second of one 32-member population, no measurements in the timed steps."""
    spec = _spec(params)
    network = NetworkParams.model_validate(params)
    population = NetworkPopulation(chunk(expand(spec), POINTS)[0], spec, network, load_dataset(network), torch.device("cpu"))
    population.advance(3)  # warm-up; the first logging step (step 1) is inside it
    started = time.perf_counter()
    population.advance(3 + steps)
    return POINTS * steps / (time.perf_counter() - started)


def sequential_rate(params: dict, steps: int) -> float:
    """Points x steps per second of the same points trained one after another, nn.Module + SGD."""
    network = NetworkParams.model_validate(params)
    data = load_dataset(network)
    lrs = np.geomspace(0.01, 0.1, POINTS)
    generator = torch.Generator().manual_seed(0)
    elapsed = 0.0
    for lr in lrs:
        model = build_network(network, network.width, data.input_shape, data.classes)
        optimizer = torch.optim.SGD(model.si_parameters(), lr=float(lr), weight_decay=1e-3)
        for step in range(steps + 1):
            if step == 1:
                started = time.perf_counter()  # the first step of each point is a warm-up
            index = torch.randint(len(data.y_train), (BATCH,), generator=generator)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x_train[index]), data.y_train[index]).backward()
            optimizer.step()
        elapsed += time.perf_counter() - started
    return POINTS * steps / elapsed


def step_flops(params: dict) -> float:
    """FLOPs of one training step of one model (forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    network = NetworkParams.model_validate(params)
    data = load_dataset(network)
    model = build_network(network, network.width, data.input_shape, data.classes)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(data.x_train[:BATCH]), data.y_train[:BATCH]).backward()
    return float(counter.get_total_flops())


def compare(label: str, params: dict, population_steps: int, sequential_steps: int, peak: float, rounds: int, compiled: bool = False) -> dict:
    """Measure both rates in alternating rounds and keep each one's best, so that a slow spell of
    a shared machine does not land on one side only. With `compiled`, also the population with
    `compile: true` (its compilation is part of the untimed warm-up)."""
    flops = step_flops(params)
    together = alone = together_compiled = 0.0
    for _ in range(rounds):
        together = max(together, population_rate(params, population_steps))
        if compiled:
            together_compiled = max(together_compiled, population_rate({**params, "compile": True}, population_steps))
        alone = max(alone, sequential_rate(params, sequential_steps))
    row = {
        "case": label, "params": params, "points": POINTS, "batch": BATCH, "rounds": rounds, "flops_per_step": flops,
        "population_points_steps_per_s": together, "sequential_points_steps_per_s": alone, "ratio": together / alone,
        "population_flops_fraction_of_matmul": together * flops / peak, "sequential_flops_fraction_of_matmul": alone * flops / peak,
    }
    print(f"{label}: population {together:.1f}, one by one {alone:.1f} points x steps/s -> {together / alone:.1f}x; "
          f"{100 * row['population_flops_fraction_of_matmul']:.1f}% vs {100 * row['sequential_flops_fraction_of_matmul']:.1f}% of the matmul rate",
          flush=True)
    if compiled:
        row.update(compiled_points_steps_per_s=together_compiled, compiled_ratio=together_compiled / alone,
                   compiled_flops_fraction_of_matmul=together_compiled * flops / peak)
        print(f"{label}, compile: true: population {together_compiled:.1f} points x steps/s -> {together_compiled / alone:.1f}x; "
              f"{100 * row['compiled_flops_fraction_of_matmul']:.1f}% of the matmul rate", flush=True)
    return row


def measurement_shares(quick: bool) -> dict:
    """Cost share of each measurement over a run of the demo's first chunk at its periods."""
    spec = load(REPO / "search_spaces" / "convnet_digits.yaml")
    params = NetworkParams.model_validate(spec.params)
    part = chunk(expand(spec), spec.chunk_size)[0]
    population = NetworkPopulation(part, spec, params, load_dataset(params), torch.device("cpu"))
    piece, W = population.slices[0], population.W[0]
    width = population.member_width[piece.rows[0]]

    def timed(action, repeats: int) -> float:
        action()
        started = time.perf_counter()
        for _ in range(repeats):
            action()
        return (time.perf_counter() - started) / repeats

    repeats = 2 if quick else 5
    step = timed(lambda: population._step_slice(piece, population.W[0], True, 0, False), 5 * repeats)
    train = timed(lambda: population._full_pass(piece, W, population.train[width], True), repeats)
    test = timed(lambda: population._full_pass(piece, W, population.test[width], False), repeats)
    gradient = population._full_pass(piece, W, population.train[width], True)[2]
    noise = timed(lambda: population._noise_trace(piece, W, gradient), 1 if quick else 2)
    snapshot = timed(lambda: (W / torch.linalg.vector_norm(W, dim=1, keepdim=True)).float(), 20)
    samples = np.random.default_rng(0).standard_normal((len(population.snapshot_steps), W.shape[1]))
    entropy = timed(lambda: direction_entropy(samples, k=1, standardise=False), 1) * len(part.points)

    logs = len(log_schedule(spec.steps, spec.log.points, spec.log.linear))
    noise_logs = len(range(0, logs, params.noise_every))
    test_logs = len(range(0, logs, params.test_every))
    costs = {
        "training steps": step * spec.steps,
        "full-batch train loss, accuracy and gradient": train * logs,
        "test loss and accuracy": test * test_logs,
        f"noise trace ({params.noise_batches} minibatch gradients)": noise * noise_logs,
        "weight snapshots": snapshot * len(population.snapshot_steps),
        "entropy estimate (end of run)": entropy,
    }
    total = sum(costs.values())
    shares = {name: cost / total for name, cost in costs.items()}
    print(f"measurement shares over a demo chunk of {len(part.points)} points, {spec.steps} steps, {logs} logging steps:")
    for name, share in shares.items():
        print(f"  {name}: {100 * share:.1f}% ({costs[name]:.1f} s)")
    return {"chunk_points": len(part.points), "steps": spec.steps, "logging_steps": logs, "seconds": costs, "shares": shares}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps; for a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every measurement (a trial with cpu: 1 uses 1)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "population.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak = matmul_rate(repeats=10)
    print(f"float32 2048 x 2048 matmul: {peak / 1e9:.1f} GFLOP/s with {args.threads} thread(s)", flush=True)
    demo = load(REPO / "search_spaces" / "convnet_digits.yaml").params
    scale = 0.2 if args.quick else 1.0
    rounds = 1 if args.quick else 3
    cases = [
        compare("small MLP (64-16-16-10), digits", {"model": "mlp", "width": 16}, int(400 * scale), int(100 * scale), peak, rounds, compiled=True),
        compare(f"ConvNet width {demo['width']}, digits, grouped layout", {"model": "convnet", "width": demo["width"], "layout": "grouped"},
                int(40 * scale), int(20 * scale), peak, rounds),
        compare(f"ConvNet width {demo['width']}, digits, bmm layout", {"model": "convnet", "width": demo["width"], "layout": "bmm"},
                int(40 * scale), int(20 * scale), peak, rounds),
    ]
    shares = measurement_shares(args.quick)
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads},
        "date": time.strftime("%Y-%m-%d"), "matmul_flops": peak, "cases": cases, "measurement_shares": shares,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
