"""The sample-quality diagram of a remask sweep: summaries for fits.json and figures.

A remask point fine-tunes a remasking head with AdamW at (lr, wd) and samples with G-Star at
temperature tau (the `noise` column), at each of several step counts. Nothing here is
thermodynamic. The summary averages over seeds, names the best setting and gives the marginal
means along each axis, so that a reader sees which axis matters.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

logger = logging.getLogger(__name__)

SETTING = ("lr", "wd", "noise")
MEANS = ("validity", "distinct_2", "reference_perplexity", "head_auroc", "head_f1", "forward_passes")


def seed_means(frame: pl.DataFrame, by: tuple[str, ...] = SETTING) -> pl.DataFrame:
    """Average the quality columns over seeds, per setting, with their standard deviations."""
    present = [name for name in MEANS if name in frame.columns]
    aggregations = [pl.len().alias("seeds")]
    for name in present:
        aggregations += [pl.col(name).mean().alias(name), pl.col(name).std().alias(f"{name}_std")]
    return frame.group_by(list(by)).agg(aggregations).sort(list(by))


def quality_summary(diagram: pl.DataFrame, samples: pl.DataFrame | None) -> dict[str, Any]:
    """Summarise a remask sweep for fits.json: the diagram's step count, the best setting by
    validity, marginal means over lr, wd and tau, and validity per tau and step count."""
    usable = diagram.filter(~pl.col("diverged").fill_null(False) & pl.col("validity").is_not_null())
    summary: dict[str, Any] = {"diagram_steps": _single(diagram, "sample_steps"), "usable_points": usable.height}
    if not usable.height:
        summary["skipped"] = "no point has sample metrics (every head diverged or no chunk finished)"
        return summary
    settings = seed_means(usable)
    best = settings.sort("validity", descending=True, nulls_last=True).row(0, named=True)
    summary["best"] = {key: value for key, value in best.items() if value is not None}
    auroc = usable["head_auroc"].drop_nulls()
    summary["head_auroc"] = {"mean": auroc.mean(), "min": auroc.min(), "max": auroc.max()} if len(auroc) else None
    for axis in SETTING:
        rows = usable.group_by(axis).agg(pl.col("validity").mean(), pl.col("distinct_2").mean(), pl.col("head_auroc").mean()).sort(axis)
        summary[f"by_{axis}"] = rows.to_dicts()
    if samples is not None and samples.height:
        usable_samples = samples.join(usable.select("point_id"), on="point_id", how="semi")
        rows = usable_samples.group_by(["noise", "sample_steps"]).agg(
            pl.col("validity").mean(), pl.col("distinct_2").mean(), pl.col("forward_passes").mean()
        ).sort(["noise", "sample_steps"])
        summary["by_noise_and_steps"] = rows.to_dicts()
    return summary


def write_quality_plots(diagram: pl.DataFrame, samples: pl.DataFrame | None, directory: str | Path) -> list[Path]:
    """Write the remask figures into `directory`; returns the written paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    usable = diagram.filter(~pl.col("diverged").fill_null(False) & pl.col("validity").is_not_null())
    if not usable.height:
        logger.warning("quality plots skipped: no point has sample metrics")
        return []
    written = [
        quality_heatmaps(usable, "validity", "validity (fraction parsed)", directory / "validity_lr_wd.png"),
        quality_heatmaps(usable, "head_auroc", "head AUROC", directory / "head_auroc_lr_wd.png"),
    ]
    if samples is not None and samples.height:
        written.append(quality_against_tau(usable, samples, directory / "quality_vs_tau.png"))
    return [path for path in written if path is not None]


def quality_heatmaps(usable: pl.DataFrame, column: str, label: str, path: Path) -> Path | None:
    """Plot `column` over lr x wd, averaged over seeds, in one panel per tau with the values written in."""
    taus = sorted(usable["noise"].unique().to_list())
    lrs = sorted(usable["lr"].unique().to_list())
    wds = sorted(usable["wd"].unique().to_list())
    means = seed_means(usable)
    low, high = means[column].min(), means[column].max()
    if low is None:
        return None
    if high - low < 1e-9:
        low, high = low - 0.01, high + 0.01  # a constant map still needs a colour range
    figure, axes = plt.subplots(1, len(taus), figsize=(3.2 * len(taus) + 1, 3.0), squeeze=False)
    for ax, tau in zip(axes[0], taus):
        grid = np.full((len(wds), len(lrs)), np.nan)
        for row in means.filter(pl.col("noise") == tau).iter_rows(named=True):
            if row[column] is not None:
                grid[wds.index(row["wd"]), lrs.index(row["lr"])] = row[column]
        image = ax.imshow(grid, origin="lower", aspect="auto", vmin=low, vmax=high, cmap="viridis")
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="white" if value < (low + high) / 2 else "black")
        ax.set_xticks(range(len(lrs)), [f"{v:.0e}" for v in lrs], rotation=45, fontsize=7)
        ax.set_yticks(range(len(wds)), [f"{v:g}" for v in wds], fontsize=7)
        ax.set_xlabel("head lr")
        ax.set_title(f"tau = {tau:g}", fontsize=9)
    axes[0][0].set_ylabel("weight decay")
    figure.colorbar(image, ax=axes[0].tolist(), label=label)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def quality_against_tau(usable: pl.DataFrame, samples: pl.DataFrame, path: Path) -> Path:
    """Plot validity and distinct-2 against tau at each step count, for the (lr, wd) with the best
    mean validity. Error bars are the standard deviation over seeds."""
    best = seed_means(usable, ("lr", "wd")).sort("validity", descending=True).row(0, named=True)
    chosen = usable.filter((pl.col("lr") == best["lr"]) & (pl.col("wd") == best["wd"])).select("point_id")
    rows = samples.join(chosen, on="point_id", how="semi")
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for steps in sorted(rows["sample_steps"].unique().to_list()):
        line = rows.filter(pl.col("sample_steps") == steps).group_by("noise").agg(
            pl.col("validity").mean(), pl.col("validity").std().alias("validity_std"),
            pl.col("distinct_2").mean(), pl.col("distinct_2").std().alias("distinct_2_std"),
        ).sort("noise")
        for ax, column in zip(axes, ("validity", "distinct_2")):
            ax.errorbar(line["noise"].to_numpy(), line[column].to_numpy(), yerr=line[f"{column}_std"].fill_null(0).to_numpy(),
                        marker="o", capsize=2, label=f"{steps} steps")
    for ax, label in zip(axes, ("validity", "distinct-2")):
        ax.set_xscale("log")
        ax.set_xlabel("G-Star temperature tau")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    figure.suptitle(f"head lr {best['lr']:.2g}, wd {best['wd']:g}", fontsize=9)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def _single(frame: pl.DataFrame, column: str) -> Any:
    values = frame[column].drop_nulls().unique().to_list()
    return values[0] if len(values) == 1 else None
