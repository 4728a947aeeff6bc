"""Command line: `phases sweep`, `submit`, `jobs`, `fit`, `track`, `export-optuna`, `recommend`,
`evaluate-schedule` and `mdm`. A thin layer over the Python API."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from phases.runtime import apply_environment_defaults

apply_environment_defaults()

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Phase diagrams of SGD training on Ray Tune.")
console = Console(stderr=True)
out = Console()


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages from phases.")] = False) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("phases").setLevel(logging.DEBUG if verbose else logging.INFO)


@app.command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="Search-space YAML file.")],
    name: Annotated[Optional[str], typer.Option(help="Sweep name; the directory is STORAGE/NAME. Default: the spec's name.")] = None,
    storage: Annotated[str, typer.Option(help="Folder or pyarrow.fs URI (file://, s3://, gs://) that contains sweep directories.")] = "runs",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address to attach to (default: RAY_ADDRESS, else a local Ray on 127.0.0.1).")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///STORAGE/mlflow.db).")] = None,
    max_concurrent: Annotated[Optional[int], typer.Option(min=1, help="Maximum number of trials (chunks) running at once. Default: as many as the CPUs allow.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an existing sweep directory; run only chunks without a part file.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print points, chunks and a cost estimate; start nothing.")] = False,
    track: Annotated[bool, typer.Option(help="Log the finished sweep to MLflow.")] = True,
) -> None:
    """Run a sweep: every chunk of points as a Ray Tune trial, then analysis and MLflow logging."""
    from phases.spec import SpecError
    from phases.sweep import SweepError, plan_sweep, run_sweep

    try:
        plan = plan_sweep(spec, name=name, storage=storage)
        if dry_run:
            _print_dry_run(plan)
            return
        if track:
            _warn_if_tracking_unreachable(plan.store, tracking_uri)
        result = run_sweep(
            plan.spec, storage=storage, address=address, tracking_uri=tracking_uri,
            max_concurrent=max_concurrent, resume=resume, track=track, console=console,
        )
    except (SpecError, SweepError) as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None
    _print_result(result)
    if result.failed_chunks:
        raise typer.Exit(1)


@app.command()
def fit(
    path: Annotated[str, typer.Argument(help="Sweep directory, a .csv or .parquet log file, or mlflow://EXPERIMENT.")],
    output: Annotated[Optional[str], typer.Option("--out", help="Output directory for logs (default: runs/<file stem or experiment>). Ignored for a sweep directory.")] = None,
    dim: Annotated[Optional[int], typer.Option(min=2, help="Number of scale-invariant parameters d, when the logs have no dim column.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI for mlflow://EXPERIMENT.")] = None,
    slack: Annotated[float, typer.Option(min=0.0, help="Logs only: slack epsilon of the free-energy temperature, in loss units.")] = 0.0,
    half_width: Annotated[Optional[float], typer.Option(min=0.0, help="Logs only: smoothing half-width in ln(lr) for free-energy temperatures (default: two grid spacings).")] = None,
) -> None:
    """Fit the phase diagram: re-run the analysis of a sweep, or analyse someone else's training logs.

    Logs need the columns lr, wd, step, loss and weight_norm; see docs/analysis.md for the optional ones.
    """
    from phases.storage import SweepStore

    store = SweepStore.from_sweep_dir(path) if "://" not in path or path.startswith("file://") else None
    if store is not None and store.exists("spec.yaml") and store.exists("parts"):
        _refit_sweep(store)
        return
    is_log_file = Path(path).suffix.lower() in (".csv", ".parquet", ".pq")
    if not (path.startswith("mlflow://") or is_log_file):
        console.print(f"[red]error:[/] {path}: not a sweep directory (spec.yaml not found), a .csv or .parquet log file, or mlflow://EXPERIMENT")
        raise typer.Exit(2)

    from phases.external import fit_external

    target = output or str(Path("runs") / (Path(path).stem if is_log_file else path.removeprefix("mlflow://")))
    try:
        settings = {"temperature_slack": slack, "temperature_half_width": half_width}
        written, fits, notes = fit_external(path, target, dim=dim, tracking_uri=tracking_uri, analysis=settings)
    except ValueError as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None
    _print_fits(fits)
    for note in notes:
        console.print(f"[yellow]skipped:[/] {note}")
    out.print(f"analysis written to {written.uri}")


def _refit_sweep(store: Any) -> None:
    import yaml

    from phases import __version__
    from phases.results import analyse, compact, write_tables

    parts = store.list_parts()
    if not parts:
        console.print(f"[red]error:[/] {store.uri}/parts contains no finished chunks; run `phases sweep` first")
        raise typer.Exit(2)
    spec = yaml.safe_load(store.read_text("spec.yaml"))
    trajectories, summaries, samples = compact(store, parts)
    write_tables(store, trajectories, samples if spec.get("kind") == "remask" else None)
    fits = analyse(store, summaries, spec, __version__, trajectories)
    _print_fits(fits)
    out.print(f"analysis written to {store.uri}")


@app.command()
def track(
    sweep_dir: Annotated[str, typer.Argument(help="Finished sweep directory (local path or URI).")],
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db).")] = None,
) -> None:
    """Log a finished sweep to MLflow; runs already logged are not duplicated."""
    from phases.storage import SweepStore
    from phases.tracking import TrackingError, default_tracking_uri, log_sweep

    store = SweepStore.from_sweep_dir(sweep_dir)
    if not store.exists():
        console.print(f"[red]error:[/] sweep directory {store.uri} not found; check the path (it is <storage>/<name>)")
        raise typer.Exit(2)
    if not store.exists("diagram.parquet"):
        console.print(f"[red]error:[/] {store.uri}/diagram.parquet not found; finish the sweep or run `phases fit {sweep_dir}` first")
        raise typer.Exit(2)
    uri = tracking_uri or default_tracking_uri(store)
    if uri is None:
        console.print("[red]error:[/] no tracking URI for remote storage; pass --tracking-uri")
        raise typer.Exit(2)
    try:
        report = log_sweep(store, uri)
    except TrackingError as exc:
        console.print(f"[red]error:[/] MLflow logging to {uri} failed: {_escape(str(exc))}")
        raise typer.Exit(1) from None
    out.print(
        f"MLflow {uri}: parent run {report.parent_run_id}; {report.children_created} nested runs created, "
        f"{report.children_existing} already present"
    )


@app.command()
def submit(
    spec: Annotated[Path, typer.Argument(help="Search-space YAML file.")],
    address: Annotated[str, typer.Option(help="Ray Jobs API of the cluster: the dashboard address, http://HEAD:8265.")],
    storage: Annotated[str, typer.Option(help="Storage every node can reach: a shared path or a pyarrow.fs URI (s3://, gs://).")] = "runs",
    name: Annotated[Optional[str], typer.Option(help="Sweep name; the directory is STORAGE/NAME. Default: the spec's name.")] = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI as the cluster sees it (default on the cluster: sqlite:///STORAGE/mlflow.db).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the sweep directory of an earlier job; run only chunks without a part file.")] = False,
    track: Annotated[bool, typer.Option(help="Log the finished sweep to MLflow.")] = True,
    pip: Annotated[bool, typer.Option(help="Install the project's dependencies into the job's environment (for clusters without them).")] = False,
    job_id: Annotated[Optional[str], typer.Option(help="Submission id for the job (default: one Ray makes up).")] = None,
) -> None:
    """Submit a sweep to a Ray cluster as a Ray Job and print the job id."""
    from phases.jobs import JobError
    from phases.jobs import submit as submit_job
    from phases.spec import SpecError

    try:
        submission = submit_job(spec, address, storage=storage, name=name, resume=resume, tracking_uri=tracking_uri,
                                track=track, pip=pip, job_id=job_id)
    except (SpecError, JobError) as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None
    console.print(f"submitted to {address}: {submission.entrypoint}", soft_wrap=True)
    console.print(f"follow it with: phases jobs logs {submission.job_id} --address {address}", soft_wrap=True)
    out.print(submission.job_id)


jobs_app = typer.Typer(no_args_is_help=True, help="Follow or stop sweeps submitted with `phases submit`.")
app.add_typer(jobs_app, name="jobs")
JobAddress = Annotated[str, typer.Option(help="Ray Jobs API of the cluster, http://HEAD:8265 (default: RAY_ADDRESS).", envvar="RAY_ADDRESS")]


@jobs_app.command("status")
def jobs_status(job_id: Annotated[str, typer.Argument(help="Job id printed by `phases submit`.")], address: JobAddress) -> None:
    """Print the job's status (PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED) and message."""
    from phases.jobs import status

    info = _job_request(status, address, job_id)
    out.print(f"{info['job_id']}: {info['status']}" + (f" ({_escape(info['message'])})" if info["message"] else ""))


