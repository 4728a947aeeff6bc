"""phases: phase diagrams of SGD training, swept on Ray Tune and tracked in MLflow.

Notebook use::

    import phases
    result = phases.run_sweep("search_spaces/ideal_gas_smoke.yaml", storage="runs")
    sweep = phases.load_sweep(result.path)
    sweep.diagram  # polars DataFrame, one row per point
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("phases")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from phases.runtime import apply_environment_defaults  # noqa: E402

apply_environment_defaults()

from phases.results import Sweep, load_sweep  # noqa: E402
from phases.spec import SpecError, SweepSpec, load  # noqa: E402
from phases.sweep import SweepError, SweepResult, plan_sweep, run_sweep  # noqa: E402

__all__ = [
    "SpecError",
    "Sweep",
    "SweepError",
    "SweepResult",
    "SweepSpec",
    "__version__",
    "load",
    "load_sweep",
    "plan_sweep",
    "run_sweep",
]
