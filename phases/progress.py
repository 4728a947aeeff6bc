"""A Ray Tune callback that advances the terminal progress bar on the driver."""

from __future__ import annotations

from typing import Any

from ray import tune
from rich.progress import Progress

# Progress bars are kept here, not on the callback, because Tune pickles its run config
# (callbacks included) and a rich Progress contains locks, which cannot be pickled.
_PROGRESS: dict[int, tuple[Progress, Any]] = {}


class ProgressCallback(tune.Callback):
    """Advances a rich progress bar as trials finish or fail for good."""

    def __init__(self, progress: Progress, task: Any):
        self.key = id(progress)
        _PROGRESS[self.key] = (progress, task)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.key in _PROGRESS:
            progress, task = _PROGRESS[self.key]
            progress.advance(task)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if self.key in _PROGRESS:
            progress, task = _PROGRESS[self.key]
            progress.advance(task)
            progress.console.print(f"[red]chunk {trial.config.get('chunk_id')} failed after its retries[/]")


def forget_progress(callback: ProgressCallback) -> None:
    _PROGRESS.pop(callback.key, None)
