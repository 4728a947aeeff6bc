"""The `remask` kind: fine-tune G-Star's remasking head and measure sample quality.

A point is (lr, wd, tau, seed) under protocol `adamw`. Its head (LayerNorm + linear on the frozen
denoiser's hidden states) is trained with AdamW at (lr, wd) from its seed. Then G-Star samples at
temperature tau (the `noise` axis) at each of `params.sample_steps`, and the samples are scored.
Points of a chunk that share (lr, wd, seed) share one head, and all heads of one seed train on the
same stream of batches, so the backbone passes are paid once per seed.

The denoiser (and the reference model that scores samples) is built once per sweep by `prepare`
on the driver: it copies the checkpoint files, pretraining any that is missing when
`build_missing` is on, into `<sweep>/base/`. Trials read them from there, so every node of a
cluster uses the same weights and no trial pretrains.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from phases.data.corpus import CORPORA, encode, load_corpus
from phases.grid import Chunk
from phases.spec import SweepSpec
from phases.trials.base import ChunkResult, TrialContext, TrialKind
from phases.trials.isotropic import log_schedule

logger = logging.getLogger(__name__)

BASE_FILES = {"denoiser": "base/denoiser.pt", "reference": "base/reference.pt"}
# An estimate from bench/diffusion.py on a 2-core x86 machine: one MDLM step of 256 x 64 tokens
# (about 26 GFLOP) takes 0.62 s on 2 threads, about 4e10 FLOP/s, so about 2e10 per core.
FLOPS_PER_CORE = 2e10


class RemaskParams(BaseModel):
    """Fixed parameters of the remask kind (`params:` in the spec)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str = Field("runs/mdm/denoiser.pt", description="denoiser checkpoint (`phases mdm pretrain` writes it)")
    reference: str | None = Field("runs/mdm/reference.pt", description="reference-model checkpoint for the perplexity; null: no perplexity")
    build_missing: bool = Field(True, description="pretrain a missing checkpoint at its path before the trials start")
    corpus: str = Field("code", description="corpus of a model built here: code or english")
    length: int = Field(64, ge=8, description="sequence length of a model built here")
    dim: int = Field(128, ge=8, description="transformer width of a model built here")
    layers: int = Field(4, ge=1, description="transformer blocks of a model built here")
    heads: int = Field(4, ge=1, description="attention heads of a model built here")
    pretrain_steps: int = Field(2200, ge=1, description="optimiser steps of a denoiser built here")
    reference_steps: int = Field(1200, ge=1, description="optimiser steps of a reference model built here")
    head_blocks: int = Field(0, ge=0, description="denoiser blocks the head copies and fine-tunes; 0: it reads the frozen last hidden states")
    batch: int = Field(64, ge=1, description="sequences per head fine-tuning step")
    eval_sequences: int = Field(512, ge=16, description="held-out sequences for the head's AUROC and F1")
    sample_steps: list[int] = Field([8, 16], min_length=1, description="G-Star step counts at which each point samples")
    samples: int = Field(128, ge=1, description="samples per point and step count")
    t_on: float = Field(0.3, ge=0.0, le=1.0, description="G-Star takes star steps for t <= t_on (linear schedule)")
    schedule: str = Field("linear", description="linear (gated by t_on) or loop")
    diagram_steps: int | None = Field(None, description="step count whose metrics fill points.parquet; null: the first of sample_steps")

    @field_validator("corpus")
    @classmethod
    def _known_corpus(cls, value: str) -> str:
        if value not in CORPORA:
            raise ValueError(f"unknown corpus {value!r}; allowed: {', '.join(CORPORA)}")
        return value

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        from phases.diffusion.samplers import SCHEDULES

        if value not in SCHEDULES:
            raise ValueError(f"unknown schedule {value!r}; allowed: {', '.join(SCHEDULES)}")
        return value

    @field_validator("sample_steps")
    @classmethod
    def _positive_unique_steps(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value) or len(set(value)) != len(value):
            raise ValueError(f"sample_steps must be distinct integers >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "RemaskParams":
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} must be a multiple of heads {self.heads}")
        if self.head_blocks > self.layers:
            raise ValueError(f"head_blocks {self.head_blocks} is more than layers {self.layers}; use 0 to {self.layers}")
        if self.diagram_steps is not None and self.diagram_steps not in self.sample_steps:
            raise ValueError(f"diagram_steps {self.diagram_steps} is not one of sample_steps {self.sample_steps}; add it there or leave it null")
        return self

    @property
    def reported_steps(self) -> int:
        return self.diagram_steps if self.diagram_steps is not None else self.sample_steps[0]


