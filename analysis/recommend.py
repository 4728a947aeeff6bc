"""Learning-rate schedules from a phase diagram: start just above the convergence threshold, hold
until equilibrium, then cool in stages that each re-equilibrate.

The algorithm reads one line of learning rates of protocol `lr` (plain SGD with coupled weight
decay, what a PyTorch user runs) at fixed weight decay, noise, batch size and width:

1. **Slice.** Noise, batch size and width are fixed at the given value, else at the value with the
   most points (ties: the smaller). Points repeated over seeds are averaged per (lr, wd).
2. **Convergence threshold** on the line: the geometric mean of the smallest `equilibrium` lr and
   the next smaller lr of the line, whether that point is `converged` or `unknown` (still relaxing
   when its run ended). Without a smaller point the threshold lies below the grid.
3. **Initial lr.** The lower half (in ln lr) of the line's equilibrium band, which is the band just
   above the threshold that the large-LR study recommends. Within it, the point with the best
   window-mean test accuracy (ties: the smaller lr), or the smallest equilibrium lr where the
   diagram has no test metrics. The weight decay is the given one, else the line whose initial
   point has the best test accuracy (without test metrics: the lowest stationary loss U).
4. **Hold** for the measured equilibration time of that point: `stationary_from`, the first step of
   its trend-free window (else `window_start`).
5. **Laws.** The temperature law T = A lr^b is a least-squares fit of ln T on ln lr over the line's
   equilibrium points; with one point, b = 1/2, the `lr` protocol's T ∝ √lr at fixed noise. The
   loss law U = U0 + c T is a least-squares fit over the same points (equipartition gives
   c = (d - 1)/2 near a minimum). Together they predict the stationary loss at any lr; a prediction
   below the line's lowest measured loss (or below 0) is held at that loss.
6. **Cooling.** The final lr is the smallest lr of the line (the laws are not extrapolated beyond
   the grid), or the lr whose predicted loss equals `target_loss` if that is larger. The path
   from the initial to the final lr is geometric in K stages. A stage at lr needs
   `e_folds / (4 lr wd)` steps to re-equilibrate: the e-folding time of the radius under `lr`,
   the slowest relaxation of the ideal-gas picture. K is the largest number of stages, at most
   `max_stages`, whose re-equilibration times fit the budget left after the hold. The spare steps
   are shared among the cooling stages in proportion to their times. If not even one stage fits, the final lr
   is raised to the smallest one that does.

Degraded cases are flagged (`degraded`, with the reason in `warnings`), not hidden: a diagram
without equilibrium points gives a constant lr at its largest converged lr, and a budget shorter
than the hold gives a constant initial lr. A diagram with neither equilibrium nor converged points,
or without the needed columns, raises ValueError.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

REQUIRED_COLUMNS = ("protocol", "lr", "wd", "regime", "U", "T")
SLICE_AXES = ("noise", "batch_size", "width")
DEFAULT_E_FOLDS = 1.0
DEFAULT_MAX_STAGES = 4


@dataclass(frozen=True)
class Stage:
    """From `step` on (until the next stage), train at `lr` with weight decay `wd`."""

    step: int
    lr: float
    wd: float
    predicted_loss: float | None
    reason: str


@dataclass(frozen=True)
class Recommendation:
    """A staged schedule and the diagram numbers behind it."""

    steps: int
    stages: tuple[Stage, ...]
    selection: dict[str, Any]
    threshold: float | None
    temperature_law: dict[str, Any]
    loss_law: dict[str, Any]
    reasons: tuple[str, ...]
    degraded: bool = False
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def stage_at(self, step: int) -> Stage:
        """Return the stage that contains step `step` (0-based)."""
        current = self.stages[0]
        for stage in self.stages:
            if stage.step <= step:
                current = stage
        return current

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stages"] = [asdict(s) for s in self.stages]
        out["reasons"], out["warnings"] = list(self.reasons), list(self.warnings)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recommendation":
        missing = [key for key in ("steps", "stages") if key not in data]
        if missing:
            raise ValueError(f"a recommendation needs the keys steps and stages (missing: {', '.join(missing)}); use the output of `phases recommend`")
        try:
            stages = tuple(Stage(**s) for s in data["stages"])
        except TypeError as exc:
            raise ValueError(f"a recommendation stage needs step, lr, wd, predicted_loss and reason: {exc}") from None
        if not stages or stages[0].step != 0 or any(b.step <= a.step for a, b in zip(stages, stages[1:])):
            raise ValueError("a recommendation's stages must start at step 0 and have increasing steps")
        return cls(
            steps=int(data["steps"]), stages=stages, selection=dict(data.get("selection", {})), threshold=data.get("threshold"),
            temperature_law=dict(data.get("temperature_law", {})), loss_law=dict(data.get("loss_law", {})),
            reasons=tuple(data.get("reasons", ())), degraded=bool(data.get("degraded", False)), warnings=tuple(data.get("warnings", ())),
        )


def load_diagram(path: str | Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Read a diagram.parquet (or a sweep directory that contains one) and the spec in its metadata."""
    path = Path(path)
    if path.is_dir():
        path = path / "diagram.parquet"
    if not path.is_file():
        raise ValueError(f"diagram {path} not found; give a sweep directory or its diagram.parquet (run `phases sweep` or `phases fit` first)")
    metadata = pq.read_schema(path).metadata or {}
    spec = json.loads(metadata[b"phases.spec"]) if b"phases.spec" in metadata else {}
    return pl.read_parquet(path), spec


