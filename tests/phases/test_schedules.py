"""PhaseScheduler follows a recommendation's stages exactly and survives a state_dict round trip."""

from __future__ import annotations

import json

import pytest
import torch

from analysis.recommend import Recommendation, Stage
from phases.schedules import PhaseScheduler

STAGES = ((0, 0.3, 1e-2), (100, 0.1, 1e-2), (250, 0.03, 5e-3))


def _recommendation() -> Recommendation:
    stages = tuple(Stage(step, lr, wd, None, "test") for step, lr, wd in STAGES)
    return Recommendation(400, stages, {"protocol": "lr"}, None, {}, {}, ())


def _optimizer() -> torch.optim.SGD:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return torch.optim.SGD([{"params": [model.weight], "weight_decay": 1e-2}, {"params": [model.bias], "weight_decay": 0.0}], lr=1.0)


def _expected(step: int) -> tuple[float, float]:
    lr, wd = STAGES[0][1:]
    for start, stage_lr, stage_wd in STAGES:
        if step >= start:
            lr, wd = stage_lr, stage_wd
    return lr, wd


def _run(optimizer, scheduler, steps: int) -> list[tuple[float, float, float]]:
    seen = []
    for _ in range(steps):
        groups = optimizer.param_groups
        seen.append((groups[0]["lr"], groups[0]["weight_decay"], groups[1]["weight_decay"]))
        optimizer.step()
        scheduler.step()
    return seen


def test_lr_sequence_matches_the_stages_exactly():
    optimizer = _optimizer()
    seen = _run(optimizer, PhaseScheduler(optimizer, _recommendation()), 400)
    for step, (lr, wd, bias_wd) in enumerate(seen):
        assert (lr, wd) == _expected(step), step
        assert bias_wd == 0.0  # a group created without weight decay keeps none
    assert {lr for lr, _, _ in seen} == {0.3, 0.1, 0.03}


def test_state_dict_round_trip_mid_schedule(tmp_path):
    optimizer = _optimizer()
    scheduler = PhaseScheduler(optimizer, _recommendation())
    _run(optimizer, scheduler, 180)
    saved = tmp_path / "state.pt"
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, saved)
    rest = _run(optimizer, scheduler, 220)

    restored_optimizer = _optimizer()
    path = tmp_path / "recommendation.json"
    path.write_text(json.dumps(_recommendation().to_dict()))
    restored = PhaseScheduler(restored_optimizer, path)
    state = torch.load(saved, weights_only=True)
    restored_optimizer.load_state_dict(state["optimizer"])
    restored.load_state_dict(state["scheduler"])
    assert _run(restored_optimizer, restored, 220) == rest
    assert restored.last_epoch == 400


def test_malformed_stages_are_refused():
    data = _recommendation().to_dict()
    data["stages"][1]["step"] = 0
    with pytest.raises(ValueError, match="start at step 0 and have increasing steps"):
        PhaseScheduler(_optimizer(), data)


def test_yaml_file_and_bad_recommendations(tmp_path):
    import yaml

    path = tmp_path / "recommendation.yaml"
    path.write_text(yaml.safe_dump(_recommendation().to_dict(), sort_keys=False))
    optimizer = _optimizer()
    seen = _run(optimizer, PhaseScheduler(optimizer, path), 300)
    assert [lr for lr, _, _ in seen] == [_expected(step)[0] for step in range(300)]
    with pytest.raises(ValueError, match="needs the keys steps and stages \\(missing: stages\\)"):
        PhaseScheduler(_optimizer(), {"steps": 10})
    broken = tmp_path / "broken.json"
    broken.write_text("not json")
    with pytest.raises(ValueError, match="cannot read recommendation .*broken.json"):
        PhaseScheduler(_optimizer(), broken)
