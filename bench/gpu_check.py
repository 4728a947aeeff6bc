"""Train a small population of the scale_invariant kind on CUDA and print its throughput.

The population is the same `NetworkPopulation` a sweep trial runs, on the device a trial given a
GPU gets ("cuda"); nothing here is GPU-specific. With `--device cpu` the script runs the same
steps on the CPU, for a comparison on the same machine or where no GPU is present.

Usage: python bench/gpu_check.py [--device cuda] [--model convnet] [--width 8] [--points 32] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phases.grid import chunk, expand  # noqa: E402
from phases.spec import load  # noqa: E402
from phases.trials.network import NetworkParams, NetworkPopulation, load_dataset  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--model", default="convnet", choices=["convnet", "resnet18", "mlp"])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--points", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device is visible to torch {torch.__version__}; run on a machine with a GPU, or pass --device cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    params = {"model": args.model, "width": args.width}
    spec = load({
        "name": "gpu-check", "kind": "scale_invariant", "steps": 10 * args.steps + 10, "replicas": 1, "chunk_size": args.points,
        "params": params, "log": {"points": 2, "linear": 0}, "entropy": {"snapshots": 3},
        "grids": [{"protocol": "elr", "axes": {"lr": {"log": [1e-3, 1e-2, args.points]}, "wd": [1e-3], "noise": [1.0],
                                                "batch_size": [args.batch]}}],
    })
    network = NetworkParams.model_validate(params)
    population = NetworkPopulation(chunk(expand(spec), args.points)[0], spec, network, load_dataset(network), device)
    population.advance(5)  # warm-up, including the first logging step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    population.advance(5 + args.steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    radius = [float(torch.linalg.vector_norm(W, dim=1).mean()) for W in population.W]
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model, "width": args.width, "points": args.points, "batch": args.batch, "slices": len(population.slices),
        "steps": args.steps, "seconds": elapsed, "points_steps_per_s": args.points * args.steps / elapsed,
        "finite": bool(all(torch.isfinite(W).all() for W in population.W)), "mean_radius": sum(radius) / len(radius),
    }
    if device.type == "cuda":
        report["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(json.dumps(report, indent=2))
    return 0 if report["finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
