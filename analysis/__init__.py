"""Analysis of stationary states: pure functions over polars frames and numpy arrays.

This package imports nothing from `phases`, so it works on logs written by any code. Public names
are imported on first use; import the modules (`analysis.eos`, `analysis.entropy`, ...) directly
for everything else.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "add_thermodynamics": "analysis.thermo",
    "temperature": "analysis.thermo",
    "build_phase_diagram": "analysis.diagram",
    "read_diagram_metadata": "analysis.diagram",
    "direction_entropy": "analysis.entropy",
    "kozachenko_leonenko": "analysis.entropy",
    "closed_form_agreement": "analysis.eos",
    "fit_equation_of_state": "analysis.eos",
    "maxwell_slopes": "analysis.eos",
    "label_regimes": "analysis.regimes",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
