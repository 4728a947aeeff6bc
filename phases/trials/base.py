"""The interface every trial kind implements, and the context a trial writes through."""

from __future__ import annotations

import abc
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from pydantic import BaseModel

from phases.grid import Chunk
from phases.spec import PROTOCOLS, SweepSpec

logger = logging.getLogger(__name__)


@dataclass
class ChunkResult:
    """Result of a kind's training of one chunk.

    `trajectories` maps point_id to that point's columns (equal-length sequences, one entry per
    logged step). `summaries` maps point_id to the stationary summary of that point. `samples`
    maps point_id to rows of sample-quality metrics, one per sampling step count (remask only).
    """

    trajectories: dict[str, dict[str, Any]]
    summaries: dict[str, dict[str, Any]]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


@dataclass
class TrialContext:
    """Services a running kind may use. A kind never writes to storage or MLflow itself; it may
    read files the driver shared through `store` (the remask kind's base checkpoints).

    The checkpoint hooks are no-ops outside Ray Tune (tests and benchmarks call kinds directly).
    """

    spec: SweepSpec
    device: str = "cpu"
    store: Any = None  # the sweep's SweepStore, for kinds that read shared files from it (remask)
    save_state: Callable[[dict[str, np.ndarray], dict[str, Any]], None] | None = None
    load_state: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]] | None] | None = None
    checkpoint_every_s: float = 60.0
    _extra: dict[str, Any] = field(default_factory=dict)

    def checkpoint(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Save the kind's state so a retried trial continues from here."""
        if self.save_state is not None:
            self.save_state(arrays, meta)

    def restore(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """Return the last saved state of this trial, or None when it starts fresh."""
        return self.load_state() if self.load_state is not None else None


def train_with_checkpoints(population: Any, steps: int, block: int, context: TrialContext, label: str) -> None:
    """Advance a kind's population to `steps` in blocks, restoring its last checkpoint first and
    saving one every `context.checkpoint_every_s` seconds.

    population: has `step`, `advance(until)`, `state()` and `load(arrays, meta)`.
    """
    restored = context.restore()
    if restored is not None:
        population.load(*restored)
        logger.info("chunk %s: resumed from step %d", label, population.step)
    last_checkpoint = time.monotonic()
    while population.step < steps:
        population.advance(min(steps, population.step + block))
        if time.monotonic() - last_checkpoint > context.checkpoint_every_s and population.step < steps:
            context.checkpoint(*population.state())
            last_checkpoint = time.monotonic()


def write_state_dir(directory: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write a kind's state as `state.npz` (arrays, no pickles) and `state.json`."""
    np.savez(directory / "state.npz", **arrays)
    (directory / "state.json").write_text(json.dumps(meta))


def read_state_dir(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(directory / "state.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    return arrays, json.loads((directory / "state.json").read_text())


def new_state_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="phases-state-"))


class TrialKind(abc.ABC):
    """A kind of trial: its parameters, its axes per protocol, and how it trains a chunk."""

    name: str
    params_model: type[BaseModel]
    protocols: tuple[str, ...] = PROTOCOLS

    def validate_params(self, params: dict[str, Any]) -> BaseModel:
        """Return the kind's parameters as a model; raises pydantic.ValidationError."""
        return self.params_model.model_validate(params)

    @abc.abstractmethod
    def axes_for(self, protocol: str) -> tuple[str, ...]:
        """Axes a grid under `protocol` may sweep."""

    def required_axes(self, protocol: str) -> tuple[str, ...]:
        return ("lr",)

    def axis_defaults(self, protocol: str, params: BaseModel | None = None) -> dict[str, Any]:
        """Coordinates a point gets when its grid does not sweep that axis; `params` are the kind's."""
        return {}

    def check_inputs(self, spec: SweepSpec, store: Any = None) -> None:
        """Check what the spec points at outside itself (data files); raise ValueError naming the
        problem and the fix. Runs before any Ray work. `store` is the sweep's SweepStore, whose
        directory may not exist yet."""

    def preparation_notes(self, spec: SweepSpec, store: Any) -> list[str]:
        """Describe the work `prepare` will do, for `--dry-run`."""
        return []

    def prepare(self, spec: SweepSpec, store: Any, say: Callable[[str], None]) -> None:
        """Driver-side work done once per sweep before any trial starts, such as writing files the
        trials share into the sweep's storage. `say` prints a progress line."""

    @abc.abstractmethod
    def run(self, chunk: Chunk, context: TrialContext) -> ChunkResult:
        """Train every point of the chunk together and return trajectories and summaries."""

    @abc.abstractmethod
    def estimate_seconds(self, chunks: list[Chunk], spec: SweepSpec) -> float:
        """Estimate the single-core compute time of the chunks, for `--dry-run`."""
