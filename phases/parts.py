"""Part files: what one trial writes for its chunk, one row per point."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from phases.grid import Chunk
from phases.schema import PART_SCHEMA, QUALITY, TRAJECTORY
from phases.trials.base import ChunkResult


def part_table(chunk: Chunk, result: ChunkResult) -> pa.Table:
    """Build a chunk's part table: one row per point, with its trajectory and its sample quality as
    lists of structs. Sample quality has one entry per sampling step count, or none for kinds that
    do not sample."""
    rows: list[dict[str, Any]] = []
    for point in chunk.points:
        summary = result.summaries[point.point_id]
        columns = result.trajectories[point.point_id]
        length = len(columns["step"])
        trajectory = [
            {c.name: _clean(columns[c.name][i]) if c.name in columns else None for c in TRAJECTORY} for i in range(length)
        ]
        quality = [{c.name: _clean(entry.get(c.name)) for c in QUALITY} for entry in result.samples.get(point.point_id, [])]
        row = {**point.row(), **{k: _clean(v) for k, v in summary.items()}, "trajectory": trajectory, "sample_quality": quality}
        rows.append({field.name: row.get(field.name) for field in PART_SCHEMA})
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


def _clean(value: Any) -> Any:
    """Map numpy scalars to Python values and non-finite floats to None (a missing measurement)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
