"""Benchmarks of the isotropic kind, each a ratio of two measurements taken in the same run.

(a) Vectorised simulator against a plain NumPy loop over points and replicas: replica-steps/s.
(b) The simulator's state traffic as a fraction of memory bandwidth measured by copying a large
    array. State traffic counts one read and one write of w per replica-step (2 * d * 8 bytes).
    The kernel's temporaries are not counted, so this is a lower bound on the bytes it moves.
(c) A 200-point sweep run as two chunks against the same sweep run as 200 one-point trials, wall
    time through Ray Tune on one embedded Ray instance (its start-up is not counted in either).

Usage: python bench/isotropic.py [--quick] [--out bench/out/isotropic.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phases.grid import chunk, expand  # noqa: E402
from phases.spec import load  # noqa: E402
from phases.trials.isotropic import IsotropicParams, Landscape, Population  # noqa: E402


def loop_baseline(points: int, replicas: int, steps: int, dim: int = 3) -> float:
    """Replica-steps/s of the elr update written as a Python loop over points and replicas."""
    params = IsotropicParams(dim=dim)
    mu = Landscape.from_params(params).mu[:, 0, 0]
    rng = np.random.default_rng(0)
    lrs = np.geomspace(0.01, 0.1, points)
    w = np.tile(np.eye(dim)[0], (points, replicas, 1))
    started = time.perf_counter()
    for _ in range(steps):
        for p in range(points):
            lr, wd = lrs[p], 0.1
            for k in range(replicas):
                x = w[p, k]
                r = np.linalg.norm(x)
                u = x / r
                v = mu + rng.standard_normal(dim)
                v = v - np.dot(v, u) * u
                lr_t = lr * r * r
                w[p, k] = x * (1.0 - lr_t * wd) - (lr_t / r) * v
    return points * replicas * steps / (time.perf_counter() - started)


def vectorised(points: int, replicas: int, steps: int, dim: int = 3) -> float:
    """Replica-steps/s of the Population update for one chunk (window accumulation included)."""
    spec = load({
        "name": "bench", "kind": "isotropic", "steps": steps, "replicas": replicas, "chunk_size": points,
        "params": {"dim": dim}, "grids": [{"protocol": "elr", "axes": {"lr": {"log": [0.01, 0.1, points]}, "wd": [0.1]}}],
    })
    part = chunk(expand(spec), points)[0]
    population = Population(part, spec, IsotropicParams(dim=dim), seed=0)
    started = time.perf_counter()
    population.advance(steps)
    return points * replicas * steps / (time.perf_counter() - started)


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes/s of np.copyto on a large float64 array, counting read plus write."""
    source = np.ones(megabytes * 2**20 // 8)
    target = np.empty_like(source)
    np.copyto(target, source)
    best = min(_timed(lambda: np.copyto(target, source)) for _ in range(repeats))
    return 2 * source.nbytes / best


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def sweep_wall_time(chunk_size: int, points: int, steps: int, replicas: int, storage: Path) -> float:
    """Wall seconds of run_sweep (trials and driver work, no MLflow) for a grid of `points` elr points."""
    from phases.sweep import run_sweep

    spec = {
        "name": f"bench-chunk{chunk_size}", "kind": "isotropic", "steps": steps, "replicas": replicas,
        "chunk_size": chunk_size, "entropy": {"snapshots": 2},
        "grids": [{"protocol": "elr", "axes": {"lr": {"log": [0.02, 0.1, points // 10]}, "wd": {"log": [0.1, 1.0, 10]}}}],
    }
    started = time.perf_counter()
    run_sweep(spec, storage=storage, track=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke check of the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "isotropic.json", help="JSON results file")
    args = parser.parse_args()

    results: dict[str, object] = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}

    # (a) Same update, same d = 3; the loop's size is small because it is slow.
    loop_rate = loop_baseline(points=4, replicas=8, steps=50 if args.quick else 300)
    vector_rate = vectorised(points=81, replicas=256, steps=200 if args.quick else 2000)
    results["a_replica_steps_per_s"] = {"loop": loop_rate, "vectorised": vector_rate, "speedup": vector_rate / loop_rate}
    print(f"(a) loop {loop_rate:,.0f} replica-steps/s; vectorised {vector_rate:,.0f}; speedup {vector_rate / loop_rate:.0f}x")

    # (b) State traffic over copy bandwidth.
    bandwidth = copy_bandwidth(128 if args.quick else 512)
    state_bytes = vector_rate * 2 * 3 * 8
    results["b_bandwidth"] = {"copy_bytes_per_s": bandwidth, "state_bytes_per_s": state_bytes, "fraction": state_bytes / bandwidth}
    print(f"(b) copy bandwidth {bandwidth / 1e9:.1f} GB/s; state traffic {state_bytes / 1e9:.2f} GB/s = {state_bytes / bandwidth:.1%}")

    # (c) 200 points as 2 chunks of 100 against 200 one-point trials, one Ray instance for both.
    # Small points (4 replicas, 20,000 steps): the case where per-trial overhead matters. A warm-up
    # sweep first pays the one-time imports, so neither measured run is charged for them.
    from phases.runtime import start_ray, stop_ray

    start_ray(None)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            points = 40 if args.quick else 200
            steps = 2000 if args.quick else 20000
            sweep_wall_time(10, 10, steps=100, replicas=4, storage=Path(tmp) / "warmup")
            chunked = sweep_wall_time(points // 2, points, steps=steps, replicas=4, storage=Path(tmp))
            single = sweep_wall_time(1, points, steps=steps, replicas=4, storage=Path(tmp))
    finally:
        stop_ray()
    results["c_sweep_wall_s"] = {
        "points": points, "steps": steps, "replicas": 4, "chunked": chunked, "one_point_trials": single, "ratio": single / chunked,
    }
    print(f"(c) {points} points: 2 chunks {chunked:.1f} s; {points} one-point trials {single:.1f} s; ratio {single / chunked:.1f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")


if __name__ == "__main__":
    main()
