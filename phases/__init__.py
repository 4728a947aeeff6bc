"""phases: phase diagrams of SGD training, swept on Ray Tune and tracked in MLflow.

Notebook use::

    import phases
    result = phases.run_sweep("search_spaces/ideal_gas_smoke.yaml", storage="runs")
    sweep = phases.load_sweep(result.path)
    sweep.diagram  # polars DataFrame, one row per point

The public names are imported on first use, so that Ray trial workers, which import this package,
load only what training needs.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("phases")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from phases.runtime import apply_environment_defaults  # noqa: E402

apply_environment_defaults()

_PUBLIC = {
    "SpecError": "phases.spec",
    "SweepSpec": "phases.spec",
    "load": "phases.spec",
    "Sweep": "phases.results",
    "load_sweep": "phases.results",
    "SweepError": "phases.sweep",
    "SweepResult": "phases.sweep",
    "plan_sweep": "phases.sweep",
    "run_sweep": "phases.sweep",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'phases' has no attribute {name!r}")
