"""The remask kind: head fine-tuning and G-Star sample quality over lr x wd x tau, as a sweep.

The models here are tiny (width 32, one block, L = 32) and barely trained, so the tests check the
machinery and its bookkeeping, not sample quality; docs/diffusion.md has the measured numbers.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from phases.diffusion.model import ModelConfig
from phases.diffusion.train import TrainSettings, pretrain
from phases.grid import Chunk, chunk, expand
from phases.spec import SpecError, load
from phases.storage import SweepStore
from phases.trials import get_kind
from phases.trials.base import TrialContext
from phases.trials.remask import BASE_FILES

KIND = get_kind("remask")
LENGTH = 32
TINY = {"length": LENGTH, "dim": 32, "layers": 1, "heads": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mdm")
    config = ModelConfig(**TINY)
    pretrain(config, TrainSettings(steps=30, batch=32, eval_every=30, eval_sequences=64), folder / "denoiser.pt")
    pretrain(config, TrainSettings(steps=30, batch=32, eval_every=30, eval_sequences=64), folder / "reference.pt", reference=True)
    return folder


def _spec(models, axes, *, name="remask", steps=20, chunk_size=4, **params):
    base = {"checkpoint": str(models / "denoiser.pt"), "reference": str(models / "reference.pt"), "build_missing": False,
            "batch": 16, "eval_sequences": 64, "sample_steps": [4, 8], "samples": 16, **TINY}
    base.update(params)
    return load({"name": name, "kind": "remask", "steps": steps, "replicas": 1, "chunk_size": chunk_size,
                 "log": {"points": 8, "linear": 4}, "params": base, "grids": [{"protocol": "adamw", "axes": axes}]})


def _store_with_base(models, tmp_path) -> SweepStore:
    store = SweepStore(tmp_path, "direct")
    for role, name in BASE_FILES.items():
        store.write_bytes(name, (models / f"{role}.pt").read_bytes())
    return store


def _head_passes(steps: int, t_on: float = 0.3) -> int:
    # G-Star guides the steps t -> s with t <= t_on, t = 1 - i / steps, except the last (s = 0),
    # which masks nothing.
    return sum(1 for i in range(steps - 1) if 1 - i / steps <= t_on + 1e-12)


def test_shared_heads_and_chunking(models, tmp_path):
    # Points with the same (lr, wd, seed) share one head, so their head metrics agree. A point
    # gives the same numbers alone as next to other points of its seed.
    spec = _spec(models, {"lr": [1e-2], "wd": [0.0, 0.1], "noise": [0.3, 30.0]})
    store = _store_with_base(models, tmp_path)
    points = expand(spec)
    together = KIND.run(Chunk("all", tuple(points)), TrialContext(spec, store=store))
    for wd in (0.0, 0.1):
        aurocs = {together.summaries[p.point_id]["head_auroc"] for p in points if p.coords["wd"] == wd}
        assert len(aurocs) == 1
    alone = KIND.run(Chunk("one", (points[3],)), TrialContext(spec, store=store))
    pid = points[3].point_id
    assert alone.summaries[pid] == together.summaries[pid]
    assert alone.samples[pid] == together.samples[pid]
    for row in together.samples[pid]:
        assert row["head_passes"] == _head_passes(row["sample_steps"])
        assert row["forward_passes"] == row["denoiser_passes"] + row["head_passes"]
        assert 0.0 <= row["validity"] <= 1.0
        assert row["reference_perplexity"] > 1.0


def test_head_with_copied_block_samples(models, tmp_path):
    spec = _spec(models, {"lr": [3e-3], "noise": [1.0]}, head_blocks=1, t_on=0.6)
    store = _store_with_base(models, tmp_path)
    part = chunk(expand(spec), 4)[0]
    result = KIND.run(part, TrialContext(spec, store=store))
    summary = result.summaries[part.points[0].point_id]
    assert 0.0 <= summary["head_auroc"] <= 1.0
    assert summary["head_passes"] == _head_passes(4, 0.6)
    assert summary["head_passes"] == 1


def test_diverging_head_is_data(models, tmp_path):
    # lr = 1e38 overflows AdamW's float32 update at the first step: that point is diverged and has
    # no samples, and its neighbour in the chunk is unaffected.
    spec = _spec(models, {"lr": [1e-2, 1e38]})
    store = _store_with_base(models, tmp_path)
    part = chunk(expand(spec), 4)[0]
    result = KIND.run(part, TrialContext(spec, store=store))
    tame, wild = (result.summaries[p.point_id] for p in part.points)
    assert wild["diverged"]
    assert wild["diverged_step"] == 1
    assert result.samples[part.points[1].point_id] == []
    assert not tame["diverged"]
    assert 0.0 <= tame["validity"] <= 1.0


def test_rerun_keeps_base_copy(models, tmp_path, caplog):
    # A sweep directory that has its base/ copies needs no source file, and a changed source is
    # reported, not used.
    import shutil

    from phases.sweep import plan_sweep

    source = tmp_path / "denoiser.pt"
    shutil.copy(models / "denoiser.pt", source)
    spec = _spec(models, {"lr": [1e-2]}, checkpoint=str(source))
    plan = plan_sweep(spec, storage=tmp_path)
    plan.store.makedirs()
    KIND.prepare(spec, plan.store, lambda message: None)
    source.unlink()
    plan_sweep(spec, storage=tmp_path)  # no error: the sweep has its copy
    shutil.copy(models / "reference.pt", source)  # another file under the same name
    with caplog.at_level("WARNING", logger="phases.trials.remask"):
        plan_sweep(spec, storage=tmp_path)
    assert "has changed since this sweep copied it" in caplog.text
    assert (tmp_path / "remask" / "base" / "denoiser.pt").read_bytes() == (models / "denoiser.pt").read_bytes()


def test_retried_trial_resumes_after_its_last_finished_seed(models, tmp_path):
    spec = _spec(models, {"lr": [1e-2], "noise": [1.0], "seed": [0, 1]})
    store = _store_with_base(models, tmp_path)
    part = chunk(expand(spec), 4)[0]
    straight = KIND.run(part, TrialContext(spec, store=store))
    saved = []

    def save_then_crash(arrays, meta):
        saved.append((arrays, meta))
        raise RuntimeError("node lost")

    with pytest.raises(RuntimeError, match="node lost"):
        KIND.run(part, TrialContext(spec, store=store, save_state=save_then_crash))
    assert len(saved[0][1]["finished"]) == 1  # the first seed's point was saved
    retried = KIND.run(part, TrialContext(spec, store=store, load_state=lambda: saved[0]))
    for point in part.points:
        assert retried.summaries[point.point_id] == pytest.approx(straight.summaries[point.point_id])
        assert retried.samples[point.point_id] == straight.samples[point.point_id]


@pytest.mark.slow
def test_remask_sweep_end_to_end(models, ray_local, tmp_path):
    # Through Ray Tune: the driver copies the given denoiser into the sweep, pretrains the missing
    # reference model once, and the trials read both from storage. The diagram, samples.parquet,
    # plots and MLflow runs come out like any other sweep's.
    from mlflow.tracking import MlflowClient

    from phases import run_sweep

    reference = tmp_path / "built" / "reference.pt"
    spec = _spec(models, {"lr": [1e-3, 1e-1], "wd": [0.0, 0.1], "noise": [0.1, 10.0]},
                 reference=str(reference), build_missing=True, reference_steps=5)
    result = run_sweep(spec, storage=tmp_path)
    assert result.failed_chunks == {}
    assert result.tracking_error is None
    sweep = tmp_path / "remask"

    assert reference.is_file()  # built by the driver, once
    record = json.loads((sweep / "base" / "base.json").read_text())
    assert record["denoiser"]["sha256"] == hashlib.sha256((models / "denoiser.pt").read_bytes()).hexdigest()
    assert record["reference"]["sha256"] == hashlib.sha256(reference.read_bytes()).hexdigest()

    points = pl.from_arrow(pq.read_table(sweep / "points.parquet"))
    samples = pl.from_arrow(pq.read_table(sweep / "samples.parquet"))
    assert points.height == 8
    assert samples.height == 16
    assert set(points["protocol"]) == {"adamw"}
    assert set(points["kind"]) == {"remask"}
    assert (points["sample_steps"] == 4).all()  # diagram_steps defaults to the first step count
    assert points["validity"].is_between(0, 1).all()
    assert points["head_auroc"].is_between(0, 1).all()
    assert points["T"].is_null().all()  # no thermodynamics for this kind
    at_four = samples.filter(pl.col("sample_steps") == 4).sort("point_id")
    assert at_four["validity"].to_list() == points.sort("point_id")["validity"].to_list()
    assert (samples["head_passes"] == samples["sample_steps"].map_elements(_head_passes, return_dtype=pl.Int64)).all()

    fits = json.loads((sweep / "fits.json").read_text())
    assert fits["kind"] == "remask"
    assert fits["quality"]["usable_points"] == 8
    assert {row["noise"] for row in fits["quality"]["by_noise"]} == {0.1, 10.0}
    for name in ("validity_lr_wd.png", "head_auroc_lr_wd.png", "quality_vs_tau.png"):
        assert (sweep / "plots" / name).stat().st_size > 1000

    client = MlflowClient(tracking_uri=result.tracking_uri)
    children = client.search_runs([client.get_experiment_by_name("phases").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    assert len(children) == 8
    assert all("validity" in run.data.metrics and "head_auroc" in run.data.metrics for run in children)
    artifacts = {item.path for item in client.list_artifacts(result.parent_run_id)}
    assert "samples.parquet" in artifacts


def test_bad_remask_specs_fail_before_any_work(models, tmp_path):
    axes = {"lr": [1e-2]}
    with pytest.raises(SpecError, match=r"protocol 'lr' is not valid for kind 'remask'; allowed: adamw"):
        load({"name": "x", "kind": "remask", "steps": 5, "grids": [{"protocol": "lr", "axes": axes}]})
    with pytest.raises(SpecError, match=r"axis 'radius' is not valid for kind 'remask'"):
        _spec(models, {"lr": [1e-2], "radius": [1.0]})
    with pytest.raises(SpecError, match=r"diagram_steps 16 is not one of sample_steps"):
        _spec(models, axes, diagram_steps=16)
    with pytest.raises(SpecError, match=r"head_blocks 2 is more than layers 1"):
        _spec(models, axes, head_blocks=2)

    from phases.sweep import plan_sweep

    missing = tmp_path / "none.pt"
    with pytest.raises(SpecError, match=rf"denoiser checkpoint {missing} not found; create it with `phases mdm pretrain"):
        plan_sweep(_spec(models, axes, checkpoint=str(missing)), storage=tmp_path)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes((models / "denoiser.pt").read_bytes()[:500])
    with pytest.raises(SpecError, match=rf"checkpoint {corrupt} is not a readable torch file"):
        plan_sweep(_spec(models, axes, checkpoint=str(corrupt)), storage=tmp_path)
    with pytest.raises(SpecError, match="contains a 'reference' model, but a 'denoiser' model is needed"):
        plan_sweep(_spec(models, axes, checkpoint=str(models / "reference.pt")), storage=tmp_path)
    with pytest.raises(SpecError, match="tau and must be > 0"):
        plan_sweep(_spec(models, {"lr": [1e-2], "noise": [0.0, 1.0]}), storage=tmp_path)
    assert not (tmp_path / "remask").exists()  # nothing was written


def test_trial_without_base_files(models, tmp_path):
    spec = _spec(models, {"lr": [1e-2]})
    with pytest.raises(RuntimeError, match="base/denoiser.pt is missing; run remask points through `phases sweep`"):
        KIND.run(chunk(expand(spec), 4)[0], TrialContext(spec, store=SweepStore(tmp_path, "empty")))


def test_estimate_grows_with_samples_and_steps(models):
    few = _spec(models, {"lr": [1e-2], "noise": [1.0, 2.0]})
    more = _spec(models, {"lr": [1e-2], "noise": [1.0, 2.0]}, samples=64)
    assert KIND.estimate_seconds(chunk(expand(more), 4), more) > KIND.estimate_seconds(chunk(expand(few), 4), few) > 0
    assert np.isfinite(KIND.estimate_seconds(chunk(expand(few), 4), few))


def test_quality_summary_averages_seeds():
    # Two settings over two seeds: the best setting is chosen by its seed mean, not by its best seed.
    from analysis.quality import quality_summary

    diagram = pl.DataFrame({
        "point_id": ["a0", "a1", "b0", "b1"],
        "lr": [1e-2, 1e-2, 1e-1, 1e-1],
        "wd": [0.0] * 4,
        "noise": [1.0] * 4,
        "seed": [0, 1, 0, 1],
        "diverged": [False] * 4,
        "sample_steps": [8] * 4,
        "validity": [0.30, 0.34, 0.50, 0.10],
        "distinct_2": [0.9] * 4,
        "reference_perplexity": [3.0] * 4,
        "head_auroc": [0.8, 0.82, 0.7, 0.72],
        "head_f1": [0.5] * 4,
        "forward_passes": [10] * 4,
    })
    summary = quality_summary(diagram, None)
    assert summary["best"]["lr"] == 1e-2
    assert summary["best"]["validity"] == pytest.approx(0.32)
    assert summary["best"]["validity_std"] == pytest.approx(np.std([0.30, 0.34], ddof=1))
    assert summary["best"]["seeds"] == 2
    assert summary["head_auroc"]["min"] == pytest.approx(0.7)
    by_lr = {row["lr"]: row["validity"] for row in summary["by_lr"]}
    assert by_lr[1e-1] == pytest.approx(0.30)
    diverged = quality_summary(diagram.with_columns(diverged=pl.lit(True)), None)
    assert diverged["usable_points"] == 0
    assert "every head diverged" in diverged["skipped"]
