"""Benchmark of the analysis layer on a large synthetic trajectories table.

The same steps run twice, each in its own process so that peak memory is measured separately:
phases' vectorised polars implementation, and a straightforward pandas implementation that applies
the same per-point computations group by group. Steps: the log-time stationarity test (every
candidate window), stationary means over the detected window, the convergence trends over the
last eighth of the run, and regime labels. Reported: wall time of the steps (reading the file is
excluded), peak resident memory of each process, and the ratio.

The pandas implementation costs about 0.3 s per point here, so on the full table it would run for
hours. It therefore runs on the first `--pandas-points` points, with the whole table in memory so
that its peak memory is comparable, and its time is scaled linearly to all points. The scaling is
exact up to noise because the per-point work does not depend on the other points. The result
marks the scaled time.

Usage: python bench/analysis.py [--rows 10000000] [--out bench/out/analysis.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOGS_PER_POINT = 200


def generate(path: Path, rows: int) -> None:
    """Write a synthetic trajectories table: relaxing, converging and drifting runs in equal shares."""
    import polars as pl

    points = rows // LOGS_PER_POINT
    rng = np.random.default_rng(0)
    steps = np.unique(np.round(np.geomspace(1, 1e6, LOGS_PER_POINT * 2)).astype(np.int64))[:LOGS_PER_POINT]
    step = np.tile(steps, points)
    point = np.repeat(np.arange(points), steps.size)
    kind = point % 3
    tau = 10 ** rng.uniform(1, 4, points)[point]
    level = 10 ** rng.uniform(-2, 0, points)[point]
    relaxing = level * (1 + 3 * np.exp(-step / tau))
    converging = level * (1 + step / tau) ** -1.0
    drifting = level * (1 + 0.05 * np.log1p(step))
    loss = np.select([kind == 0, kind == 1], [relaxing, converging], drifting) * (1 + 0.01 * rng.standard_normal(step.size))
    frame = pl.DataFrame({
        "point_id": np.char.add("p", point.astype(str)),
        "step": step,
        "loss": loss,
        "radius_norm": 1 + 0.5 * np.exp(-step / tau) + 0.001 * rng.standard_normal(step.size),
        "grad_norm": np.sqrt(loss),
    })
    frame.write_parquet(path)


def run_polars(path: Path) -> float:
    import polars as pl

    from analysis.logs import summarise_logs
    from analysis.regimes import convergence_trends, label_regimes

    frame = pl.read_parquet(path).with_columns(
        kind=pl.lit("external"), protocol=pl.lit("lr"), lr=pl.lit(0.1), wd=pl.lit(0.01),
        noise=pl.lit(None, dtype=pl.Float64), radius=pl.lit(None, dtype=pl.Float64),
        batch_size=pl.lit(None, dtype=pl.Int64), seed=pl.lit(None, dtype=pl.Int64), dim=pl.lit(None, dtype=pl.Int64),
    )
    started = time.perf_counter()
    summaries = summarise_logs(frame)
    labelled = label_regimes(summaries, convergence_trends(frame))
    elapsed = time.perf_counter() - started
    print(json.dumps({"regimes": labelled["regime"].value_counts().sort("regime").rows()}), file=sys.stderr)
    return elapsed


def run_pandas(path: Path, points: int) -> tuple[float, float]:
    """Run the same steps with pandas groupby-apply and numpy per point, on the first `points` points.

    Returns (measured seconds, seconds scaled to every point of the table).
    """
    import pandas as pd
    from scipy import stats

    full = pd.read_parquet(path)
    chosen = full["point_id"].drop_duplicates().iloc[:points]
    frame = full[full["point_id"].isin(chosen)]
    scale = full["point_id"].nunique() / chosen.size
    started = time.perf_counter()

    def per_point(group: pd.DataFrame) -> pd.Series:
        group = group.sort_values("step")
        steps = group["step"].to_numpy()
        x = np.log(steps.astype(float))
        start_index = None
        for index in range(len(steps)):
            if steps[index] > steps[-1] / 2 or len(steps) - index < 8:
                break
            ok = True
            for column in ("loss", "radius_norm"):
                y = group[column].to_numpy()[index:]
                y = np.log(y) if np.all(y > 0) else y
                fit = stats.linregress(x[index:], y)
                change = abs(fit.slope) * (x[-1] - x[index])
                ok &= change < 0.02 or fit.pvalue > 0.01
            if ok:
                start_index = index
                break
        window_start = steps[start_index] if start_index is not None else steps[-1] // 2
        window = group[group["step"] >= window_start]
        tail = group[group["step"] >= steps[-1] / 8]
        loss_fit = stats.linregress(np.log(tail["step"]), np.log(tail["loss"]))
        grad_fit = stats.linregress(np.log(tail["step"]), np.log(tail["grad_norm"]))
        stationary = start_index is not None
        converging = loss_fit.slope < -0.05 and loss_fit.pvalue < 0.01 and grad_fit.slope < 0
        if converging and not stationary:
            regime = "converged"
        elif stationary:
            regime = "equilibrium"
        else:
            regime = "unknown"
        return pd.Series({"U": window["loss"].mean(), "r": window["radius_norm"].mean(), "regime": regime})

    result = frame.groupby("point_id").apply(per_point, include_groups=False)
    elapsed = time.perf_counter() - started
    print(json.dumps({"regimes": sorted(result["regime"].value_counts().items())}), file=sys.stderr)
    return elapsed, elapsed * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the synthetic table")
    parser.add_argument("--pandas-points", type=int, default=200, help="points the pandas baseline runs on before scaling")
    parser.add_argument("--run", choices=["polars", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "analysis.json", help="JSON results file")
    args = parser.parse_args()

    if args.run:
        if args.run == "polars":
            timing = {"seconds": run_polars(args.data)}
        else:
            measured, scaled = run_pandas(args.data, args.pandas_points)
            timing = {"seconds": scaled, "measured_seconds": measured, "measured_points": args.pandas_points, "scaled": True}
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({**timing, "peak_rss_mib": peak_mib}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "trajectories.parquet"
        generate(data, args.rows)
        results: dict[str, object] = {"rows": args.rows, "points": args.rows // LOGS_PER_POINT}
        for implementation in ("polars", "pandas"):
            completed = subprocess.run(
                [sys.executable, __file__, "--run", implementation, "--data", str(data), "--pandas-points", str(args.pandas_points)],
                capture_output=True, text=True, check=True,
            )
            results[implementation] = json.loads(completed.stdout.strip().splitlines()[-1])
            results[implementation]["regimes"] = json.loads(completed.stderr.strip().splitlines()[-1])["regimes"]
            scaled = " (scaled from the measured subset)" if results[implementation].get("scaled") else ""
            print(f"{implementation}: {results[implementation]['seconds']:.1f} s{scaled}, peak RSS {results[implementation]['peak_rss_mib']:.0f} MiB")
    results["speedup"] = results["pandas"]["seconds"] / results["polars"]["seconds"]
    print(f"speedup {results['speedup']:.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
