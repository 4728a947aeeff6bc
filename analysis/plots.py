"""Figures of a phase diagram, written as PNG files (matplotlib, Agg backend)."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from analysis.eos import usable_points  # noqa: E402

logger = logging.getLogger(__name__)

HEATMAP_QUANTITIES = (("U", "U (loss)"), ("T", "T (loss units)"), ("S", "S (nats)"))


REGIME_COLOURS = {"converged": "#1b9e77", "equilibrium": "#7570b3", "divergent": "#d95f02", "unknown": "#bbbbbb"}


def write_plots(diagram: pl.DataFrame, directory: str | Path, fits: dict | None = None) -> list[Path]:
    """Write every figure the diagram supports into `directory`; returns the written paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for figure in _figures(diagram, directory, fits):
        try:
            path = figure()
        except (ValueError, RuntimeError, KeyError) as error:  # a figure the data cannot support is skipped
            logger.warning("plot skipped: %s", error)
            continue
        if path:
            written.append(path)
    return written


def _figures(diagram: pl.DataFrame, directory: Path, fits: dict | None):
    """Yield one callable per figure; each returns the written path (or None when not applicable)."""
    boundaries = (fits or {}).get("boundaries", [])
    for protocol in sorted(diagram["protocol"].unique().to_list()):
        rows = diagram.filter(pl.col("protocol") == protocol)
        mine = [b for b in boundaries if b.get("protocol") == protocol]
        yield lambda rows=rows, protocol=protocol, mine=mine: regime_map(rows, protocol, directory / f"regimes_{protocol}.png", mine)
    for index, entry in enumerate((fits or {}).get("temperature", [])):
        if "points" in entry:
            yield lambda entry=entry, index=index: temperature_panels(diagram, entry, directory / f"temperature_{index}.png")
    for protocol in sorted(diagram["protocol"].unique().to_list()):
        rows = diagram.filter(pl.col("protocol") == protocol)
        yield lambda rows=rows, protocol=protocol: heatmaps(rows, protocol, directory / f"heatmaps_{protocol}.png")
    # Log-log figures need positive T and p r^2; a converged point at zero noise has T = 0.
    usable = usable_points(diagram).filter((pl.col("T") > 0) & (pl.col("p") * pl.col("r2") > 0))
    if usable.height:
        yield lambda: equation_of_state_collapse(usable, directory / "equation_of_state.png")
        for protocol, x_axis, fixed in (("elr", "wd", "lr"), ("lr", "wd", "lr"), ("sphere", "radius", "lr")):
            rows = usable.filter((pl.col("protocol") == protocol) & (pl.col(x_axis) > 0))
            if rows.height:
                yield lambda rows=rows, x_axis=x_axis, fixed=fixed, protocol=protocol: entropy_lines(
                    rows, x_axis, fixed, directory / f"entropy_vs_{x_axis}_{protocol}.png"
                )


def heatmaps(rows: pl.DataFrame, protocol: str, path: Path) -> Path | None:
    """U, T and S over lr x wd (radius for sphere), averaged over other coordinates."""
    y_axis = "radius" if protocol == "sphere" else "wd"
    grid = rows.group_by(["lr", y_axis]).agg([pl.col(q).mean() for q, _ in HEATMAP_QUANTITIES] + [pl.col("regime").first()])
    xs = np.sort(grid["lr"].unique().drop_nulls().to_numpy())
    ys = np.sort(grid[y_axis].unique().drop_nulls().to_numpy())
    if xs.size < 2 or ys.size < 2 or np.any(xs <= 0) or np.any(ys <= 0):
        return None  # log-scaled cells need two or more positive values on each axis

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