@jobs_app.command("logs")
def jobs_logs(job_id: Annotated[str, typer.Argument(help="Job id printed by `phases submit`.")], address: JobAddress) -> None:
    """Print the output of the job's driver so far."""
    from phases.jobs import logs

    sys.stdout.write(_job_request(logs, address, job_id))


@jobs_app.command("stop")
def jobs_stop(job_id: Annotated[str, typer.Argument(help="Job id printed by `phases submit`.")], address: JobAddress) -> None:
    """Stop a running job; its finished chunks stay, and `phases submit --resume` continues it."""
    from phases.jobs import stop

    stopped = _job_request(stop, address, job_id)
    out.print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")


def _job_request(request: Any, address: str, job_id: str) -> Any:
    """Call a `phases.jobs` request; a JobError becomes an error line and exit code 2."""
    from phases.jobs import JobError

    try:
        return request(address, job_id)
    except JobError as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None


@app.command("export-optuna")
def export_optuna(
    sweep_dir: Annotated[str, typer.Argument(help="Finished sweep directory (local path or URI).")],
    storage: Annotated[str, typer.Option(help="Optuna storage URL, for example sqlite:///study.db.")] = "sqlite:///phases-optuna.db",
    overwrite: Annotated[bool, typer.Option(help="Replace studies of the same name.")] = False,
) -> None:
    """Write each (protocol, noise) slice of a phase diagram as an Optuna study (value: stationary loss U)."""
    import polars as pl

    from phases.optuna_export import export_to_optuna
    from phases.storage import SweepStore

    store = SweepStore.from_sweep_dir(sweep_dir)
    if not store.exists("diagram.parquet"):
        console.print(f"[red]error:[/] {store.uri}/diagram.parquet not found; finish the sweep or run `phases fit {sweep_dir}` first")
        raise typer.Exit(2)
    try:
        report = export_to_optuna(pl.from_arrow(store.read_table("diagram.parquet")), store.name, storage, overwrite=overwrite)
    except ValueError as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None
    for name, count in report.studies.items():
        out.print(f"study {name}: {count} trials")
    out.print(f"Optuna storage: {storage} (view with optuna-dashboard {storage})")