def recommend(
    diagram: pl.DataFrame,
    *,
    steps: int,
    wd: float | None = None,
    noise: float | None = None,
    target_loss: float | None = None,
    e_folds: float = DEFAULT_E_FOLDS,
    max_stages: int = DEFAULT_MAX_STAGES,
) -> Recommendation:
    """Recommend a staged (step, lr, wd) schedule for `steps` SGD steps from a phase diagram.

    See the module docstring for the algorithm. Deterministic: the same diagram and arguments give
    the same recommendation. Raises ValueError for unusable input, naming the value and the fix.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if e_folds <= 0 or max_stages < 1:
        raise ValueError(f"e_folds must be > 0 and max_stages >= 1, got {e_folds} and {max_stages}")
    missing = [c for c in REQUIRED_COLUMNS if c not in diagram.columns]
    if missing:
        raise ValueError(
            f"the diagram lacks the column(s) {', '.join(missing)}; give a diagram.parquet written by `phases sweep` or `phases fit` "
            "(its regime and T columns come from the analysis)"
        )
    rows = diagram.filter(pl.col("protocol") == "lr")
    if rows.is_empty():
        found = sorted(set(diagram["protocol"].drop_nulls().to_list()))
        raise ValueError(
            f"the diagram has no protocol lr points (it has: {', '.join(found) or 'none'}); schedules are for plain SGD with "
            "weight decay, so sweep a grid with protocol: lr"
        )
    rows, selection, notes = _select_slice(rows, noise)
    lines = _lines(rows)
    if wd is not None:
        matching = [w for w in lines if math.isclose(w, wd, rel_tol=1e-9)]
        if not matching:
            raise ValueError(f"--wd {wd:g} is not in the diagram; its weight decays are {', '.join(f'{w:g}' for w in sorted(lines))}")
        lines = {matching[0]: lines[matching[0]]}
    has_test = "test_acc" in rows.columns and rows["test_acc"].drop_nulls().len() > 0

    candidates = {w: _start_point(line, has_test) for w, line in lines.items()}
    usable = {w: c for w, c in candidates.items() if c is not None}
    if not usable:
        return _without_equilibrium(lines, steps, selection, notes, has_test)
    chosen_wd = _best_line(usable, has_test)
    line, start = lines[chosen_wd], usable[chosen_wd]
    selection = {**selection, "wd": chosen_wd}
    reasons = list(notes)
    reasons.append(_wd_reason(chosen_wd, usable, has_test, given=wd is not None))

    threshold, neighbour = _threshold(line)
    lr0 = float(start["lr"])
    band = line.filter(pl.col("regime") == "equilibrium")["lr"]
    where = (
        f"the convergence threshold is about {threshold:.3g}, between the smallest equilibrium lr and the next smaller one ({neighbour})"
        if threshold is not None
        else "no grid point lies below the equilibrium band, so the threshold is below the grid"
    )
    accuracy = f", test accuracy {start['test_acc']:.3f}" if has_test and start.get("test_acc") is not None else ""
    reasons.append(
        f"initial lr {lr0:.3g}: in the lower half of the equilibrium band {band.min():.3g}-{band.max():.3g} at wd {chosen_wd:g}; "
        f"{where}; U there is {start['U']:.4g}{accuracy}"
    )

    hold, hold_source = _hold(start, steps)
    relax = e_folds / (4.0 * lr0 * chosen_wd)
    reasons.append(f"hold {hold} steps: the measured equilibration time at lr {lr0:.3g} ({hold_source}); theory's radius e-folding time 1/(4 lr wd) is {relax / e_folds:.0f} steps")

    temperature_law = _temperature_law(line)
    loss_law = _loss_law(line)
    warnings: list[str] = []
    if temperature_law["source"] != "fit":
        warnings.append(f"one equilibrium point only: the temperature law uses the theory exponent b = {temperature_law['exponent']}")
    if loss_law["source"] != "fit":
        warnings.append("no measured loss-temperature relation (fewer than two equilibrium temperatures or a non-increasing fit): predictions stay at the initial point's loss")

    # A loss law fitted over a hot band can extrapolate below any loss the line reached, even below
    # 0; predictions are held at the line's lowest measured loss instead.
    floor_loss = max(0.0, float(line["U"].drop_nans().min()))

    def law_loss(lr: float) -> float:
        temperature = temperature_law["prefactor"] * lr ** temperature_law["exponent"]
        return float(loss_law["intercept"] + loss_law["slope"] * temperature)

    def predict(lr: float) -> float:
        return max(floor_loss, law_loss(lr))

    def relaxation(lr: float) -> float:
        return e_folds / (4.0 * lr * chosen_wd)

    first = Stage(0, lr0, chosen_wd, float(start["U"]), f"equilibrate at the initial lr (measured U {start['U']:.4g})")
    if hold >= steps:
        warnings.append(
            f"the budget of {steps} steps is shorter than the measured equilibration time of {hold} steps at lr {lr0:.3g}: "
            "the run ends before equilibrium, so the schedule is the initial lr throughout and its predicted loss is not reached"
        )
        return Recommendation(steps, (first,), selection, threshold, temperature_law, loss_law, tuple(reasons), True, tuple(warnings))

    floor, floor_reason = float(line["lr"].min()), "the smallest lr of the diagram's line, since the laws are not extrapolated below the grid"
    if target_loss is not None:
        target_lr = _lr_for_loss(target_loss, temperature_law, loss_law)
        if target_lr is None:
            warnings.append(f"target loss {target_loss:g} is below the fitted zero-temperature loss U0 = {loss_law['intercept']:.4g}; cooling to the grid's smallest lr")
        elif target_lr >= lr0:
            floor, floor_reason = lr0, f"the initial point already reaches the target loss {target_loss:g}"
        elif target_lr > floor:
            floor, floor_reason = target_lr, f"its predicted stationary loss equals the target {target_loss:g}"
    if floor >= lr0:
        reasons.append(f"no cooling: {floor_reason}")
        return Recommendation(steps, (first,), selection, threshold, temperature_law, loss_law, tuple(reasons), False, tuple(warnings))

    spare = steps - hold
    path: list[float] = []
    for count in range(max_stages, 0, -1):
        trial = [lr0 * (floor / lr0) ** (k / count) for k in range(1, count + 1)]
        if sum(relaxation(lr) for lr in trial) <= spare:
            path = trial
            break
    if not path:
        reachable = e_folds / (4.0 * chosen_wd * spare)
        if reachable >= lr0:
            warnings.append(f"the {spare} steps after the hold are too few to re-equilibrate at any lr below {lr0:.3g}; no cooling")
            return Recommendation(steps, (first,), selection, threshold, temperature_law, loss_law, tuple(reasons), False, tuple(warnings))
        warnings.append(f"the budget allows cooling only to lr {reachable:.3g}, not to {floor:.3g}: {floor_reason}")
        floor, floor_reason, path = reachable, "the smallest lr that re-equilibrates within the budget", [reachable]
    reasons.append(f"final lr {floor:.3g}: {floor_reason}; {len(path)} cooling stage(s), geometric from {lr0:.3g}")
    times = np.array([relaxation(lr) for lr in path])
    lengths = np.floor(times * spare / times.sum()).astype(int)
    lengths[-1] = spare - int(lengths[:-1].sum())  # the last stage runs to the end of the budget
    stages = [first]
    step = hold
    for lr, length, needed in zip(path, lengths, times):
        notes = []
        if law_loss(lr) < floor_loss:
            notes.append(f"the laws give {law_loss(lr):.4g}, held at the line's lowest measured loss")
        if threshold is not None and lr < threshold:
            notes.append("below the convergence threshold the laws are extrapolated and SGD keeps lowering the loss")
        temperature = temperature_law["prefactor"] * lr ** temperature_law["exponent"]
        reason = f"cool to lr {lr:.3g}: T = {temperature:.3g}, {length} steps (re-equilibration needs {needed:.0f})"
        stages.append(Stage(int(step), float(lr), chosen_wd, predict(lr), "; ".join([reason, *notes])))
        step += int(length)
    reasons.append(
        f"temperature law T = {temperature_law['prefactor']:.3g} lr^{temperature_law['exponent']:.3f} ({temperature_law['source']}, {temperature_law['n']} points); "
        f"loss law U = {loss_law['intercept']:.4g} + {loss_law['slope']:.4g} T ({loss_law['source']}, {loss_law['n']} points)"
    )
    return Recommendation(steps, tuple(stages), selection, threshold, temperature_law, loss_law, tuple(reasons), False, tuple(warnings))


def _select_slice(rows: pl.DataFrame, noise: float | None) -> tuple[pl.DataFrame, dict[str, Any], list[str]]:
    selection: dict[str, Any] = {"protocol": "lr"}
    notes: list[str] = []
    for axis in SLICE_AXES:
        if axis not in rows.columns or rows[axis].drop_nulls().is_empty():
            continue
        counts = rows.group_by(axis).len().drop_nulls(axis).sort([pl.col("len"), pl.col(axis)], descending=[True, False])
        values = counts[axis].to_list()
        if axis == "noise" and noise is not None:
            matching = [v for v in values if math.isclose(v, noise, rel_tol=1e-9, abs_tol=1e-12)]
            if not matching:
                raise ValueError(f"--noise {noise:g} is not in the diagram; its noise values are {', '.join(f'{v:g}' for v in sorted(values))}")
            value = matching[0]
        else:
            value = values[0]
            if len(values) > 1:
                notes.append(f"{axis} {value:g}: the value with the most points (the diagram has {', '.join(f'{v:g}' for v in sorted(values))})")
        rows = rows.filter(pl.col(axis) == value)
        selection[axis] = value
    return rows, selection, notes


def _lines(rows: pl.DataFrame) -> dict[float, pl.DataFrame]:
    """Per weight decay, the points averaged per lr (over seeds), sorted by lr; regime by majority."""
    numeric = [c for c in ("U", "T", "test_acc", "stationary_from", "window_start") if c in rows.columns]
    grouped = (
        rows.group_by("wd", "lr")
        .agg(*[pl.col(c).cast(pl.Float64).mean() for c in numeric], pl.col("regime").alias("regimes"))
        .with_columns(pl.col("regimes").map_elements(_majority, return_dtype=pl.String).alias("regime"))
        .drop("regimes")
        .sort("wd", "lr")
    )
    return {float(w): part.drop("wd") for (w,), part in grouped.partition_by("wd", as_dict=True, maintain_order=True).items()}


def _majority(labels: pl.Series) -> str:
    """Return the most common label; ties go to the first in equilibrium, converged, divergent, unknown."""
    order = ("equilibrium", "converged", "divergent", "unknown")
    values = [v if v in order else "unknown" for v in labels.to_list()]
    return max(order, key=lambda label: (values.count(label), -order.index(label)))


def _start_point(line: pl.DataFrame, has_test: bool) -> dict[str, Any] | None:
    band = line.filter((pl.col("regime") == "equilibrium") & pl.col("U").is_finite() & pl.col("T").is_finite() & (pl.col("T") > 0))
    if band.is_empty():
        return None
    low, high = math.log(band["lr"].min()), math.log(band["lr"].max())
    lower = band.filter(pl.col("lr").log() <= (low + high) / 2 + 1e-12)
    if has_test and lower["test_acc"].drop_nulls().len():
        best = lower.drop_nulls("test_acc").sort([pl.col("test_acc"), pl.col("lr")], descending=[True, False]).row(0, named=True)
        return best
    return lower.row(0, named=True)


def _best_line(candidates: dict[float, dict[str, Any]], has_test: bool) -> float:
    def key(item: tuple[float, dict[str, Any]]) -> tuple[float, float]:
        w, point = item
        accuracy = point.get("test_acc")
        score = -accuracy if has_test and accuracy is not None else point["U"]
        return (score, w)

    return min(candidates.items(), key=key)[0]


def _wd_reason(chosen: float, candidates: dict[float, dict[str, Any]], has_test: bool, given: bool) -> str:
    if given:
        return f"wd {chosen:g}: given"
    if len(candidates) == 1:
        return f"wd {chosen:g}: the only weight decay with equilibrium points"
    metric = "test_acc" if has_test else "U"
    others = ", ".join(f"{metric} {p[metric]:.4g} at wd {w:g}" for w, p in sorted(candidates.items()) if w != chosen and p.get(metric) is not None)
    what = "best test accuracy" if has_test else "lowest stationary loss"
    return f"wd {chosen:g}: its initial point has the {what} ({metric} {candidates[chosen][metric]:.4g}; {others})"


def _threshold(line: pl.DataFrame) -> tuple[float | None, str | None]:
    """Return the geometric mean of the smallest equilibrium lr and the next smaller lr of the line,
    and that point's label (converged, or unknown if it was still relaxing when its run ended)."""
    band = line.filter(pl.col("regime") == "equilibrium")
    smallest = float(band["lr"].min())
    below = line.filter(pl.col("lr") < smallest).sort("lr")
    if below.is_empty():
        return None, None
    neighbour = below.row(-1, named=True)
    return math.sqrt(float(neighbour["lr"]) * smallest), neighbour["regime"]


