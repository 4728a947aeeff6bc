"""Run a sweep: chunks as Ray Tune trials, then compaction, analysis and MLflow tracking.

One trial per chunk, FIFO scheduling (every point gets the same budget), bounded concurrency and
retries through `tune.FailureConfig`. A trial writes `parts/<chunk_id>.parquet` atomically. A chunk
whose part file exists is done, so re-running the same spec into the same directory (or
`--resume`) runs only the missing chunks.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from phases import __version__
from phases.grid import Chunk, Point, chunk, expand
from phases.results import analyse, compact, write_tables
from phases.runtime import apply_environment_defaults, check_ray_address, start_ray, stop_ray
from phases.spec import SpecError, SweepSpec, load
from phases.storage import SweepStore
from phases.trial_runner import train_chunk
from phases.trials import get_kind

logger = logging.getLogger(__name__)


class SweepError(RuntimeError):
    """A sweep that cannot start or continue. The message explains what to do next."""


@dataclass
class SweepPlan:
    """A spec expanded into points and chunks, bound to its directory."""

    spec: SweepSpec
    store: SweepStore
    points: list[Point]
    chunks: list[Chunk]

    @property
    def chunk_ids(self) -> list[str]:
        return [c.chunk_id for c in self.chunks]


@dataclass
class SweepResult:
    """Outcome of `run_sweep`: the sweep directory, failures, fits and the MLflow run."""

    path: str
    n_points: int
    n_chunks: int
    chunks_run: int
    failed_chunks: dict[str, str] = field(default_factory=dict)
    missing_points: list[str] = field(default_factory=list)
    fits: dict[str, Any] = field(default_factory=dict)
    tracking_uri: str | None = None
    tracking_error: str | None = None
    parent_run_id: str | None = None
    elapsed_s: float = 0.0


def plan_sweep(spec_or_path: SweepSpec | str | Path | dict, *, name: str | None = None, storage: str | Path = "runs") -> SweepPlan:
    """Validate the spec and expand it into points and chunks; starts nothing."""
    spec = spec_or_path if isinstance(spec_or_path, SweepSpec) else load(spec_or_path, name=name)
    if name is not None and spec.name != name:
        spec = spec.model_copy(update={"name": name})
    points = expand(spec)
    store = SweepStore(storage, spec.name)
    try:
        get_kind(spec.kind).check_inputs(spec, store)
    except (ValueError, FileNotFoundError) as error:
        raise SpecError(str(spec_or_path) if isinstance(spec_or_path, (str, Path)) else spec.name, "params", str(error)) from None
    return SweepPlan(spec, store, points, chunk(points, spec.chunk_size))


def run_sweep(
    spec_or_path: SweepSpec | str | Path | dict,
    *,
    name: str | None = None,
    storage: str | Path = "runs",
    address: str | None = None,
    tracking_uri: str | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
    track: bool = True,
    console: Console | None = None,
) -> SweepResult:
    """Run a sweep end to end and return where its results are.

    spec_or_path: a `SweepSpec`, a YAML path, YAML text or a dict. storage: a local folder or a
    `pyarrow.fs` URI; the sweep directory is `<storage>/<name>`. address: a Ray cluster to attach to
    (default: RAY_ADDRESS, else an embedded local Ray). tracking_uri: MLflow tracking URI (default:
    MLFLOW_TRACKING_URI, else `sqlite:///<storage>/mlflow.db` for local storage). resume: require an
    existing sweep directory and run only its missing chunks.

    Raises SpecError for an invalid spec, and SweepError for a directory that contains another sweep
    or an unreachable --address, all before any Ray work starts.
    """
    apply_environment_defaults()
    console = console or Console(stderr=True)
    started = time.monotonic()
    plan = plan_sweep(spec_or_path, name=name, storage=storage)
    try:
        check_ray_address(address)
    except ConnectionError as error:
        raise SweepError(str(error)) from None
    prepare_directory(plan, resume=resume)

    done = set(plan.store.list_parts()) & set(plan.chunk_ids)
    missing = [c for c in plan.chunks if c.chunk_id not in done]
    console.print(
        f"[bold]sweep[/] {plan.spec.name}: {len(plan.points)} points in {len(plan.chunks)} chunks ({len(done)} already done)"
    )
    console.print(f"directory: {plan.store.uri}", soft_wrap=True)

    errors: dict[str, str] = {}
    if missing:
        get_kind(plan.spec.kind).prepare(plan.spec, plan.store, lambda message: console.print(message, markup=False, highlight=False))
        ray_started = start_ray(address)
        try:
            errors = run_chunks(plan, missing, already_done=len(done), max_concurrent=max_concurrent, console=console)
        finally:
            if ray_started:
                stop_ray()

    result = finish_sweep(plan, errors, console=console, track=track, tracking_uri=tracking_uri)
    result.chunks_run = len(missing)
    result.elapsed_s = time.monotonic() - started
    return result


def prepare_directory(plan: SweepPlan, *, resume: bool) -> None:
    """Create the sweep directory, or check that an existing one contains this same sweep."""
    store = plan.store
    digest = plan.spec.digest()
    if store.exists("sweep.json"):
        existing = store.read_json("sweep.json")
        if existing.get("spec_digest") != digest:
            raise SweepError(
                f"{store.uri} already contains sweep {existing.get('name')!r} with other settings "
                f"(spec digest {existing.get('spec_digest')} here, {digest} requested); "
                "choose another --name or --storage, or delete that directory"
            )
    elif resume:
        raise SweepError(f"nothing to resume: {store.uri} contains no sweep; run without --resume to start it")
    else:
        store.makedirs()
        store.write_json(
            "sweep.json",
            {"name": plan.spec.name, "spec_digest": digest, "uid": f"{plan.spec.name}-{digest}-{int(time.time())}",
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "version": __version__},
        )
    store.write_text("spec.yaml", yaml.safe_dump(plan.spec.resolved(), sort_keys=False))
    removed = store.remove_stale_temporaries()
    if removed:
        logger.info("removed %d temporary files left by an interrupted run", removed)


def run_chunks(
    plan: SweepPlan, chunks: list[Chunk], *, already_done: int, max_concurrent: int | None, console: Console
) -> dict[str, str]:
    """Run chunks as Ray Tune trials; returns {chunk_id: error} for trials that failed for good."""
    from ray import tune

    from phases.progress import ProgressCallback, forget_progress

    spec = plan.spec
    payload = {"storage": plan.store.storage, "name": plan.store.name, "spec": spec.resolved(), "chunks": {c.chunk_id: c for c in chunks}}
    trainable = tune.with_resources(
        tune.with_parameters(train_chunk, payload=payload),
        {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu},
    )
    storage_path = str(plan.store.local_path("ray")) if plan.store.is_local else f"{plan.store.uri}/ray"

    with _progress(console) as progress:
        task = progress.add_task("chunks", total=len(plan.chunks), completed=already_done)
        callback = ProgressCallback(progress, task)  # imported here: it imports ray.tune
        tuner = tune.Tuner(
            trainable,
            param_space={"chunk_id": tune.grid_search([c.chunk_id for c in chunks])},
            tune_config=tune.TuneConfig(
                max_concurrent_trials=max_concurrent,
                reuse_actors=True,
                trial_name_creator=trial_name,
                trial_dirname_creator=trial_name,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=storage_path,
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                callbacks=[callback],
                verbose=0,
            ),
        )
        try:
            grid = tuner.fit()
        finally:
            forget_progress(callback)

    errors: dict[str, str] = {}
    for result in grid:
        if result.error is not None:
            chunk_id = (result.config or {}).get("chunk_id", "?")
            errors[chunk_id] = describe_error(result.error)
            logger.error("chunk %s failed after %d retries: %s", chunk_id, spec.max_failures, errors[chunk_id])
    return errors


ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


def describe_error(error: BaseException) -> str:
    """Return a one-line description of a trial's error: the original exception inside Ray's
    wrapper (RayTaskError keeps it as `cause`), without terminal colour codes."""
    cause = getattr(error, "cause", None) or error
    text = ANSI_CODES.sub("", f"{type(cause).__name__}: {cause}")
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else type(cause).__name__)[:500]


def trial_name(trial: Any) -> str:
    return str(trial.config["chunk_id"])


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("elapsed"),
        TimeElapsedColumn(),
        TextColumn("remaining"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def finish_sweep(
    plan: SweepPlan, errors: dict[str, str], *, console: Console, track: bool, tracking_uri: str | None
) -> SweepResult:
    """Compact the parts, run the analysis, log to MLflow and report what is missing."""
    store = plan.store
    finished = set(store.list_parts())
    failed = {c.chunk_id: errors.get(c.chunk_id, "no part file was written") for c in plan.chunks if c.chunk_id not in finished}
    missing_points = [p.point_id for c in plan.chunks if c.chunk_id in failed for p in c.points]
    store.write_json("failures.json", {"failed_chunks": failed, "missing_points": missing_points})

    trajectories, summaries, samples = compact(store, [c for c in plan.chunk_ids if c in finished])
    write_tables(store, trajectories, samples if plan.spec.kind == "remask" else None)
    fits = analyse(store, summaries, plan.spec.resolved(), __version__, trajectories)

    result = SweepResult(store.uri, len(plan.points), len(plan.chunks), 0, failed, missing_points, fits)
    if track:
        _track(store, result, tracking_uri, console)
    return result


def _track(store: SweepStore, result: SweepResult, tracking_uri: str | None, console: Console) -> None:
    from phases.tracking import TrackingError, default_tracking_uri, log_sweep

    uri = tracking_uri or default_tracking_uri(store)
    result.tracking_uri = uri
    if uri is None:
        result.tracking_error = "no tracking URI: storage is remote; pass --tracking-uri"
        return
    try:
        report = log_sweep(store, uri)
        result.parent_run_id = report.parent_run_id
    except TrackingError as exc:
        result.tracking_error = str(exc)
        logger.warning("MLflow logging to %s failed: %s", uri, exc)