StepsOption = Annotated[Optional[int], typer.Option(min=1, help="Step budget of the schedule (default: the sweep's steps).")]
WdOption = Annotated[Optional[float], typer.Option("--wd", help="Weight decay of the diagram line to use (default: the best line).")]
NoiseOption = Annotated[Optional[float], typer.Option("--noise", help="Injected noise of the diagram slice (default: the value with the most points).")]
TargetOption = Annotated[Optional[float], typer.Option("--target-loss", help="Stop cooling at the lr whose predicted stationary loss is this.")]
EFoldsOption = Annotated[Optional[float], typer.Option("--e-folds", min=0.01, help="Radius e-folding times, 1/(4 lr wd) steps each, that every cooling stage gets (default 1).")]


def _recommendation(diagram_path: str, steps: int | None, wd: float | None, noise: float | None, target_loss: float | None, e_folds: float | None):
    from analysis.recommend import load_diagram, recommend

    try:
        diagram, spec = load_diagram(diagram_path)
        budget = steps or int(spec.get("steps") or 0)
        if not budget:
            raise ValueError(f"{diagram_path} has no spec with a step count; pass --steps")
        options = {} if e_folds is None else {"e_folds": e_folds}
        return recommend(diagram, steps=budget, wd=wd, noise=noise, target_loss=target_loss, **options), diagram, spec
    except ValueError as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None