def _hold(point: dict[str, Any], steps: int) -> tuple[int, str]:
    value = point.get("stationary_from")
    if value is not None and math.isfinite(value):
        return int(math.ceil(value)), "first step of its trend-free window, stationary_from"
    value = point.get("window_start")
    if value is not None and math.isfinite(value):
        return int(math.ceil(value)), "no trend-free window found; the start of its stationary window"
    return int(math.ceil(steps / 2)), "no measured time; half the budget"


def _temperature_law(line: pl.DataFrame) -> dict[str, Any]:
    band = line.filter((pl.col("regime") == "equilibrium") & (pl.col("T") > 0))
    x, y = np.log(band["lr"].to_numpy()), np.log(band["T"].to_numpy())
    if len(x) >= 2:
        slope, intercept = np.polyfit(x, y, 1)
        return {"prefactor": float(np.exp(intercept)), "exponent": float(slope), "n": len(x), "source": "fit"}
    return {"prefactor": float(np.exp(y[0] - 0.5 * x[0])), "exponent": 0.5, "n": len(x), "source": "theory exponent"}


def _loss_law(line: pl.DataFrame) -> dict[str, Any]:
    band = line.filter((pl.col("regime") == "equilibrium") & (pl.col("T") > 0))
    t, u = band["T"].to_numpy(), band["U"].to_numpy()
    if len(t) >= 2 and np.ptp(t) > 0:
        slope, intercept = np.polyfit(t, u, 1)
        if slope > 0:
            return {"intercept": float(intercept), "slope": float(slope), "n": len(t), "source": "fit"}
    start = _start_point(line, False)
    return {"intercept": float(start["U"]) if start else float("nan"), "slope": 0.0, "n": len(t), "source": "constant"}


