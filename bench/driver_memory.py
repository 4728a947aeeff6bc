"""Peak memory of the sweep driver at 500 and at 5,000 points: it should not grow with the grid.

Each sweep runs in its own Python process (the driver) on its own embedded Ray instance: tiny
isotropic points (d = 3, 4 replicas, 200 steps) in chunks of 10, so 50 and 500 Ray Tune trials.
The driver reports its own peak resident memory (`ru_maxrss`, Linux: KiB) and its resident memory
sampled every 0.5 s, so the report shows whether memory climbs as trials finish. Ray's own
processes (GCS, raylet, trial workers) are not part of the driver and are not counted. MLflow
logging is off, so only the sweep service is measured.

Usage: python bench/driver_memory.py [--points 500 5000] [--out bench/out/driver_memory.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, resource, sys, threading, time
import psutil
sys.path.insert(0, {repo!r})
from phases import run_sweep

samples = []
stop = threading.Event()
process = psutil.Process()

def sample():
    while not stop.is_set():
        samples.append((time.monotonic(), process.memory_info().rss))
        stop.wait(0.5)

spec = {{
    "name": "driver_memory", "kind": "isotropic", "steps": 200, "replicas": 4, "chunk_size": 10,
    "log": {{"points": 5, "linear": 0}}, "entropy": {{"snapshots": 2}},
    "grids": [{{"protocol": "elr", "axes": {{"lr": {{"log": [0.01, 0.1, {lrs}]}}, "wd": {{"log": [0.01, 1.0, 10]}}}}}}],
}}
thread = threading.Thread(target=sample, daemon=True)
started = time.monotonic()
thread.start()
result = run_sweep(spec, storage={storage!r}, track=False)
stop.set()
thread.join()
print(json.dumps({{
    "points": {points}, "trials": result.chunks_run, "failed": len(result.failed_chunks), "seconds": time.monotonic() - started,
    "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "rss_samples": [[round(t - started, 1), rss] for t, rss in samples],
}}))
"""


def run(points: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="phases-driver-bench-") as storage:
        code = DRIVER.format(repo=str(REPO), storage=storage, points=points, lrs=points // 10)
        finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    samples = report.pop("rss_samples")
    # RSS at each tenth of the run, to show the trend while trials finish.
    report["rss_by_tenth_mib"] = [round(samples[min(len(samples) - 1, len(samples) * k // 10)][1] / 2**20, 1) for k in range(1, 11)]
    print(f"{points} points ({report['trials']} trials, {report['seconds']:.0f} s): peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB; "
          f"RSS by tenth of the run {report['rss_by_tenth_mib']}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, nargs=2, default=[500, 5000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "driver_memory.json")
    args = parser.parse_args()
    small, large = (run(points) for points in args.points)
    ratio = large["peak_rss_bytes"] / small["peak_rss_bytes"]
    print(f"peak RSS ratio {args.points[1]} / {args.points[0]} points: {ratio:.2f} (target: at most 1.5)")
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version()}, "date": time.strftime("%Y-%m-%d"),
              "small": small, "large": large, "ratio": ratio}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
