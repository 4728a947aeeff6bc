"""Analysis of stationary states: pure functions over polars frames and numpy arrays.

This package imports nothing from `phases`, so it works on logs written by any code.
"""

from analysis.diagram import build_phase_diagram, read_diagram_metadata
from analysis.entropy import direction_entropy, kozachenko_leonenko
from analysis.eos import closed_form_agreement, fit_equation_of_state, maxwell_slopes
from analysis.regimes import label_regimes
from analysis.thermo import add_thermodynamics, temperature

__all__ = [
    "add_thermodynamics",
    "build_phase_diagram",
    "closed_form_agreement",
    "direction_entropy",
    "fit_equation_of_state",
    "kozachenko_leonenko",
    "label_regimes",
    "maxwell_slopes",
    "read_diagram_metadata",
    "temperature",
]
