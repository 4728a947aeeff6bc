"""Export a phase diagram to Optuna studies, so Optuna's plots and optuna-dashboard can show it.

One study per (protocol, noise) slice, named `<sweep>/<protocol>/noise=<noise>`. Each point becomes
a finished trial. Its parameters are the swept coordinates (lr and wd, or lr and radius for
`sphere`), its value is the stationary loss U (direction: minimise), and its user attributes
contain the regime, T, S and point_id. A point without a finite U (diverged) becomes a failed trial.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import polars as pl

logger = logging.getLogger(__name__)


@dataclass
class ExportReport:
    studies: dict[str, int]  # study name -> trials written


def export_to_optuna(diagram: pl.DataFrame, sweep_name: str, storage: str, *, overwrite: bool = False) -> ExportReport:
    """Write one Optuna study per (protocol, noise) slice of `diagram` into `storage`.

    Raises ValueError if a study of that name exists and `overwrite` is false, or if the diagram
    lacks the columns point_id, protocol, lr, U or regime.
    """
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    missing = [c for c in ("point_id", "protocol", "lr", "U", "regime") if c not in diagram.columns]
    if missing:
        raise ValueError(f"the diagram lacks columns {', '.join(missing)}; is it a diagram.parquet written by phases?")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    existing = {s.study_name for s in optuna.get_all_study_summaries(storage=storage)}
    report = ExportReport({})
    for (protocol, noise), rows in diagram.group_by(["protocol", "noise"], maintain_order=True):
        name = f"{sweep_name}/{protocol}/noise={noise}"
        if name in existing:
            if not overwrite:
                raise ValueError(f"study {name!r} already exists in {storage}; pass --overwrite to replace it")
            optuna.delete_study(study_name=name, storage=storage)
        axes = ["lr", "radius" if protocol == "sphere" else "wd"]
        distributions = {axis: _distribution(rows[axis], FloatDistribution) for axis in axes if rows[axis].null_count() < rows.height}
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
        trials = []
        for row in rows.iter_rows(named=True):
            value = row["U"]
            finite = value is not None and math.isfinite(value)
            trials.append(create_trial(
                state=TrialState.COMPLETE if finite else TrialState.FAIL,
                value=value if finite else None,
                params={axis: row[axis] for axis in distributions},
                distributions=distributions,
                user_attrs={k: row.get(k) for k in ("point_id", "regime", "T", "S", "stationary", "diverged") if row.get(k) is not None},
            ))
        study.add_trials(trials)
        report.studies[name] = len(trials)
        logger.info("exported %d trials to Optuna study %s", len(trials), name)
    return report


def _distribution(values: pl.Series, distribution):
    low, high = float(values.min()), float(values.max())
    if low == high:
        return distribution(low, high)
    return distribution(low, high, log=low > 0)
