"""The scale_invariant kind: protocol steps, population equivalence, divergence and checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.functional import cross_entropy
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from phases.grid import Chunk, chunk, expand
from phases.nets.training import StepSettings, protocol_step
from phases.spec import SpecError, load
from phases.sweep import plan_sweep
from phases.trials import get_kind
from phases.trials.base import TrialContext
from phases.trials.network import INDEX_BLOCK, NetworkPopulation, load_dataset

KIND = get_kind("scale_invariant")


def _spec(grids, steps=20, params=None, **extra):
    raw = {
        "name": "net",
        "kind": "scale_invariant",
        "steps": steps,
        "replicas": 1,
        "params": {"width": 2, "dtype": "float64", "noise_batches": 4, "eval_batch": 2000, **(params or {})},
        "log": {"points": 4, "linear": 2},
        "entropy": {"snapshots": 4},
        "grids": grids,
        **extra,
    }
    return load(raw)


def _population(spec, points=None):
    params = KIND.validate_params(spec.params)
    chunks = chunk(expand(spec), 64)
    part = chunks[0] if points is None else Chunk("c", tuple(points))
    return NetworkPopulation(part, spec, params, load_dataset(params), torch.device("cpu")), part


@pytest.mark.parametrize(
    "protocol, axes",
    [
        ("sphere", {"lr": [0.01], "radius": [2.0], "noise": [0.0, 1.5]}),
        ("elr", {"lr": [0.01], "wd": [0.05], "noise": [0.0, 1.5]}),
        ("lr", {"lr": [0.2], "wd": [0.05], "noise": [0.0, 1.5]}),
    ],
)
def test_step_matches_reference_model(protocol, axes):
    # Each member's update equals `protocol_step` applied to the nn.Module's gradient on the same
    # minibatch and noise draw (float64, relative 1e-10). This pins lr_t = elr ||w||^2 under elr,
    # the projection back to the radius under sphere, and SGD with coupled weight decay under lr.
    spec = _spec([{"protocol": protocol, "axes": axes}], params={"model": "convnet"})
    population, part = _population(spec)
    model = population.models[2]
    x_train, y_train = load_dataset(KIND.validate_params(spec.params)).x_train.double(), population.train[2][1]
    before = population.W[0].clone()
    generators = [torch.Generator().set_state(g.get_state()) for g in population.generators]
    population.advance(1)
    for row, point in enumerate(part.points):
        index = torch.randint(len(y_train), (INDEX_BLOCK, 128), generator=generators[row])[0]  # the first of a block
        vector_to_parameters(before[row].clone(), model.si_parameters())
        model.double().zero_grad()
        cross_entropy(model(x_train[index]), y_train[index]).backward()
        gradient = parameters_to_vector([p.grad for p in model.si_parameters()])
        settings = StepSettings(protocol, lr=point.coords["lr"], wd=point.coords.get("wd") or 0.0,
                                radius=point.coords.get("radius") or 1.0, noise=point.coords["noise"])
        expected, record = protocol_step(before[row], gradient, settings, generators[row])
        after = population.W[0][row]
        assert float(torch.linalg.vector_norm(after - expected)) <= 1e-10 * float(torch.linalg.vector_norm(expected))
        if protocol == "elr":
            assert record.lr_step / record.radius_before**2 == pytest.approx(0.01, rel=1e-12)


def test_sphere_keeps_radius():
    spec = _spec([{"protocol": "sphere", "axes": {"lr": [0.003, 0.03], "radius": [0.5, 4.0]}}], steps=40,
                 params={"model": "mlp", "dtype": "float32"})
    result = KIND.run(chunk(expand(spec), 64)[0], TrialContext(spec=spec))
    for point in chunk(expand(spec), 64)[0].points:
        radius = point.coords["radius"]
        trajectory = result.trajectories[point.point_id]["radius_norm"]
        assert np.allclose(trajectory, radius, rtol=1e-6, atol=0)  # float32 round-off
        assert result.summaries[point.point_id]["lambda_eff"] > 0


def test_elr_holds_effective_lr():
    # The radius moves, the step is rescaled with it: the window's mean lr_t / ||w||^2 is the elr.
    spec = _spec([{"protocol": "elr", "axes": {"lr": [0.002, 0.02], "wd": [0.1], "noise": [2.0]}}], steps=60, params={"model": "mlp"})
    part = chunk(expand(spec), 64)[0]
    result = KIND.run(part, TrialContext(spec=spec))
    for point in part.points:
        summary = result.summaries[point.point_id]
        assert summary["elr_mean"] == pytest.approx(point.coords["lr"], rel=1e-12)
        assert summary["r_std"] > 0


def test_population_equals_points_alone():
    # Each member draws from its own stream keyed by its point. So a chunk of three points (mixed
    # batch sizes, one with injected noise) gives each point the trajectory it has when it trains
    # alone, to relative 1e-9 in float64, because the batched kernels may sum in another order.
    spec = _spec([{"protocol": "elr", "axes": {"lr": [0.003, 0.01], "wd": [0.01], "noise": [0.0, 1.0], "batch_size": [32, 64]}}],
                 steps=25, params={"model": "convnet"})
    points = expand(spec)[:3]
    together = KIND.run(Chunk("all", tuple(points)), TrialContext(spec=spec))
    for point in points:
        alone = KIND.run(Chunk("one", (point,)), TrialContext(spec=spec))
        for column in ("loss", "radius_norm", "test_loss", "noise_trace"):
            a = np.asarray(together.trajectories[point.point_id][column], dtype=float)
            b = np.asarray(alone.trajectories[point.point_id][column], dtype=float)
            assert np.allclose(a, b, rtol=1e-9, atol=0, equal_nan=True), column
        assert together.summaries[point.point_id]["U"] == pytest.approx(alone.summaries[point.point_id]["U"], rel=1e-9)


def test_huge_lr_recorded_as_divergence():
    spec = _spec([{"protocol": "lr", "axes": {"lr": [0.05, 1.0e4], "wd": [1.0e-3]}}], steps=30, params={"model": "mlp"})
    part = chunk(expand(spec), 64)[0]
    result = KIND.run(part, TrialContext(spec=spec))
    stable, wild = (result.summaries[p.point_id] for p in part.points)
    assert not stable["diverged"]
    assert stable["U"] is not None
    assert wild["diverged"]
    assert wild["diverged_step"] >= 1
    assert wild.get("U") is None
    trajectory = result.trajectories[part.points[1].point_id]
    after = trajectory["step"] >= wild["diverged_step"]
    assert after.any()
    assert np.isnan(trajectory["loss"][after]).all()


def test_checkpoint_resume_is_exact():
    spec = _spec([{"protocol": "elr", "axes": {"lr": [0.01], "wd": [0.01, 0.1], "noise": [1.0]}}], steps=30, params={"model": "mlp"})
    straight, _ = _population(spec)
    straight.advance(30)
    first, _ = _population(spec)
    first.advance(13)
    arrays, meta = first.state()
    resumed, _ = _population(spec)
    resumed.load(arrays, meta)
    resumed.advance(30)
    assert torch.equal(resumed.W[0], straight.W[0])
    assert np.array_equal(np.array(resumed.log_rows), np.array(straight.log_rows), equal_nan=True)


def test_noise_measurement_leaves_training():
    # Noise-trace minibatches come from a separate stream: measuring more often leaves the weights alone.
    grids = [{"protocol": "elr", "axes": {"lr": [0.01], "wd": [0.01]}}]
    sparse, part = _population(_spec(grids, steps=20, params={"model": "mlp", "noise_every": 5}))
    dense, _ = _population(_spec(grids, steps=20, params={"model": "mlp", "noise_every": 1}), points=part.points)
    sparse.advance(20)
    dense.advance(20)
    assert torch.equal(sparse.W[0], dense.W[0])


def test_missing_cifar_fails_early(tmp_path):
    raw = {
        "name": "c", "kind": "scale_invariant", "steps": 10, "replicas": 1,
        "params": {"dataset": "cifar10", "data_dir": str(tmp_path)},
        "grids": [{"protocol": "elr", "axes": {"lr": [0.01], "wd": [0.01]}}],
    }
    with pytest.raises(SpecError, match=r"data_batch_1 not found.*cs\.toronto\.edu"):
        plan_sweep(raw, storage=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()

    # Files that exist but are not CIFAR batches fail at the same point, naming the file.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_text("not a pickle")
    with pytest.raises(SpecError, match=r"data_batch_1 is malformed"):
        plan_sweep(raw, storage=tmp_path / "runs")


@pytest.mark.parametrize(
    "params, axes, message",
    [
        ({"dataset": "teacher_student", "model": "convnet"}, {}, "use model: mlp"),
        ({"dataset": "cifar10"}, {}, "needs data_dir"),
        ({}, {"width": [0]}, "must be an integer >= 1"),
        ({"layout": "vmap"}, {}, "params.layout"),
        ({"compile": True}, {}, "compile: true applies to model: mlp only"),
    ],
)
def test_bad_network_specs_rejected(params, axes, message):
    raw = {
        "name": "bad", "kind": "scale_invariant", "steps": 10, "replicas": 1, "params": params,
        "grids": [{"protocol": "elr", "axes": {"lr": [0.01], "wd": [0.01], **axes}}],
    }
    with pytest.raises(SpecError, match=message):
        load(raw)


class _TrialCrashed(Exception):
    pass


def test_retried_trial_resumes_checkpoint(tmp_path):
    # A trial that dies after its second checkpoint, retried with that checkpoint (state.npz, no
    # pickles), ends with exactly the uninterrupted results: weights, streams and sums restored.
    from phases.trials.base import read_state_dir, write_state_dir

    spec = _spec([{"protocol": "elr", "axes": {"lr": [0.01], "wd": [0.01, 0.1], "noise": [1.0]}}], steps=300, params={"model": "mlp"})
    part = chunk(expand(spec), 64)[0]
    straight = KIND.run(part, TrialContext(spec))
    saved: list[int] = []

    def save_then_crash(arrays, meta):
        write_state_dir(tmp_path, arrays, meta)
        saved.append(meta["step"])
        if len(saved) == 2:
            raise _TrialCrashed

    with pytest.raises(_TrialCrashed):
        KIND.run(part, TrialContext(spec, save_state=save_then_crash, checkpoint_every_s=0.0))
    assert 0 < saved[-1] < 300
    retried = KIND.run(part, TrialContext(spec, load_state=lambda: read_state_dir(tmp_path)))
    for point in part.points:
        for key, value in straight.summaries[point.point_id].items():
            assert retried.summaries[point.point_id][key] == value, key
        for key, column in straight.trajectories[point.point_id].items():
            assert np.array_equal(retried.trajectories[point.point_id][key], column, equal_nan=True), key


@pytest.mark.slow
def test_network_sweep_end_to_end(ray_local, tmp_path):
    # A small network sweep through Ray Tune: diagram rows with width and accuracies, a diverging
    # point labelled divergent rather than failing the sweep, and the fits written.
    import json

    import polars as pl

    from phases import run_sweep

    spec = _spec(
        [
            {"protocol": "elr", "axes": {"lr": [0.001, 0.003], "wd": [0.001, 0.01], "noise": [3.6]}},
            {"protocol": "lr", "axes": {"lr": [0.1, 1.0e4], "wd": [0.01]}},
        ],
        steps=150,
        params={"model": "convnet", "dtype": "float32", "radius0": 30.0, "eval_batch": 512},
        chunk_size=3,
    )
    result = run_sweep(spec, storage=tmp_path)
    assert result.failed_chunks == {}
    diagram = pl.read_parquet(tmp_path / "net" / "diagram.parquet")
    assert diagram.height == 6
    assert set(diagram["kind"]) == {"scale_invariant"}
    assert set(diagram["width"]) == {2}
    wild = diagram.filter(pl.col("lr") == 1.0e4)
    assert wild["regime"].to_list() == ["divergent"]
    tame = diagram.filter(pl.col("protocol") == "elr")
    assert tame["test_acc"].is_not_null().all()
    assert (tame["test_acc"] > 0.1).all()
    fits = json.loads((tmp_path / "net" / "fits.json").read_text())
    assert "elr_collapse" in fits
    assert "equation_of_state" in fits


def test_resnet_on_cifar_folder(tmp_path):
    # The kind reads CIFAR from a folder in the standard format, written here, and trains a
    # ResNet-18 population on it. The published search space passes its checks with that folder.
    from tests.phases.test_data import _write_cifar10

    _write_cifar10(tmp_path / "cifar-10-batches-py")
    spec = _spec([{"protocol": "elr", "axes": {"lr": [0.01], "wd": [0.01]}}], steps=3,
                 params={"model": "resnet18", "width": 1, "dataset": "cifar10", "data_dir": str(tmp_path), "dtype": "float32"})
    part = chunk(expand(spec), 64)[0]
    result = KIND.run(part, TrialContext(spec=spec))
    summary = result.summaries[part.points[0].point_id]
    assert summary["dim"] == 2724 + 27
    assert not summary["diverged"]
    assert np.isfinite(result.trajectories[part.points[0].point_id]["test_loss"]).all()

    import yaml

    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "search_spaces" / "resnet18_cifar10.yaml").read_text())
    raw["params"]["data_dir"] = str(tmp_path)
    assert len(plan_sweep(raw, storage=tmp_path / "runs").points) == 230
    raw["params"]["data_dir"] = str(tmp_path / "elsewhere")
    with pytest.raises(SpecError, match="data_batch_1 not found"):
        plan_sweep(raw, storage=tmp_path / "runs")
