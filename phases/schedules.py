"""`PhaseScheduler`: a PyTorch learning-rate scheduler that follows a recommendation's stages.

    recommendation = Recommendation.from_dict(json.load(open("schedule.json")))
    optimizer = torch.optim.SGD(model.parameters(), lr=recommendation.stages[0].lr)
    scheduler = PhaseScheduler(optimizer, recommendation)
    for step in range(recommendation.steps):
        ...; optimizer.step(); scheduler.step()

After k calls of `scheduler.step()` every parameter group trains at the lr of the stage that
contains step k. Where a stage changes the weight decay, every group whose weight decay was not 0 when the
scheduler was created gets the stage's value; groups created with weight_decay=0 (biases, by a
common convention) keep 0. Past the last stage's start the last stage holds.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from analysis.recommend import Recommendation


class PhaseScheduler(LRScheduler):
    """Follow the (step, lr, wd) stages of a recommendation; a standard `LRScheduler`.

    recommendation: a `Recommendation`, its `to_dict()` form, or a path to the JSON or YAML file
    that `phases recommend --out` writes. `state_dict()` / `load_state_dict()` save and restore the
    position and the stages.
    """

    def __init__(self, optimizer: Optimizer, recommendation: Recommendation | dict[str, Any] | str | Path, last_epoch: int = -1):
        if isinstance(recommendation, (str, Path)):
            recommendation = read_recommendation(recommendation)
        if isinstance(recommendation, dict):
            recommendation = Recommendation.from_dict(recommendation)
        self.starts = [stage.step for stage in recommendation.stages]
        self.stage_lrs = [stage.lr for stage in recommendation.stages]
        self.stage_wds = [stage.wd for stage in recommendation.stages]
        self.decayed_groups = [group.get("weight_decay", 0.0) != 0.0 for group in optimizer.param_groups]
        super().__init__(optimizer, last_epoch)

    def stage_index(self, step: int | None = None) -> int:
        """Return the index of the stage that contains `step` (default: the current step)."""
        step = self.last_epoch if step is None else step
        return max(0, bisect.bisect_right(self.starts, step) - 1)

    def get_lr(self) -> list[float]:
        lr = self.stage_lrs[self.stage_index()]
        return [lr for _ in self.optimizer.param_groups]

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        wd = self.stage_wds[self.stage_index()]
        for group, decayed in zip(self.optimizer.param_groups, self.decayed_groups):
            if decayed:
                group["weight_decay"] = wd


def read_recommendation(path: str | Path) -> dict[str, Any]:
    """Read a recommendation file: YAML for .yaml/.yml, else JSON; raises ValueError if unreadable."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(
            f"cannot read recommendation {path}: {exc}; give the JSON or YAML file that `phases recommend --out` writes"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(f"recommendation {path} is not a mapping; give the file that `phases recommend --out` writes")
    return data
