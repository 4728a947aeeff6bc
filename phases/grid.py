"""Expand a spec into points and group the points into chunks (one Ray Tune trial each)."""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

from phases.spec import SweepSpec

# Coordinate columns every point carries; an axis a kind or protocol does not use is null.
COORDINATES = ("lr", "wd", "noise", "radius", "batch_size", "seed", "width")


@dataclass(frozen=True)
class Point:
    """One combination of axis values, with the settings it is trained under."""

    point_id: str
    kind: str
    protocol: str
    steps: int
    grid: int
    coords: dict[str, Any] = field(hash=False)

    def row(self) -> dict[str, Any]:
        """Return the point as a flat record of its identity and coordinates."""
        return {"point_id": self.point_id, "kind": self.kind, "protocol": self.protocol, **self.coords}


@dataclass(frozen=True)
class Chunk:
    """The points one trial trains together; all share protocol and step count."""

    chunk_id: str
    points: tuple[Point, ...]

    @property
    def protocol(self) -> str:
        return self.points[0].protocol

    @property
    def steps(self) -> int:
        return self.points[0].steps


def expand(spec: SweepSpec) -> list[Point]:
    """Return every point of every grid, in grid order, with stable ids.

    A point's id hashes everything that changes its result: kind, protocol, parameters, steps,
    replicas, window and entropy settings, and its coordinates. It does not depend on the sweep
    name, the chunking or the order of the grids.
    """
    from phases.trials import get_kind

    kind = get_kind(spec.kind)
    params = kind.validate_params(spec.params).model_dump(mode="json")
    shared = {
        "kind": spec.kind,
        "params": params,
        "replicas": spec.replicas,
        "stationary": spec.stationary.model_dump(mode="json"),
        "entropy": spec.entropy.model_dump(mode="json"),
    }
    points: list[Point] = []
    for index, grid in enumerate(spec.grids):
        steps = grid.steps or spec.steps
        defaults = kind.axis_defaults(grid.protocol, kind.validate_params(spec.params))
        names = list(grid.axes)
        for values in itertools.product(*(grid.axes[name] for name in names)):
            coords: dict[str, Any] = {name: None for name in COORDINATES}
            coords.update(defaults)
            coords.update(dict(zip(names, values)))
            # A null width is left out of the hash, so kinds without a width keep their earlier ids.
            hashed = {k: v for k, v in coords.items() if not (k == "width" and v is None)}
            identity = {**shared, "protocol": grid.protocol, "steps": steps, "coords": hashed}
            digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
            points.append(Point(digest[:16], spec.kind, grid.protocol, steps, index, coords))
    return points


def chunk(points: list[Point], chunk_size: int) -> list[Chunk]:
    """Group points into chunks of at most `chunk_size` that share protocol and step count.

    Chunk ids hash their point ids, so the same spec and chunk size give the same chunks, which
    is what resume relies on.
    """
    groups: dict[tuple[int, str, int], list[Point]] = {}
    for point in points:
        groups.setdefault((point.grid, point.protocol, point.steps), []).append(point)

    chunks: list[Chunk] = []
    for (grid, protocol, _), members in groups.items():
        for start in range(0, len(members), chunk_size):
            part = tuple(members[start : start + chunk_size])
            digest = hashlib.sha256("".join(p.point_id for p in part).encode()).hexdigest()[:10]
            chunks.append(Chunk(f"g{grid}-{protocol}-{start // chunk_size:04d}-{digest}", part))
    return chunks
