"""The Ray Tune trainable: trains one chunk inside a trial and writes its part file.

Kept apart from the driver code so that trial workers import only what training needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phases.parts import part_table
from phases.runtime import apply_environment_defaults
from phases.spec import SweepSpec
from phases.storage import SCHEMA_VERSION, SweepStore, part_name
from phases.trials import get_kind
from phases.trials.base import TrialContext, new_state_dir, read_state_dir, write_state_dir


def train_chunk(config: dict[str, Any], payload: dict[str, Any]) -> None:
    """Ray Tune trainable: train one chunk and write its part file atomically."""
    from ray import tune

    apply_environment_defaults()
    chunk_ = payload["chunks"][config["chunk_id"]]
    store = SweepStore(payload["storage"], payload["name"])
    if store.exists(part_name(chunk_.chunk_id)):
        tune.report({"done": 1, "points": len(chunk_.points)})
        return
    spec = SweepSpec.model_validate(payload["spec"])

    def save_state(arrays: dict, meta: dict) -> None:
        directory = new_state_dir()
        write_state_dir(directory, arrays, meta)
        tune.report({"done": 0, "step": meta.get("step", 0)}, checkpoint=tune.Checkpoint.from_directory(str(directory)))

    def load_state():
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return read_state_dir(Path(directory))

    context = TrialContext(
        spec=spec, device=_trial_device(), store=store, save_state=save_state, load_state=load_state, checkpoint_every_s=spec.checkpoint_every_s
    )
    result = get_kind(chunk_.points[0].kind).run(chunk_, context)
    table = part_table(chunk_, result)
    metadata = {"phases.schema_version": SCHEMA_VERSION, "phases.chunk_id": chunk_.chunk_id, "phases.node_ip": _node_ip()}
    store.write_table(part_name(chunk_.chunk_id), table, metadata)
    tune.report({"done": 1, "points": len(chunk_.points)})


def _trial_device() -> str:
    import ray

    return "cuda" if ray.get_gpu_ids() else "cpu"


def _node_ip() -> str:
    """Return the address of the Ray node this trial runs on, recorded in its part file."""
    import ray

    return ray.util.get_node_ip_address()