def regime_map(rows: pl.DataFrame, protocol: str, path: Path, boundaries: list[dict] | None = None) -> Path:
    """Regime of every point over lr x wd (radius for sphere), one panel per noise value, with each
    boundary between regimes drawn as a vertical bar at its estimated learning rate."""
    y_axis = "radius" if protocol == "sphere" else "wd"
    noises = sorted(rows["noise"].unique().to_list(), key=lambda v: (v is None, v))
    fig, axes = plt.subplots(1, len(noises), figsize=(5 * len(noises), 4), squeeze=False)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.88, wspace=0.3)
    for ax, noise in zip(axes[0], noises):
        panel = rows.filter(pl.col("noise") == noise) if noise is not None else rows.filter(pl.col("noise").is_null())
        y_values = panel[y_axis].fill_null(1.0).to_numpy()
        for regime, colour in REGIME_COLOURS.items():
            chosen = panel["regime"].to_numpy() == regime
            if chosen.any():
                ax.scatter(panel["lr"].to_numpy()[chosen], y_values[chosen], c=colour, s=40, marker="s", label=regime)
        for boundary in boundaries or []:
            if boundary.get("noise") == noise:
                y = boundary.get(y_axis) if boundary.get(y_axis) is not None else 1.0
                ax.plot([boundary["lr_boundary"]] * 2, [y / 1.15, y * 1.15], "k-", lw=2)
        ax.set_xscale("log")
        if np.all(y_values > 0) and np.ptp(y_values) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("lr")
        ax.set_ylabel(y_axis)
        ax.set_title(f"{protocol}: regimes (bars: boundaries), noise = {noise}")
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def temperature_panels(diagram: pl.DataFrame, entry: dict, path: Path) -> Path:
    """U and S against lr, T(lr) with its interval band and power law, and F(lr') for several T."""
    table = pl.DataFrame(entry["points"]).sort("lr")
    lr = table["lr"].to_numpy()
    line = diagram.filter(pl.col("protocol") == "sphere")
    for key in ("radius", "noise", "batch_size", "seed"):
        if key in entry and key in line.columns:
            line = line.filter(pl.col(key) == entry[key]) if entry[key] is not None else line.filter(pl.col(key).is_null())
    line = line.sort("lr")
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.14, top=0.88, wspace=0.3)
    for ax, quantity in zip(axes[:2], ("U", "S")):
        for regime, colour in REGIME_COLOURS.items():
            chosen = line.filter(pl.col("regime") == regime)
            if chosen.height:
                ax.plot(chosen["lr"].to_numpy(), chosen[quantity].to_numpy(), "o", color=colour, ms=4, label=regime)
        ax.set_xscale("log")
        ax.set_xlabel("lr")
        ax.set_ylabel(quantity)
        ax.legend(fontsize=7)
    T = table["T"].to_numpy().astype(float)
    low = table["T_min"].to_numpy().astype(float)
    high = table["T_max"].to_numpy().astype(float)
    axes[2].fill_between(lr, low, high, alpha=0.3, label="[T_min, T_max]")
    axes[2].plot(lr, T, "o-", ms=4, label="T (free energy)")
    law = entry.get("power_law", {})
    if "k" in law:
        axes[2].plot(lr, law["b"] * lr ** law["k"], "k--", lw=1, label=f"T = {law['b']:.3g} lr^{law['k']:.2f}")
    axes[2].set_xscale("log")
    axes[2].set_yscale("log")
    axes[2].set_xlabel("lr")
    axes[2].set_ylabel("T (loss units)")
    axes[2].legend(fontsize=7)
    U_s, S_s = line["U"].to_numpy(), line["S"].to_numpy()
    equilibrium = line["regime"].to_numpy() == "equilibrium"
    for T_ref in T[np.isfinite(T)][:: max(1, int(np.isfinite(T).sum() // 4))]:
        F = U_s[equilibrium] - T_ref * S_s[equilibrium]
        curve = axes[3].plot(line["lr"].to_numpy()[equilibrium], F - F.min(), "-", lw=1, label=f"T = {T_ref:.2g}")
        axes[3].plot(line["lr"].to_numpy()[equilibrium][np.argmin(F)], 0.0, "v", color=curve[0].get_color())
    axes[3].set_xscale("log")
    axes[3].set_xlabel("lr'")
    axes[3].set_ylabel("F(lr') - min F")
    axes[3].set_title("free energy U - T S")
    axes[3].legend(fontsize=7)
    fig.suptitle("sphere: " + ", ".join(f"{k} = {entry[k]}" for k in ("radius", "noise", "batch_size", "seed") if k in entry))
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