@app.command("recommend")
def recommend_command(
    diagram: Annotated[str, typer.Argument(help="Sweep directory or its diagram.parquet.")],
    steps: StepsOption = None,
    wd: WdOption = None,
    noise: NoiseOption = None,
    target_loss: TargetOption = None,
    e_folds: EFoldsOption = None,
    output_format: Annotated[str, typer.Option("--format", help="table, json or yaml.")] = "table",
    output: Annotated[Optional[Path], typer.Option("--out", help="Also write the recommendation to this file (JSON, or YAML for .yaml/.yml).")] = None,
) -> None:
    """Recommend a learning-rate schedule (stages of step, lr, wd) from a phase diagram; see docs/recommendations.md."""
    import json

    import yaml

    if output_format not in ("table", "json", "yaml"):
        console.print(f"[red]error:[/] --format {output_format!r} is not one of table, json, yaml")
        raise typer.Exit(2)
    recommendation, _, _ = _recommendation(diagram, steps, wd, noise, target_loss, e_folds)
    data = recommendation.to_dict()
    if output_format == "json":
        out.print_json(json.dumps(data))
    elif output_format == "yaml":
        out.print(yaml.safe_dump(data, sort_keys=False), markup=False, highlight=False, soft_wrap=True)
    else:
        _print_recommendation(recommendation)
    if output is not None:
        text = yaml.safe_dump(data, sort_keys=False) if output.suffix in (".yaml", ".yml") else json.dumps(data, indent=2)
        output.write_text(text)
        console.print(f"recommendation written to {output}")


def _print_recommendation(recommendation: Any) -> None:
    title = f"schedule for {recommendation.steps} steps" + (" [red](degraded)[/]" if recommendation.degraded else "")
    table = Table(title=title)
    for column in ("from step", "lr", "wd", "predicted loss", "reason"):
        table.add_column(column)
    for stage in recommendation.stages:
        predicted = "-" if stage.predicted_loss is None else f"{stage.predicted_loss:.4g}"
        table.add_row(str(stage.step), f"{stage.lr:.4g}", f"{stage.wd:g}", predicted, _escape(stage.reason))
    out.print(table)
    for reason in recommendation.reasons:
        out.print(f"- {_escape(reason)}")
    for warning in recommendation.warnings:
        console.print(f"[yellow]warning:[/] {_escape(warning)}")


@app.command("evaluate-schedule")
def evaluate_schedule_command(
    diagram: Annotated[str, typer.Argument(help="Local sweep directory (or its diagram.parquet) of a scale_invariant sweep.")],
    steps: StepsOption = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per method.")] = 3,
    wd: WdOption = None,
    noise: NoiseOption = None,
    target_loss: TargetOption = None,
    e_folds: EFoldsOption = None,
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<storage>/mlflow.db).")] = None,
    track: Annotated[bool, typer.Option(help="Log the evaluation to MLflow as a run nested under the sweep's run.")] = True,
) -> None:
    """Train the diagram's model with the recommended schedule and four baselines at the same budget; write the table."""
    import json

    from phases.schedule_eval import evaluate_schedule, markdown_table
    from phases.storage import SweepStore
    from phases.tracking import TrackingError, default_tracking_uri, log_schedule_evaluation

    recommendation, frame, spec = _recommendation(diagram, steps, wd, noise, target_loss, e_folds)
    sweep_dir = Path(diagram) if Path(diagram).is_dir() else Path(diagram).parent
    store = SweepStore.from_sweep_dir(sweep_dir)
    try:
        evaluation = evaluate_schedule(recommendation, frame, spec, steps=recommendation.steps, seeds=seeds,
                                       progress=lambda message: console.print(message))
    except ValueError as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None
    table = markdown_table(evaluation)
    store.write_text("schedule_evaluation.json", json.dumps(evaluation, indent=2))
    store.write_text("schedule_evaluation.md", table)
    out.print(table, markup=False, highlight=False, soft_wrap=True)
    out.print(f"written {store.uri}/schedule_evaluation.json and schedule_evaluation.md")
    if not track:
        return
    uri = tracking_uri or default_tracking_uri(store)
    try:
        run_id = log_schedule_evaluation(store, uri, evaluation)
    except TrackingError as exc:
        console.print(f"[red]error:[/] the table is written, but MLflow logging failed: {_escape(str(exc))}")
        raise typer.Exit(1) from None
    out.print(f"MLflow run {run_id} ({uri})")