def _lr_for_loss(target: float, temperature_law: dict[str, Any], loss_law: dict[str, Any]) -> float | None:
    if loss_law["slope"] <= 0:
        return None
    temperature = (target - loss_law["intercept"]) / loss_law["slope"]
    if temperature <= 0:
        return None
    return float((temperature / temperature_law["prefactor"]) ** (1.0 / temperature_law["exponent"]))


def _without_equilibrium(lines: dict[float, pl.DataFrame], steps: int, selection: dict[str, Any], notes: list[str], has_test: bool) -> Recommendation:
    converged = {w: line.filter(pl.col("regime") == "converged") for w, line in lines.items()}
    converged = {w: c for w, c in converged.items() if not c.is_empty()}
    if not converged:
        raise ValueError(
            "the diagram has no equilibrium and no converged point on protocol lr at the selected slice (every point is divergent "
            "or unknown); sweep smaller learning rates or run longer, then recommend again"
        )
    tops = {w: c.sort("lr").row(-1, named=True) for w, c in converged.items()}
    chosen = _best_line(tops, has_test)
    point = tops[chosen]
    lr = float(point["lr"])
    metric = "test accuracy" if has_test else "stationary loss U"
    reason = (
        f"constant lr {lr:.3g} at wd {chosen:g}: the largest converged lr, on the weight-decay line whose largest converged point "
        f"has the best {metric}; with no equilibrium band there is nothing to cool from"
    )
    warning = "degraded: the diagram has no equilibrium point, so there is no temperature law, no threshold and no cooling path"
    stage = Stage(0, lr, chosen, float(point["U"]), reason)
    empty = {"source": "none", "n": 0}
    return Recommendation(steps, (stage,), {**selection, "wd": chosen}, None, empty, empty, (*notes, reason), True, (warning,))
