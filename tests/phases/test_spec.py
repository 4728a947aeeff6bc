"""Spec validation: every rejected input names the file, the field path and the fix."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from phases.cli import app
from phases.grid import chunk, expand
from phases.spec import SpecError, load

REPO = Path(__file__).resolve().parents[2]

VALID = {
    "name": "valid",
    "kind": "isotropic",
    "steps": 100,
    "replicas": 4,
    "grids": [
        {"protocol": "elr", "axes": {"lr": {"log": [0.01, 0.1, 3]}, "wd": [0.01, 0.1]}},
        {"protocol": "sphere", "axes": {"lr": [0.01], "radius": {"lin": [0.5, 2.0, 4]}}},
    ],
}


def _with(path: str, value) -> dict:
    """Return VALID with the value at a dotted path replaced (list indices as numbers)."""
    data = copy.deepcopy(VALID)
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    target = data
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return data


# (case, spec, field path expected in the message, words expected in the message)
INVALID = [
    ("unknown axis", _with("grids.0.axes.momentum", [0.9]), "grids[0].axes.momentum", "allowed axes: lr, wd, noise, batch_size, seed"),
    ("unknown kind", _with("kind", "transformer"), "kind", "allowed: isotropic"),
    ("non-positive lr", _with("grids.0.axes.lr", [0.01, 0.0]), "grids[0].axes.lr", "lr must be > 0"),
    ("negative lr in range", _with("grids.0.axes.lr", {"log": [-0.1, 0.1, 3]}), "grids[0].axes.lr", "must be > 0"),
    ("empty axis", _with("grids.0.axes.wd", []), "grids[0].axes.wd", "empty grid"),
    ("empty range", _with("grids.0.axes.lr", {"log": [0.01, 0.1, 0]}), "grids[0].axes.lr", "empty grid"),
    ("no grids", _with("grids", []), "grids", "non-empty"),
    ("wd under sphere", _with("grids.1.axes.wd", [0.1]), "grids[1].axes.wd", "not valid for kind 'isotropic' with protocol 'sphere'"),
    ("radius under elr", _with("grids.0.axes.radius", [1.0]), "grids[0].axes.radius", "allowed axes"),
    ("missing wd under elr", _with("grids.0.axes", {"lr": [0.1]}), "grids[0].axes", "'wd' is required"),
    ("unknown protocol", _with("grids.0.protocol", "adam"), "grids[0].protocol", "allowed: sphere, elr, lr"),
    ("unknown field", _with("stepz", 10), "stepz", "allowed fields"),
    ("zero steps", _with("steps", 0), "steps", "greater than or equal to 1"),
    ("unknown kind parameter", _with("params", {"dimension": 3}), "params.dimension", "allowed: dim"),
    ("bad dim", _with("params", {"dim": 1}), "params.dim", "greater than or equal to 2"),
    ("string value", _with("grids.0.axes.lr", ["fast"]), "grids[0].axes.lr", "finite numbers"),
]


@pytest.mark.parametrize("case, data, path, words", INVALID, ids=[c[0] for c in INVALID])
def test_load_rejects_invalid_spec(case, data, path, words):
    with pytest.raises(SpecError) as error:
        load(data)
    message = str(error.value)
    assert f": {path}:" in message or message.endswith(path) or f" {path}: " in message, message
    assert words in message


def test_yaml_syntax_error_names_line(tmp_path):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: broken\nkind: isotropic\nsteps: [1, 2\nreplicas: 4\n")
    with pytest.raises(SpecError) as error:
        load(spec)
    assert str(spec) in str(error.value)
    assert "YAML syntax error at line" in str(error.value)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(SpecError) as error:
        load(tmp_path / "nowhere.yaml")
    assert "nowhere.yaml" in str(error.value)
    assert "file not found" in str(error.value)


def test_unreadable_file_names_path(tmp_path):
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(SpecError) as error:
        load(folder)
    assert "cannot read the file" in str(error.value)


def test_ranges_expand_inclusive():
    spec = load(VALID)
    assert spec.grids[0].axes["lr"] == pytest.approx([0.01, 10**-1.5, 0.1])
    assert spec.grids[1].axes["radius"] == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_point_ids_stable_across_loads():
    first = [p.point_id for p in expand(load(VALID))]
    second = [p.point_id for p in expand(load(copy.deepcopy(VALID)))]
    assert first == second
    assert len(set(first)) == len(first)


def test_point_ids_ignore_name_and_grid_order():
    original = {p.point_id for p in expand(load(VALID))}
    reordered = copy.deepcopy(VALID)
    reordered["name"] = "another-name"
    reordered["grids"] = list(reversed(reordered["grids"]))
    assert {p.point_id for p in expand(load(reordered))} == original


def test_point_ids_change_with_settings():
    original = {p.point_id for p in expand(load(VALID))}
    longer = _with("steps", 200)
    assert not original & {p.point_id for p in expand(load(longer))}
    one_more_wd = _with("grids.0.axes.wd", [0.01, 0.1, 1.0])
    changed = {p.point_id for p in expand(load(one_more_wd))}
    assert original < changed


def test_chunks_stable_and_homogeneous():
    spec = load(_with("chunk_size", 4))
    chunks = chunk(expand(spec), spec.chunk_size)
    again = chunk(expand(load(_with("chunk_size", 4))), 4)
    assert [c.chunk_id for c in chunks] == [c.chunk_id for c in again]
    for part in chunks:
        assert len(part.points) <= 4
        assert len({p.protocol for p in part.points}) == 1


def test_bundled_search_spaces_load():
    for path in sorted((REPO / "search_spaces").glob("*.yaml")):
        spec = load(path)
        assert expand(spec), path


@pytest.mark.parametrize("case, data, path, words", INVALID[:6], ids=[c[0] for c in INVALID[:6]])
def test_cli_rejects_invalid_spec_before_starting(tmp_path, case, data, path, words):
    import ray

    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(data))
    storage = tmp_path / "runs"
    ray_was_running = ray.is_initialized()  # another test's Ray may be up; the CLI must not start one
    result = CliRunner().invoke(app, ["sweep", str(spec), "--storage", str(storage)])
    assert result.exit_code == 2
    output = " ".join(result.output.split())
    assert path in output
    assert not storage.exists()
    assert ray.is_initialized() == ray_was_running


def test_cli_subprocess_reports_yaml_error(tmp_path):
    spec = tmp_path / "broken.yaml"
    spec.write_text("name: broken\ngrids:\n  - protocol: elr\n    axes: {lr: [0.1\n")
    storage = tmp_path / "runs"
    completed = subprocess.run(
        [sys.executable, "-m", "phases.cli", "sweep", str(spec), "--storage", str(storage)],
        capture_output=True, text=True, timeout=120,
    )
    assert completed.returncode == 2
    assert "YAML syntax error at line" in " ".join(completed.stderr.split())
    assert not storage.exists()


def test_error_path_counts_grids_as_written():
    # Grid 0 lists two protocols, so the error in the second grid must still name grids[1].
    data = copy.deepcopy(VALID)
    data["grids"][0]["protocol"] = ["elr", "lr"]
    data["grids"][1]["axes"]["wd"] = [0.1]
    with pytest.raises(SpecError, match=r"grids\[1\]\.axes\.wd"):
        load(data)


def test_param_error_shows_value():
    with pytest.raises(SpecError, match=r"params\.dim: .* \(got 1\)"):
        load(_with("params", {"dim": 1}))


def test_path_without_yaml_suffix(tmp_path):
    spec = tmp_path / "spec.txt"
    spec.write_text(yaml.safe_dump(VALID))
    assert load(str(spec)).name == "valid"


def test_exponent_without_sign_gets_a_hint():
    # PyYAML (YAML 1.1) reads 1.0e4 as a string, so the error shows how to write it as a number.
    text = "name: e\nkind: isotropic\nsteps: 10\ngrids: [{protocol: lr, axes: {lr: [1.0e4], wd: [0.1]}}]\n"
    with pytest.raises(SpecError, match=r"write 1\.0e\+4"):
        load(text)