mdm_app = typer.Typer(no_args_is_help=True, help="Masked-diffusion language models: pretraining and sampling.")
app.add_typer(mdm_app, name="mdm")
CorpusOption = Annotated[str, typer.Option(help="Training text: code (standard-library statements) or english (bundled docs).")]
LengthOption = Annotated[int, typer.Option(min=8, help="Sequence length L in characters.")]
DimOption = Annotated[int, typer.Option(min=8, help="Transformer width.")]
LayersOption = Annotated[int, typer.Option(min=1, help="Transformer blocks.")]
HeadsOption = Annotated[int, typer.Option(min=1, help="Attention heads (must divide --dim).")]
BatchOption = Annotated[int, typer.Option(min=1, help="Sequences per step.")]
LrOption = Annotated[float, typer.Option(min=0.0, help="Peak AdamW learning rate (warm-up, then cosine decay).")]
SeedOption = Annotated[int, typer.Option(help="Seed of the initial weights and the batches.")]
ThreadsOption = Annotated[Optional[int], typer.Option(min=1, help="torch threads (default: all cores).")]


def _set_threads(threads: Optional[int]) -> None:
    """Set torch's intra-op threads when --threads is given; otherwise torch uses every core."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _pretrain(reference: bool, corpus: str, length: int, dim: int, layers: int, heads: int, steps: int, batch: int, lr: float,
              seed: int, out: Path, threads: Optional[int]) -> None:
    from phases.diffusion.model import ModelConfig
    from phases.diffusion.train import TrainSettings, pretrain

    _set_threads(threads)
    try:
        if dim % heads:
            raise ValueError(f"--dim {dim} must be a multiple of --heads {heads}")
        config = ModelConfig(length=length, dim=dim, layers=layers, heads=heads, corpus=corpus)
        pretrain(config, TrainSettings(steps=steps, batch=batch, lr=lr, seed=seed, eval_every=max(1, steps // 10)), out,
                 reference=reference, progress=lambda message: console.print(message))
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None


@mdm_app.command("pretrain")
def mdm_pretrain(
    corpus: CorpusOption = "code",
    length: LengthOption = 64,
    dim: DimOption = 128,
    layers: LayersOption = 4,
    heads: HeadsOption = 4,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 2200,
    batch: BatchOption = 64,
    lr: LrOption = 2e-3,
    seed: SeedOption = 0,
    out: Annotated[Path, typer.Option(help="Checkpoint file to write.")] = Path("runs/mdm/denoiser.pt"),
    threads: ThreadsOption = None,
) -> None:
    """Train the masked-diffusion denoiser (MDLM loss, SUBS) on a bundled corpus and write its checkpoint."""
    _pretrain(False, corpus, length, dim, layers, heads, steps, batch, lr, seed, out, threads)


@mdm_app.command("pretrain-reference")
def mdm_pretrain_reference(
    corpus: CorpusOption = "code",
    length: LengthOption = 64,
    dim: DimOption = 128,
    layers: LayersOption = 4,
    heads: HeadsOption = 4,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 1200,
    batch: BatchOption = 64,
    lr: LrOption = 2e-3,
    seed: SeedOption = 0,
    out: Annotated[Path, typer.Option(help="Checkpoint file to write.")] = Path("runs/mdm/reference.pt"),
    threads: ThreadsOption = None,
) -> None:
    """Train the autoregressive reference model that scores samples (a local generative perplexity)."""
    _pretrain(True, corpus, length, dim, layers, heads, steps, batch, lr, seed, out, threads)


@mdm_app.command("train-head")
def mdm_train_head(
    checkpoint: Annotated[Path, typer.Option(help="Denoiser checkpoint whose hidden states the head reads.")] = Path("runs/mdm/denoiser.pt"),
    steps: Annotated[int, typer.Option(min=1, help="AdamW steps.")] = 600,
    lr: Annotated[float, typer.Option(min=0.0, help="AdamW learning rate.")] = 1e-2,
    wd: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay (decoupled).")] = 0.0,
    blocks: Annotated[int, typer.Option(min=0, help="Denoiser blocks the head copies and fine-tunes (0: read the frozen denoiser's last hidden states).")] = 0,
    batch: BatchOption = 64,
    seed: SeedOption = 0,
    output: Annotated[Path, typer.Option("--out", help="Head checkpoint to write.")] = Path("runs/mdm/head.pt"),
    threads: ThreadsOption = None,
) -> None:
    """Fine-tune a remasking head on the frozen denoiser and report BCE, AUROC and F1 on held-out text."""
    import torch

    from phases.data.corpus import encode, load_corpus
    from phases.diffusion.head import evaluate_head, save_head, train_head
    from phases.diffusion.model import load_checkpoint

    _set_threads(threads)
    try:
        model, _ = load_checkpoint(checkpoint, "denoiser")
        if blocks > model.config.layers:
            raise ValueError(f"--blocks {blocks} is more than the denoiser's {model.config.layers} layers; use 0 to {model.config.layers}")
    except ValueError as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None
    corpus = load_corpus(model.config.corpus, model.config.length)
    train, valid = encode(corpus.train, model.config.length), encode(corpus.valid, model.config.length)
    console.print(f"head with {blocks} copied blocks: {steps} steps of batch {batch}, lr {lr:g}, wd {wd:g}, on {checkpoint}")
    head, losses = train_head(model, train, steps=steps, lr=lr, wd=wd, seed=seed, batch=batch, blocks=blocks,
                              progress=lambda step, loss: console.print(f"step {step}/{steps}: BCE {loss:.4f}"))
    metrics = evaluate_head(model, head, valid, torch.Generator().manual_seed(seed + 1))
    report = {"bce": metrics.bce, "auroc": metrics.auroc, "f1": metrics.f1, "base_rate": metrics.base_rate,
              "f1_all": metrics.f1_all_positive, "train_loss": sum(losses[-50:]) / len(losses[-50:])}
    save_head(head, output, report, denoiser=model)
    out.print_json(data={key: round(value, 4) for key, value in report.items()})
    console.print(f"written {output}")


@mdm_app.command("sample")
def mdm_sample(
    sampler: Annotated[str, typer.Option(help="mdlm, remdm, star or gstar.")] = "mdlm",
    steps: Annotated[int, typer.Option(min=1, help="Sampling steps.")] = 32,
    count: Annotated[int, typer.Option(min=1, help="Number of samples.")] = 64,
    checkpoint: Annotated[Path, typer.Option(help="Denoiser checkpoint.")] = Path("runs/mdm/denoiser.pt"),
    reference: Annotated[Optional[Path], typer.Option(help="Reference checkpoint for the perplexity (default: runs/mdm/reference.pt if it exists).")] = None,
    head: Annotated[Optional[Path], typer.Option(help="Remasking-head checkpoint (gstar).")] = None,
    tau: Annotated[float, typer.Option(min=1e-9, help="gstar: temperature of the error logits.")] = 1.0,
    t_on: Annotated[float, typer.Option(min=0.0, max=1.0, help="star, gstar: star steps for t <= t_on (linear schedule).")] = 0.3,
    schedule: Annotated[str, typer.Option(help="star, gstar: linear (gated by --t-on) or loop.")] = "linear",
    remdm_mode: Annotated[str, typer.Option(help="remdm: cap, rescale or loop.")] = "rescale",
    eta: Annotated[float, typer.Option(min=0.0, help="remdm: remasking rate parameter.")] = 0.015,
    seed: Annotated[int, typer.Option(help="Seed of the sampler's random draws.")] = 0,
    show: Annotated[int, typer.Option(min=0, help="Samples to print.")] = 10,
    threads: ThreadsOption = None,
) -> None:
    """Sample from a denoiser with one of the samplers and print metrics and excerpts."""
    import json

    import torch

    _set_threads(threads)

    from phases.diffusion.head import load_head
    from phases.diffusion.metrics import sample_metrics
    from phases.diffusion.model import load_checkpoint
    from phases.diffusion.samplers import SamplerSettings, sample
    from phases.data.corpus import decode

    try:
        settings = SamplerSettings(sampler, steps, schedule, t_on, remdm_mode, eta, tau)
        if sampler == "gstar" and head is None:
            raise ValueError("the gstar sampler needs a remasking head: pass --head HEAD.pt (train one with `phases mdm train-head`)")
        model, _ = load_checkpoint(checkpoint, "denoiser")
        remask_head = load_head(head, model) if head is not None else None
        reference_path = reference or (Path("runs/mdm/reference.pt") if Path("runs/mdm/reference.pt").is_file() else None)
        scorer = load_checkpoint(reference_path, "reference")[0] if reference_path is not None else None
        result = sample(model, settings, count, model.config.length, head=remask_head, generator=torch.Generator().manual_seed(seed))
    except ValueError as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None
    metrics = sample_metrics(result.tokens, scorer, model.config.corpus)
    metrics.update(denoiser_passes=result.denoiser_passes, head_passes=result.head_passes, forward_passes=result.forward_passes)
    out.print_json(json.dumps(metrics))
    for text in decode(result.tokens[:show]):
        out.print(repr(text), markup=False, highlight=False, soft_wrap=True)


@mdm_app.command("compare")
def mdm_compare(
    checkpoint: Annotated[Path, typer.Option(help="Denoiser checkpoint.")] = Path("runs/mdm/denoiser.pt"),
    reference: Annotated[Optional[Path], typer.Option(help="Reference checkpoint for the perplexity.")] = None,
    head: Annotated[Optional[Path], typer.Option(help="Remasking-head checkpoint; without it gstar is left out.")] = None,
    samplers: Annotated[str, typer.Option(help="Comma-separated samplers.")] = "mdlm,remdm,star,gstar",
    steps: Annotated[str, typer.Option(help="Comma-separated step counts.")] = "8,16,32,64",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per sampler and step count.")] = 3,
    count: Annotated[int, typer.Option(min=1, help="Samples per seed.")] = 512,
    tau: Annotated[float, typer.Option(min=1e-9, help="gstar: temperature of the error logits.")] = 1.0,
    t_on: Annotated[float, typer.Option(min=0.0, max=1.0, help="star, gstar: star steps for t <= t_on.")] = 0.3,
    output: Annotated[Optional[Path], typer.Option("--out", help="Write the rows as JSON to this file and the table as Markdown next to it.")] = None,
    threads: ThreadsOption = None,
) -> None:
    """Compare samplers at several step counts: quality, diversity and passes per sample, over seeds."""
    import json

    from phases.diffusion.compare import compare_samplers, markdown_table
    from phases.diffusion.head import load_head
    from phases.diffusion.model import load_checkpoint
    from phases.diffusion.samplers import SamplerSettings

    _set_threads(threads)

    try:
        model, _ = load_checkpoint(checkpoint, "denoiser")
        scorer = load_checkpoint(reference, "reference")[0] if reference is not None else None
        remask_head = load_head(head, model) if head is not None else None
        names = [name.strip() for name in samplers.split(",") if name.strip()]
        if "gstar" in names and remask_head is None:
            console.print("[yellow]warning:[/] no --head given, so gstar is left out")
            names.remove("gstar")
        counts = [int(value) for value in steps.split(",") if value.strip()]
        settings = [SamplerSettings(name, n, t_on=t_on, tau=tau) for name in names for n in counts]
        rows = compare_samplers(model, settings, seeds=seeds, count=count, reference=scorer, head=remask_head,
                                progress=lambda message: console.print(message))
    except ValueError as exc:
        console.print(f"[red]error:[/] {_escape(str(exc))}")
        raise typer.Exit(2) from None
    table = markdown_table(rows)
    out.print(table, markup=False, highlight=False, soft_wrap=True)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(rows, indent=2))
        output.with_suffix(".md").write_text(table)
        console.print(f"written {output} and {output.with_suffix('.md')}")


def _print_dry_run(plan: Any) -> None:
    from phases.trials import get_kind

    table = Table(title=f"{plan.spec.name}: dry run (nothing started)")
    for column in ("grid", "protocol", "axes", "points", "chunks", "steps"):
        table.add_column(column)
    for index, grid in enumerate(plan.spec.grids):
        points = [p for p in plan.points if p.grid == index]
        chunks = [c for c in plan.chunks if c.points[0].grid == index]
        axes = ", ".join(f"{k}[{len(v)}]" for k, v in grid.axes.items())
        table.add_row(str(index), grid.protocol, axes, str(len(points)), str(len(chunks)), str(grid.steps or plan.spec.steps))
    out.print(table)
    for chunk in plan.chunks:
        out.print(f"  chunk {chunk.chunk_id}: {len(chunk.points)} point{'s' if len(chunk.points) != 1 else ''}")
    for point in plan.points:
        coords = " ".join(f"{k}={v}" for k, v in point.coords.items() if v is not None)
        out.print(f"  point {point.point_id} {point.protocol} {coords}")
    kind = get_kind(plan.spec.kind)
    seconds = kind.estimate_seconds(plan.chunks, plan.spec)
    for note in kind.preparation_notes(plan.spec, plan.store):
        out.print(f"before the trials: {note}")
    workers = max(1, int((os.cpu_count() or 1) // plan.spec.resources.cpu))
    parallel = min(workers, len(plan.chunks))
    out.print(
        f"total: {len(plan.points)} points, {len(plan.chunks)} chunks, "
        f"{plan.spec.replicas} replicas; estimated compute {seconds:.0f} s on one core, "
        f"about {seconds / parallel:.0f} s on {parallel} parallel trials here (estimate from a short probe of this machine)"
    )


def _warn_if_tracking_unreachable(store: Any, tracking_uri: str | None) -> None:
    from phases.tracking import check_tracking, default_tracking_uri

    uri = tracking_uri or default_tracking_uri(store)
    if uri is None or uri.startswith("sqlite:"):
        return
    problem = check_tracking(uri)
    if problem:
        console.print(
            f"[yellow]warning:[/] MLflow at {uri} is not reachable ({_escape(problem)}); the sweep runs and writes its "
            f"files, and `phases track {store.uri}` logs it later"
        )


def _print_result(result: Any) -> None:
    out.print(f"[bold green]done[/] in {result.elapsed_s:.0f} s: {result.n_points} points, {result.chunks_run} chunks run")
    out.print(f"sweep directory: {result.path}")
    names = ["points.parquet", "diagram.parquet", "trajectories.parquet", "fits.json", "plots/"]
    if result.fits.get("kind") == "remask":
        names.insert(3, "samples.parquet")
    for name in names:
        out.print(f"  {result.path}/{name}")
    _print_fits(result.fits)
    if result.failed_chunks:
        out.print(f"[red]{len(result.failed_chunks)} chunks failed; {len(result.missing_points)} points missing[/] (see failures.json):")
        for chunk_id, error in result.failed_chunks.items():
            out.print(f"  {chunk_id}: {_escape(error)}")
        out.print("rerun the same command (or add --resume) to retry only the missing chunks")
    if result.tracking_error:
        out.print(
            f"[yellow]MLflow logging failed[/] ({_escape(result.tracking_error)}); the files above are complete. "
            f"Log them later with: phases track {result.path}"
        )
    elif result.tracking_uri:
        out.print(f"MLflow: {result.tracking_uri} (experiment 'phases', parent run {result.parent_run_id})")


def _print_fits(fits: dict[str, Any]) -> None:
    if fits.get("kind") == "remask":
        _print_quality(fits.get("quality") or {})
        return
    table = Table(title="equation of state and Maxwell relations")
    for column in ("protocol", "quantity", "measured", "theory"):
        table.add_column(column)
    for section in ("equation_of_state", "maxwell"):
        if "skipped" in fits.get(section, {}):
            out.print(f"{section}: skipped ({_escape(fits[section]['skipped'])})")
    for protocol, eos in fits.get("equation_of_state", {}).items():
        if not isinstance(eos, dict):
            continue
        median = eos.get("continuous_median_abs_rel_error")
        if median is not None:
            table.add_row(protocol, "median |p r^2 / ((d-1) T) - 1|", f"{median:.4f}", "0")
    for protocol, relations in fits.get("maxwell", {}).items():
        if not isinstance(relations, dict):
            continue
        for name, fit in relations.items():
            if fit.get("slope") is None:
                continue
            sem = fit.get("slope_sem")
            measured = f"{fit['slope']:.4f}" + (f" ± {sem:.4f}" if sem is not None else "")
            theory = fit.get("theory")
            table.add_row(protocol, name, measured, "-" if theory is None else f"{theory:.4f}")
    if table.row_count:
        out.print(table)
    out.print(f"regimes: {fits.get('regimes')}")


def _print_quality(quality: dict[str, Any]) -> None:
    if "skipped" in quality:
        out.print(f"sample quality: skipped ({_escape(quality['skipped'])})")
        return
    table = Table(title=f"G-Star sample quality at {quality.get('diagram_steps')} steps, mean over seeds")
    for column in ("tau", "validity", "distinct-2", "head AUROC"):
        table.add_column(column)
    for row in quality.get("by_noise", []):
        table.add_row(f"{row['noise']:g}", *(f"{row[key]:.3f}" if row.get(key) is not None else "-" for key in ("validity", "distinct_2", "head_auroc")))
    out.print(table)
    best = quality.get("best") or {}
    if best:
        out.print(f"best setting: head lr {best['lr']:.3g}, wd {best['wd']:g}, tau {best['noise']:g}: validity {best['validity']:.3f} "
                  f"over {best['seeds']} seed(s), {best.get('forward_passes', 0):.0f} passes per sample")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":
    app()