class RemaskKind(TrialKind):
    name = "remask"
    params_model = RemaskParams
    protocols = ("adamw",)

    def axes_for(self, protocol: str) -> tuple[str, ...]:
        return ("lr", "wd", "noise", "seed")

    def axis_defaults(self, protocol: str, params: BaseModel | None = None) -> dict[str, Any]:
        return {"wd": 0.0, "noise": 1.0, "seed": 0}

    def check_inputs(self, spec: SweepSpec, store: Any = None) -> None:
        params = self.validate_params(spec.params)
        for grid in spec.grids:
            if any(tau <= 0 for tau in grid.axes.get("noise", [])):
                raise ValueError(f"noise is the G-Star temperature tau and must be > 0, got {grid.axes['noise']}")
        record = store.read_json("base/base.json") if store is not None and store.exists("base/base.json") else {}
        configs = {}
        for role, path in (("denoiser", params.checkpoint), ("reference", params.reference)):
            if path is None:
                continue
            if store is not None and store.exists(BASE_FILES[role]):
                # The sweep keeps the copy it started with, so that all its points share one model.
                _warn_if_source_changed(role, Path(path), record.get(role, {}), store)
                continue
            if Path(path).is_file():
                from phases.diffusion.model import load_checkpoint

                model, _ = load_checkpoint(path, role)
                configs[role] = model.config
                if role == "denoiser" and params.head_blocks > model.config.layers:
                    raise ValueError(f"head_blocks {params.head_blocks} is more than the {model.config.layers} layers of {path}; "
                                     f"use 0 to {model.config.layers}")
            elif not params.build_missing:
                command = "phases mdm pretrain" if role == "denoiser" else "phases mdm pretrain-reference"
                raise ValueError(f"{role} checkpoint {path} not found; create it with `{command} --out {path}` "
                                 "or set build_missing: true to pretrain it at the start of the sweep")
        if len(configs) == 2 and (configs["denoiser"].corpus, configs["denoiser"].length) != (configs["reference"].corpus, configs["reference"].length):
            raise ValueError(
                f"the denoiser {params.checkpoint} ({configs['denoiser'].corpus}, L = {configs['denoiser'].length}) and the reference "
                f"{params.reference} ({configs['reference'].corpus}, L = {configs['reference'].length}) were trained on different data; "
                "use a reference model of the denoiser's corpus and length"
            )

    def preparation_notes(self, spec: SweepSpec, store: Any) -> list[str]:
        params = self.validate_params(spec.params)
        notes = []
        for role, path, steps in self._sources(params):
            if store.exists(BASE_FILES[role]):
                notes.append(f"{role}: the sweep's copy {store.uri}/{BASE_FILES[role]} is used")
            elif Path(path).is_file():
                notes.append(f"{role}: {path} is copied to {store.uri}/{BASE_FILES[role]}")
            else:
                notes.append(f"{role}: {path} is missing and is pretrained first, {steps} steps, {_pretrain_estimate(params, steps)}")
        return notes

    def prepare(self, spec: SweepSpec, store: Any, say: Callable[[str], None]) -> None:
        """Copy the denoiser and reference checkpoints into `<sweep>/base/`, pretraining any that is
        missing first; a sweep directory that already has them keeps its copies."""
        from phases.diffusion.model import ModelConfig, load_checkpoint
        from phases.diffusion.train import TrainSettings, pretrain

        params = self.validate_params(spec.params)
        record = store.read_json("base/base.json") if store.exists("base/base.json") else {}
        for role, path, steps in self._sources(params):
            if store.exists(BASE_FILES[role]):
                continue
            source = Path(path)
            if not source.is_file():
                say(f"{role} {source} not found: pretraining it for {steps} steps, {_pretrain_estimate(params, steps)}")
                config = ModelConfig(length=params.length, dim=params.dim, layers=params.layers, heads=params.heads, corpus=params.corpus)
                settings = TrainSettings(steps=steps, eval_every=max(1, steps // 10))
                pretrain(config, settings, source, reference=role == "reference", progress=say)
            _, metrics = load_checkpoint(source, role)
            data = source.read_bytes()
            store.write_bytes(BASE_FILES[role], data)
            record[role] = {"source": str(source.resolve()), "sha256": hashlib.sha256(data).hexdigest(), "metrics": metrics}
            say(f"{role}: {source} copied to {store.uri}/{BASE_FILES[role]}")
        store.write_json("base/base.json", record)

    @staticmethod
    def _sources(params: RemaskParams) -> list[tuple[str, str, int]]:
        """Return (role, checkpoint path, pretraining steps) of each model the sweep uses."""
        sources = [("denoiser", params.checkpoint, params.pretrain_steps)]
        if params.reference is not None:
            sources.append(("reference", params.reference, params.reference_steps))
        return sources

    def run(self, chunk: Chunk, context: TrialContext) -> ChunkResult:
        from phases.diffusion.head import evaluate_heads, train_heads

        spec = context.spec
        params = self.validate_params(spec.params)
        torch.set_num_threads(max(1, int(spec.resources.cpu)))
        device = torch.device(context.device)
        model, reference = _base_models(context.store, device)
        corpus = load_corpus(model.config.corpus, model.config.length)
        train = encode(corpus.train, model.config.length).to(device)
        valid = encode(corpus.valid, model.config.length)[: params.eval_sequences].to(device)

        restored = context.restore()
        finished: dict[str, Any] = dict(restored[1]["finished"]) if restored is not None else {}
        by_seed: dict[int, list] = {}
        for point in chunk.points:
            by_seed.setdefault(int(point.coords["seed"]), []).append(point)
        log_steps = log_schedule(chunk.steps, spec.log.points, spec.log.linear)

        for seed, members in sorted(by_seed.items()):
            if all(point.point_id in finished for point in members):
                continue
            started = time.perf_counter()
            settings = sorted({(point.coords["lr"], point.coords["wd"]) for point in members})
            heads, losses = train_heads(model, train, settings, steps=chunk.steps, seed=seed, batch=params.batch, blocks=params.head_blocks)
            live = [i for i, history in enumerate(losses) if history and np.isfinite(history[-1])]
            generator = torch.Generator(device=device).manual_seed(seed + 1)
            head_metrics = dict(zip(live, evaluate_heads(model, [heads[i] for i in live], valid, generator)))
            logger.info("chunk %s: %d heads of seed %d trained in %.0f s", chunk.chunk_id, len(settings), seed, time.perf_counter() - started)

            for point in members:
                index = settings.index((point.coords["lr"], point.coords["wd"]))
                history = losses[index]
                entry = _head_summary(history, head_metrics.get(index), chunk.steps)
                quality = []
                if index in head_metrics:
                    quality = _sample_quality(model, heads[index], reference, params, point.coords["noise"], seed, device)
                    reported = next(row for row in quality if row["sample_steps"] == params.reported_steps)
                    entry["summary"].update(reported)
                entry["samples"] = quality
                entry["trajectory"] = _trajectory(history, log_steps)
                finished[point.point_id] = entry
            logger.info("chunk %s: seed %d done (%d of %d points)", chunk.chunk_id, seed, len(finished), len(chunk.points))
            context.checkpoint({}, {"finished": json.loads(json.dumps(finished, default=float))})

        return ChunkResult(
            trajectories={pid: finished[pid]["trajectory"] for pid in (p.point_id for p in chunk.points)},
            summaries={pid: finished[pid]["summary"] for pid in (p.point_id for p in chunk.points)},
            samples={pid: finished[pid]["samples"] for pid in (p.point_id for p in chunk.points)},
        )

    def estimate_seconds(self, chunks: list[Chunk], spec: SweepSpec) -> float:
        """Estimate single-core seconds from the FLOPs of the backbone passes.

        NOTE: the FLOPs come from the params' model size (dim, layers, length), not from the
        checkpoint's. A checkpoint of another size makes the estimate off by the ratio of the two.
        """
        params = self.validate_params(spec.params)
        flops_per_token = 24 * params.layers * params.dim**2
        per_sequence = flops_per_token * params.length / FLOPS_PER_CORE
        # A guided step's head pass is one backbone pass, or head_blocks / layers of one.
        head_pass = params.head_blocks / params.layers if params.head_blocks else 1.0
        total = 0.0
        for chunk in chunks:
            seeds = len({point.coords["seed"] for point in chunk.points})
            heads = len({(point.coords["seed"], point.coords["lr"], point.coords["wd"]) for point in chunk.points})
            if params.head_blocks:
                feature_passes = heads * 3 * head_pass  # forward and backward through each head's copied blocks
            else:
                feature_passes = seeds  # one frozen backbone pass per batch, shared by the seed's heads
            total += chunk.steps * params.batch * (seeds + feature_passes) * per_sequence  # seeds: the proposals' passes
            total += 2 * seeds * params.eval_sequences * per_sequence
            passes = sum(steps * (1 + params.t_on * head_pass) + 1 for steps in params.sample_steps)
            total += len(chunk.points) * params.samples * passes * per_sequence
        return total


def _sample_quality(model, head, reference, params: RemaskParams, tau: float, seed: int, device: torch.device) -> list[dict[str, Any]]:
    """Sample with G-Star at each of the params' step counts and score the samples.

    The draws depend on the seed and the step count only, so every (lr, wd, tau) of a seed is
    compared on common random numbers.
    """
    from phases.diffusion.metrics import sample_metrics
    from phases.diffusion.samplers import SamplerSettings, sample

    rows = []
    for steps in params.sample_steps:
        sampler = SamplerSettings("gstar", steps, params.schedule, params.t_on, tau=tau)
        draws = torch.Generator(device=device).manual_seed(1_000_003 * seed + steps)
        result = sample(model, sampler, params.samples, model.config.length, head=head, generator=draws, device=device)
        metrics = sample_metrics(result.tokens, reference, model.config.corpus)
        rows.append({**metrics, "sample_steps": steps, "samples": params.samples, "denoiser_passes": result.denoiser_passes,
                     "head_passes": result.head_passes, "forward_passes": result.forward_passes})
    return rows


def _pretrain_estimate(params: RemaskParams, steps: int) -> str:
    """Estimate the wall time of pretraining a model of the params' size on 2 cores."""
    # 0.55 s per step of batch 64 at width 128, 4 blocks, L = 64, measured on 2 cores; the FLOPs
    # scale with layers x dim^2 x length.
    scale = params.layers * params.dim**2 * params.length / (4 * 128**2 * 64)
    seconds = steps * 0.55 * scale
    return f"roughly {seconds / 60:.1f} min on 2 cores" if seconds >= 60 else f"roughly {seconds:.0f} s on 2 cores"


def _warn_if_source_changed(role: str, source: Path, record: dict[str, Any], store: Any) -> None:
    """Log a warning when the checkpoint a sweep was started from no longer matches its copy."""
    if not source.is_file():
        logger.info("%s %s not found; the sweep uses its copy %s/%s", role, source, store.uri, BASE_FILES[role])
        return
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    if record.get("sha256") and digest != record["sha256"]:
        logger.warning(
            "%s %s has changed since this sweep copied it to %s/%s; the sweep keeps using its copy so that all its "
            "points share one model. Run with another --name to use the new file.", role, source, store.uri, BASE_FILES[role]
        )


def _base_models(store: Any, device: torch.device):
    """Load the sweep's denoiser (and reference model, if the sweep has one) from `<sweep>/base/`."""
    from phases.diffusion.model import load_checkpoint

    if store is None or not store.exists(BASE_FILES["denoiser"]):
        where = store.uri if store is not None else "the sweep directory"
        raise RuntimeError(f"{where}/{BASE_FILES['denoiser']} is missing; run remask points through `phases sweep`, which writes it before the trials start")
    models = {}
    with tempfile.TemporaryDirectory() as folder:
        for role, name in BASE_FILES.items():
            if not store.exists(name):
                continue
            local = store.local_path(name) if store.is_local else Path(folder) / Path(name).name
            if not store.is_local:
                local.write_bytes(store.read_bytes(name))
            model, _ = load_checkpoint(local, role)
            models[role] = model.to(device) if role == "denoiser" else model
    return models["denoiser"], models.get("reference")


def _head_summary(history: list[float], metrics: Any, steps: int) -> dict[str, Any]:
    """Build the summary columns of one head: its evaluation, its late training loss and divergence."""
    diverged = not history or not np.isfinite(history[-1])
    tail = history[-max(1, steps // 10):]
    summary: dict[str, Any] = {
        "diverged": diverged,
        "diverged_step": len(history) if diverged else None,
        "head_train_loss": None if diverged else float(np.mean(tail)),
    }
    if metrics is not None:
        summary.update(head_bce=metrics.bce, head_auroc=metrics.auroc, head_f1=metrics.f1, head_base_rate=metrics.base_rate,
                       head_f1_all=metrics.f1_all_positive)
    return {"summary": summary}


def _trajectory(history: list[float], log_steps: np.ndarray) -> dict[str, list]:
    """Average the head's training BCE over the steps between consecutive logging steps."""
    steps, loss = [], []
    previous = 0
    for step in log_steps:
        step = int(step)
        if step > len(history):
            break
        window = history[previous:step]
        steps.append(step)
        loss.append(float(np.mean(window)))
        previous = step
    return {"step": steps, "loss": loss}
