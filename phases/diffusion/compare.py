"""Compare samplers at several step counts: quality, diversity and network passes over seeds.

For every (sampler, steps) pair, each seed draws `count` samples. The metrics of
`phases.diffusion.metrics` are computed per seed and reported as mean and standard deviation over
the seeds, next to the denoiser and head passes per sample. Seeds are shared across samplers.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from phases.diffusion.metrics import sample_metrics
from phases.diffusion.samplers import SamplerSettings, sample

METRICS = ("validity", "reference_perplexity", "distinct_1", "distinct_2", "distinct_3", "unigram_entropy")


def compare_samplers(
    model, settings: list[SamplerSettings], *, seeds: int, count: int, reference=None, head=None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Sample with every setting and return one row per setting: mean and std over seeds of every
    metric, and the passes per sample."""
    if seeds < 1 or count < 1:
        raise ValueError(f"seeds and count must be >= 1, got {seeds} and {count}")
    rows = []
    for setting in settings:
        per_seed: dict[str, list[float]] = {name: [] for name in METRICS}
        started = time.perf_counter()
        passes = None
        for seed in range(seeds):
            result = sample(model, setting, count, model.config.length, head=head, generator=torch.Generator().manual_seed(seed))
            metrics = sample_metrics(result.tokens, reference, model.config.corpus)
            for name in METRICS:
                if metrics[name] is not None:
                    per_seed[name].append(float(metrics[name]))
            passes = (result.denoiser_passes, result.head_passes)
        row: dict[str, Any] = {"sampler": setting.sampler, "steps": setting.steps, "settings": setting.__dict__.copy(),
                               "seeds": seeds, "count": count, "denoiser_passes": passes[0], "head_passes": passes[1],
                               "forward_passes": passes[0] + passes[1], "seconds": time.perf_counter() - started}
        for name, values in per_seed.items():
            row[f"{name}_mean"] = float(np.mean(values)) if values else None
            row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
            row[f"{name}_per_seed"] = values
        rows.append(row)
        if progress is not None:
            progress(f"{setting.sampler} at {setting.steps} steps: validity {row['validity_mean']}, "
                     f"{row['forward_passes']} passes per sample ({row['seconds']:.0f} s)")
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Format the comparison as a Markdown table (mean ± std over seeds)."""

    def cell(row: dict[str, Any], name: str, digits: int = 3) -> str:
        mean, std = row[f"{name}_mean"], row[f"{name}_std"]
        if mean is None:
            return "-"
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    lines = [
        "| sampler | steps | passes per sample | validity | reference perplexity | distinct-2 | distinct-3 | unigram entropy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['forward_passes']} | {cell(row, 'validity')} | "
            f"{cell(row, 'reference_perplexity', 2)} | {cell(row, 'distinct_2')} | {cell(row, 'distinct_3')} | {cell(row, 'unigram_entropy', 2)} |"
        )
    return "\n".join(lines) + "\n"
