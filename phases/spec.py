"""Search-space files: YAML in, a typed and validated `SweepSpec` out.

A spec names a trial kind, its fixed parameters, the run length and one or more grids. Each grid
has one protocol and the axes swept under it. Axis values are a list, or a range written as
``{log: [start, stop, num]}`` (log-spaced, inclusive) or ``{lin: [start, stop, num]}``.

Every problem is reported as a `SpecError` that names the file, the field path (``grids[0].axes.lr``),
the bad value and what is allowed, before any Ray work starts.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROTOCOLS = ("sphere", "elr", "lr")  # the thermodynamic kinds' protocols
# Every protocol some kind accepts; `_check_kind` checks a grid's protocol against its kind's list.
ALL_PROTOCOLS = PROTOCOLS + ("adamw",)

# Axes every kind understands, with the check each value must pass.
AXIS_RULES: dict[str, tuple[str, Any]] = {
    "lr": ("must be > 0", lambda v: v > 0),
    "wd": ("must be >= 0", lambda v: v >= 0),
    "noise": ("must be >= 0", lambda v: v >= 0),
    "radius": ("must be > 0", lambda v: v > 0),
    "batch_size": ("must be an integer >= 1", lambda v: float(v).is_integer() and v >= 1),
    "seed": ("must be an integer >= 0", lambda v: float(v).is_integer() and v >= 0),
    "width": ("must be an integer >= 1", lambda v: float(v).is_integer() and v >= 1),
}
INTEGER_AXES = ("batch_size", "seed", "width")


class SpecError(ValueError):
    """A search-space file that cannot be run; the message names file, field and fix."""

    def __init__(self, source: str, path: str, message: str):
        self.source = source
        self.path = path
        super().__init__(f"{source}: {path}: {message}" if path else f"{source}: {message}")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LogSchedule(_Model):
    """When trajectories are logged: log-spaced steps plus evenly spaced steps."""

    points: int = Field(60, ge=2, description="log-spaced logging steps between step 1 and the last step")
    linear: int = Field(20, ge=0, description="extra evenly spaced logging steps over the whole run")


class StationarySettings(_Model):
    """The window over which stationary averages are taken."""

    start: float = Field(0.5, gt=0, lt=1, description="window start as a fraction of the run's steps")


class EntropySettings(_Model):
    """The k-nearest-neighbour entropy estimate from the ensemble of replicas."""

    k: int = Field(1, ge=1, description="neighbour order of the Kozachenko-Leonenko estimator")
    snapshots: int = Field(8, ge=1, description="ensemble snapshots per replica, evenly spaced over the window")
    trajectory: bool = Field(False, description="also estimate the ensemble's entropy at every logging step")


class AnalysisSettings(_Model):
    """Thresholds of the analysis; the defaults are documented in docs/analysis.md."""

    temperature_half_width: float | None = Field(
        None, ge=0, description="smoothing half-width in ln(lr) for free-energy temperatures; null: two grid spacings"
    )
    temperature_slack: float = Field(0.0, ge=0, description="slack epsilon (loss units) of F_i <= F_j + epsilon")
    stationarity_tolerance: float = Field(0.02, gt=0, description="largest accepted relative change across a stationary window")
    stationarity_alpha: float = Field(0.01, gt=0, lt=1, description="significance level of the trend test")


class Resources(_Model):
    """Ray resources requested by one trial (one chunk)."""

    cpu: float = Field(1.0, gt=0, description="CPUs per trial")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; a fraction shares one GPU")


class Grid(_Model):
    """One protocol with the axes swept under it."""

    protocol: str = Field(description="sphere, elr or lr; adamw for the remask kind")
    axes: dict[str, list[float]] = Field(description="axis name -> values")
    steps: int | None = Field(None, ge=1, description="overrides the spec's steps for this grid")

    @field_validator("protocol")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        if value not in ALL_PROTOCOLS:
            raise ValueError(f"unknown protocol {value!r}; allowed: {', '.join(ALL_PROTOCOLS)}")
        return value


class SweepSpec(_Model):
    """A validated search space: what to train, for how long, over which grids."""

    name: str = Field(description="sweep name; the sweep directory is <storage>/<name>")
    kind: str = Field(description="trial kind, for example isotropic")
    params: dict[str, Any] = Field(default_factory=dict, description="fixed parameters of the kind")
    steps: int = Field(ge=1, description="SGD steps per point")
    replicas: int = Field(64, ge=1, description="independent chains per point")
    log: LogSchedule = LogSchedule()
    stationary: StationarySettings = StationarySettings()
    entropy: EntropySettings = EntropySettings()
    analysis: AnalysisSettings = AnalysisSettings()
    chunk_size: int = Field(32, ge=1, description="points per Ray Tune trial")
    resources: Resources = Resources()
    max_failures: int = Field(2, ge=0, description="retries of a failed trial before it is recorded as failed")
    checkpoint_every_s: float = Field(60.0, gt=0, description="seconds between checkpoints of a running trial")
    grids: list[Grid] = Field(min_length=1, description="grids, one protocol each")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")
        if not value or not set(value) <= allowed or value.startswith("."):
            raise ValueError(f"invalid sweep name {value!r}; use letters, digits, '_', '-' and '.'")
        return value

    @model_validator(mode="after")
    def _enough_entropy_samples(self) -> "SweepSpec":
        samples = self.replicas * self.entropy.snapshots
        if samples < self.entropy.k + 2:
            raise ValueError(
                f"replicas x entropy.snapshots = {samples} samples is too few for the k = {self.entropy.k} "
                f"nearest-neighbour estimator; raise replicas or entropy.snapshots to at least {self.entropy.k + 2} samples"
            )
        return self

    def resolved(self) -> dict[str, Any]:
        """Return the spec as plain data, ranges expanded, as it is saved next to the run."""
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """Return a hash of everything that changes the results (the name excluded)."""
        data = self.resolved()
        data.pop("name")
        data.pop("resources")
        data.pop("max_failures")
        data.pop("checkpoint_every_s")
        data.pop("analysis")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def load(source: str | Path | dict[str, Any], name: str | None = None) -> SweepSpec:
    """Parse and validate a spec from a YAML path, YAML text or a dict.

    Raises SpecError, naming the field path, the bad value and the allowed values.
    """
    label, raw = _read_raw(source)
    if not isinstance(raw, dict):
        raise SpecError(label, "", f"the file must contain a mapping of fields, got {type(raw).__name__}")
    raw = dict(raw)
    if name is not None:
        raw["name"] = name
    elif "name" not in raw and isinstance(source, (str, Path)) and Path(str(source)).suffix in (".yaml", ".yml"):
        raw["name"] = Path(str(source)).stem
    raw["grids"], grid_sources = _normalise_grids(label, raw)

    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(first["loc"])
        if len(loc) > 1 and loc[0] == "grids" and isinstance(loc[1], int):
            loc = ("grids", grid_sources[loc[1]], *loc[2:])  # index in the file, before protocol lists expand
        path = _format_location(loc)
        message = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        if first["type"] == "extra_forbidden":
            allowed = _allowed_fields_at(first["loc"])
            message = f"unknown field {first['loc'][-1]!r}; allowed fields: {allowed}"
        elif first["type"] == "missing":
            message = "required field is missing"
        elif value is not None and not isinstance(value, (dict, list)):
            message = f"{message} (got {value!r})"
        raise SpecError(label, path, message) from None

    _check_kind(label, spec, grid_sources)
    return spec


def _read_raw(source: str | Path | dict[str, Any]) -> tuple[str, Any]:
    if isinstance(source, dict):
        return "<dict>", source
    text = str(source)
    # A single line without a colon in its last path component cannot be a YAML mapping: a path.
    is_path = isinstance(source, Path) or ("\n" not in text and ":" not in text.split("/")[-1])
    if is_path:
        path = Path(text)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SpecError(str(path), "", "file not found; check the path to the search-space YAML") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpecError(str(path), "", f"cannot read the file: {exc}") from None
        label = str(path)
    else:
        label = "<yaml text>"
    try:
        return label, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(label, "", f"YAML syntax error at {where}: {problem}") from None


def _normalise_grids(label: str, raw: dict[str, Any]) -> tuple[list[dict[str, Any]], list[int]]:
    """Accept a top-level `protocol` + `axes` shorthand, and a list of protocols per grid.

    Returns the grids with one protocol each and, for each, its index in the file.
    """
    if "grids" in raw and ("axes" in raw or "protocol" in raw):
        raise SpecError(label, "grids", "give either `grids` or a top-level `protocol` with `axes`, not both")
    if "grids" not in raw:
        if "axes" not in raw:
            raise SpecError(label, "grids", "required field is missing; add `grids:` (or `protocol:` and `axes:`)")
        raw["grids"] = [{"protocol": raw.pop("protocol", None), "axes": raw.pop("axes")}]
    grids = raw["grids"]
    if not isinstance(grids, list) or not grids:
        raise SpecError(label, "grids", "must be a non-empty list of grids")

    expanded: list[dict[str, Any]] = []
    sources: list[int] = []
    for index, grid in enumerate(grids):
        where = f"grids[{index}]"
        if not isinstance(grid, dict):
            raise SpecError(label, where, "each grid must be a mapping with `protocol` and `axes`")
        grid = dict(grid)
        if grid.get("protocol") is None:
            raise SpecError(label, f"{where}.protocol", f"required field is missing; allowed: {', '.join(ALL_PROTOCOLS)}")
        axes = grid.get("axes")
        if not isinstance(axes, dict) or not axes:
            raise SpecError(label, f"{where}.axes", "must be a non-empty mapping of axis name to values")
        grid["axes"] = {name: _expand_axis(label, f"{where}.axes.{name}", name, values) for name, values in axes.items()}
        protocols = grid["protocol"] if isinstance(grid["protocol"], list) else [grid["protocol"]]
        for protocol in protocols:
            expanded.append({**grid, "protocol": protocol})
            sources.append(index)
    return expanded, sources


def _expand_axis(label: str, path: str, name: str, values: Any) -> list[float]:
    if isinstance(values, dict):
        if len(values) != 1 or next(iter(values)) not in ("log", "lin"):
            raise SpecError(label, path, f"a range must be {{log: [start, stop, num]}} or {{lin: [start, stop, num]}}, got {values!r}")
        scale, args = next(iter(values.items()))
        if not isinstance(args, list) or len(args) != 3 or not all(_is_number(a) for a in args):
            raise SpecError(label, path, f"{scale} range needs [start, stop, num], got {args!r}")
        start, stop, num = args
        if not float(num).is_integer() or num < 1:
            raise SpecError(label, path, f"num must be a whole number >= 1, got {num!r}; an empty grid cannot run")
        if scale == "log":
            if start <= 0 or stop <= 0:
                raise SpecError(label, path, f"log range bounds must be > 0, got [{start}, {stop}]")
            values = np.geomspace(start, stop, int(num)).tolist()
        else:
            values = np.linspace(start, stop, int(num)).tolist()
    elif _is_number(values):
        values = [values]
    if not isinstance(values, list):
        raise SpecError(label, path, f"must be a list of numbers or a log/lin range, got {values!r}")
    if not values:
        raise SpecError(label, path, "empty axis: an empty grid cannot run; give at least one value")
    for value in values:
        if not _is_number(value) or not math.isfinite(value):
            hint = ""
            if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?e\d+", value.strip(), flags=re.IGNORECASE):
                # YAML 1.1 reads 1.0e4 as text; it needs a sign in the exponent to be a number.
                hint = f" (YAML reads it as text: write {value.lower().replace('e', 'e+')})"
            raise SpecError(label, path, f"invalid value {value!r}; axis values must be finite numbers{hint}")
    if name in AXIS_RULES:
        rule, check = AXIS_RULES[name]
        for value in values:
            if not check(value):
                raise SpecError(label, path, f"invalid value {value!r}: {name} {rule}")
    if len(set(values)) != len(values):
        raise SpecError(label, path, f"duplicate values in {values!r}; each grid value must appear once")
    return [int(v) if name in INTEGER_AXES else float(v) for v in values]


def _check_kind(label: str, spec: SweepSpec, grid_sources: list[int]) -> None:
    from phases.trials import get_kind, kind_names

    try:
        kind = get_kind(spec.kind)
    except KeyError:
        raise SpecError(label, "kind", f"unknown kind {spec.kind!r}; allowed: {', '.join(kind_names())}") from None
    try:
        kind.validate_params(spec.params)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = "params" + ("." + _format_location(first["loc"]) if first["loc"] else "")
        message = first["msg"].removeprefix("Value error, ")
        value = first.get("input")
        if first["type"] == "extra_forbidden":
            message = f"unknown parameter {first['loc'][-1]!r} for kind {spec.kind!r}; allowed: {', '.join(kind.params_model.model_fields)}"
        elif first["loc"] and value is not None and not isinstance(value, (dict, list)):
            message = f"{message} (got {value!r})"
        raise SpecError(label, path, message) from None

    for expanded_index, grid in enumerate(spec.grids):
        index = grid_sources[expanded_index]
        if grid.protocol not in kind.protocols:
            raise SpecError(
                label,
                f"grids[{index}].protocol",
                f"protocol {grid.protocol!r} is not valid for kind {spec.kind!r}; allowed: {', '.join(kind.protocols)}",
            )
        allowed = kind.axes_for(grid.protocol)
        for axis in grid.axes:
            if axis not in allowed:
                raise SpecError(
                    label,
                    f"grids[{index}].axes.{axis}",
                    f"axis {axis!r} is not valid for kind {spec.kind!r} with protocol {grid.protocol!r}; allowed axes: {', '.join(allowed)}",
                )
        for axis in kind.required_axes(grid.protocol):
            if axis not in grid.axes:
                raise SpecError(label, f"grids[{index}].axes", f"axis {axis!r} is required for protocol {grid.protocol!r}")


def _format_location(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _allowed_fields_at(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = SweepSpec
    for item in loc[:-1]:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(str(item))
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif item == "grids":
            model = Grid
    return ", ".join(model.model_fields)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

