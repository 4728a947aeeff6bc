"""Figures of a phase diagram, written as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from analysis.eos import usable_points  # noqa: E402

HEATMAP_QUANTITIES = (("U", "U (loss)"), ("T", "T (loss units)"), ("S", "S (nats)"))


def write_plots(diagram: pl.DataFrame, directory: str | Path) -> list[Path]:
    """Write every figure the diagram supports into `directory`; returns the written paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for protocol in sorted(diagram["protocol"].unique().to_list()):
        path = heatmaps(diagram.filter(pl.col("protocol") == protocol), protocol, directory / f"heatmaps_{protocol}.png")
        if path:
            written.append(path)
    usable = usable_points(diagram)
    if usable.height:
        written.append(equation_of_state_collapse(usable, directory / "equation_of_state.png"))
        for protocol, x_axis, fixed in (("elr", "wd", "lr"), ("lr", "wd", "lr"), ("sphere", "radius", "lr")):
            rows = usable.filter(pl.col("protocol") == protocol)
            if rows.height:
                written.append(entropy_lines(rows, x_axis, fixed, directory / f"entropy_vs_{x_axis}_{protocol}.png"))
    return written


def heatmaps(rows: pl.DataFrame, protocol: str, path: Path) -> Path | None:
    """U, T and S over lr x wd (radius for sphere), averaged over other coordinates."""
    y_axis = "radius" if protocol == "sphere" else "wd"
    grid = rows.group_by(["lr", y_axis]).agg([pl.col(q).mean() for q, _ in HEATMAP_QUANTITIES] + [pl.col("regime").first()])
    xs = np.sort(grid["lr"].unique().to_numpy())
    ys = np.sort(grid[y_axis].unique().to_numpy())
    if xs.size < 2 or ys.size < 2:
        return None

    # Fixed margins: matplotlib's constrained layout costs about a second per figure.
    fig, axes = plt.subplots(1, len(HEATMAP_QUANTITIES), figsize=(5 * len(HEATMAP_QUANTITIES), 4))
    fig.subplots_adjust(left=0.06, right=0.97, bottom=0.13, top=0.9, wspace=0.35)
    for ax, (quantity, label) in zip(axes, HEATMAP_QUANTITIES):
        values = np.full((ys.size, xs.size), np.nan)
        for row in grid.iter_rows(named=True):
            if row[quantity] is not None:
                values[np.searchsorted(ys, row[y_axis]), np.searchsorted(xs, row["lr"])] = row[quantity]
        mesh = ax.pcolormesh(_edges(xs), _edges(ys), np.ma.masked_invalid(values), shading="flat")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("effective lr" if protocol != "lr" else "lr")
        ax.set_ylabel(y_axis)
        ax.set_title(f"{protocol}: {label}")
        fig.colorbar(mesh, ax=ax)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def equation_of_state_collapse(usable: pl.DataFrame, path: Path) -> Path:
    """p r^2 against (d - 1) T for every usable point; the equation of state is the diagonal."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    fig.subplots_adjust(left=0.15, right=0.96, bottom=0.11, top=0.93)
    for protocol in sorted(usable["protocol"].unique().to_list()):
        rows = usable.filter(pl.col("protocol") == protocol)
        x = (rows["dim"] - 1).to_numpy() * rows["T"].to_numpy()
        y = rows["p"].to_numpy() * rows["r2"].to_numpy()
        ax.scatter(x, y, s=12, label=protocol, alpha=0.8)
    x_all = ((usable["dim"] - 1) * usable["T"]).to_numpy()
    line = np.geomspace(x_all.min(), x_all.max(), 10)
    ax.plot(line, line, "k--", lw=1, label="p r² = (d − 1) T")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("(d − 1) T")
    ax.set_ylabel("p r²")
    ax.set_title("Equation of state")
    ax.legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def entropy_lines(rows: pl.DataFrame, x_axis: str, fixed: str, path: Path) -> Path:
    """S against log x, one line per value of the fixed axis."""
    protocol = rows["protocol"][0]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.92)
    for value in np.sort(rows[fixed].unique().to_numpy()):
        line = rows.filter(pl.col(fixed) == value).group_by(x_axis).agg(pl.col("S").mean()).sort(x_axis)
        ax.plot(line[x_axis].to_numpy(), line["S"].to_numpy(), "o-", ms=3, label=f"{fixed} = {value:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel(x_axis)
    ax.set_ylabel("S (nats)")
    ax.set_title(f"{protocol}: entropy against {x_axis}")
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges for log-spaced centres (geometric midpoints, extended at both ends)."""
    logs = np.log(centres)
    middle = (logs[1:] + logs[:-1]) / 2
    first = logs[0] - (middle[0] - logs[0])
    last = logs[-1] + (logs[-1] - middle[-1])
    return np.exp(np.concatenate([[first], middle, [last]]))
