"""The files in cluster/ and the Dockerfile: valid YAML, valid phases commands, matching versions."""

from __future__ import annotations

import re
import shlex

import pytest
import typer
import yaml
from packaging.requirements import Requirement

from phases.cli import app
from phases.jobs import project_dependencies
from phases.spec import load
from tests.conftest import REPO

FILES = [REPO / "cluster" / "aws-gpu.yaml", REPO / "cluster" / "rayjob.yaml", REPO / "Dockerfile", REPO / "cluster" / "README.md"]
COMMAND = re.compile(r"\bphases (sweep|submit|jobs|track|fit)\b[^\n`\"]*")


def _phases_commands(text: str) -> list[list[str]]:
    """Return every `phases` command with arguments in the text. A bare mention such as `phases
    submit` in prose is skipped, and so is an ellipsis that stands for further options."""
    commands = [[word for word in shlex.split(match.group(0))[1:] if word != "..."] for match in COMMAND.finditer(text)]
    return [command for command in commands if len(command) > 1]


def test_cluster_yaml_parses():
    launcher = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    assert launcher["head_node_type"] in launcher["available_node_types"]
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("phases sweep ")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_commands_are_valid_phases_commands(path, monkeypatch):
    # Every `phases ...` command line in the file parses with the CLI's own options, and a spec
    # it names exists in the repository and loads.
    commands = _phases_commands(path.read_text())
    if path.name != "Dockerfile":
        assert commands, f"no phases command in {path.name}"
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.2:8275")  # commands that rely on it for --address
    group = typer.main.get_command(app)
    for arguments in commands:
        name, rest = arguments[0], arguments[1:]
        command = group.commands.get(name)
        assert command is not None, arguments
        if hasattr(command, "commands"):  # a command group, such as `phases jobs`
            command = command.commands[rest[0]]
            rest = rest[1:]
        placeholders = [value.replace("JOB_ID", "raysubmit_x") for value in rest]
        command.make_context(name, placeholders)  # raises a usage error for an unknown option
        for value in rest:
            if value.startswith("search_spaces/"):
                load(REPO / value)


def _pins(text: str) -> dict[str, str]:
    return {match.group(1).lower(): match.group(2) for match in re.finditer(r"\b(torch|ray)(?:\[[a-z,]+\])?==([0-9][0-9.]*)", text)}


@pytest.mark.parametrize("path", [REPO / "cluster" / "aws-gpu.yaml", REPO / "Dockerfile"], ids=lambda p: p.name)
def test_installed_versions_match_project(path):
    pins = _pins(path.read_text())
    torch_pin = re.search(r"TORCH_SPEC \?= torch==([0-9.]+)", (REPO / "Makefile").read_text()).group(1)
    assert pins["torch"] == torch_pin
    requirements = {Requirement(spec).name: Requirement(spec) for spec in project_dependencies()}
    for package, version in pins.items():
        assert requirements[package].specifier.contains(version), f"{package}=={version} is outside {requirements[package]}"


def test_rayjob_matches_image_ray_version():
    job = yaml.safe_load((REPO / "cluster" / "rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == _pins((REPO / "Dockerfile").read_text())["ray"]
