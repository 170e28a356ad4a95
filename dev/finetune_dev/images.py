"""Build the product images from the Dockerfile with buildah, without a container registry.

Called by ``python -m finetune_dev.images`` (developers; dev/images.sh, which dev/setup.sh starts
in the background; `wait_for_build` waits for that build); `podman_run` runs the built images. What it does, each step cached and skipped when done:

1. The base image: Debian bookworm with Python 3.11 from Debian packages (``mmdebstrap``),
   imported with ``podman import`` as ``localhost/finetune-base:<key>`` (the key digests the
   suite and package list). It stands in for the Dockerfile's default ``BASE_IMAGE`` (the
   official Python image), which no registry here can serve.
2. ``buildah bud --layers --isolation chroot`` of each target (``operator``, ``trainer``),
   tagged ``localhost/finetune-operator/<target>:<version>`` — the chart's default image names.
   The builds install offline from the project's wheelhouse (`finetune_dev.wheelhouse`:
   ``<cache>/wheels``, the same wheels dev/setup.sh installs the virtualenv from), mounted with
   a ``pip.conf`` pointing at it, so torch's gigabytes are downloaded once for both.

Images and layer caches live in a container storage of their own under
``<cache>/images/storage`` (``$FINETUNE_DEV_CACHE``, default ~/.cache/finetune-dev), outside
any checkout, so a warm rebuild reuses every layer whose inputs did not change. Builds run under
``nice``: the machine is shared. Needs root (chroot isolation, overlay storage) and the Debian
packages buildah, podman, mmdebstrap and runc (dev/setup.sh installs them).

Machine facts this encodes: crun refuses this VM's hybrid cgroups, so containers run with runc;
rlimits must be given explicitly and not above the current ones.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune_dev import wheelhouse
from finetune_dev.paths import cache_dir, log_tail

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("operator", "trainer")
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3.11", "python3.11-venv", "ca-certificates")
REPOSITORY = "localhost/finetune-operator"
TOOLS = {"buildah": "buildah", "podman": "podman", "mmdebstrap": "mmdebstrap", "runc": "runc"}
# What a container may open and start, at most (never above this shell's own limits).
CONTAINER_NOFILE = 1024
CONTAINER_NPROC = 1024


class ImageError(RuntimeError):
    """A tool is missing or a build step failed; the message says which and shows its log."""


def version() -> str:
    """The product version (pyproject.toml), which is also the chart's appVersion."""
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def image_name(target: str, tag: str | None = None) -> str:
    """``localhost/finetune-operator/<target>:<version>``: what the chart pulls by default."""
    return f"{REPOSITORY}/{target}:{tag or version()}"


def base_image_name() -> str:
    key = hashlib.sha256(" ".join((BASE_SUITE, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    return f"localhost/finetune-base:{BASE_SUITE}-py3.11-{key}"


def images_dir() -> Path:
    return cache_dir() / "images"


def storage_env() -> dict[str, str]:
    """Environment for buildah and podman: our own container storage under the cache dir."""
    root = images_dir()
    conf = root / "storage.conf"
    text = f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "storage"}"\nrunroot = "{root / "run"}"\n'
    if not conf.exists() or conf.read_text() != text:
        root.mkdir(parents=True, exist_ok=True)
        conf.write_text(text)
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf), "BUILDAH_ISOLATION": "chroot"}


def missing_tools() -> list[str]:
    """Debian packages to install for the image tools that are not on PATH."""
    return sorted({package for tool, package in TOOLS.items() if shutil.which(tool) is None})


@dataclass(frozen=True)
class StepResult:
    """One build step: what it made and how long it took (0 work when it was cached)."""

    what: str
    image: str
    seconds: float


def _run(cmd: Sequence[str], *, log: Path, what: str) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        code = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=storage_env(), check=False
        ).returncode
    if code != 0:
        raise ImageError(f"{what} failed (exit {code}); log {log}:\n{log_tail(log, 40)}")


def image_exists(name: str) -> bool:
    return (
        subprocess.run(
            ["podman", "image", "exists", name], env=storage_env(), capture_output=True, check=False
        ).returncode
        == 0
    )


def build_base() -> StepResult:
    """The base image from Debian packages (mmdebstrap), once per package list."""
    name = base_image_name()
    start = time.monotonic()
    if not image_exists(name):
        tar = images_dir() / "base.partial.tar"  # mmdebstrap picks the format by the suffix
        tar.unlink(missing_ok=True)
        log = images_dir() / "logs" / "base.log"
        _run(
            [
                "nice",
                "mmdebstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                BASE_SUITE,
                str(tar),
            ],
            log=log,
            what="mmdebstrap of the base image",
        )
        _run(
            ["podman", "import", "--change", 'CMD ["python3.11"]', str(tar), name],
            log=images_dir() / "logs" / "base-import.log",
            what="podman import of the base image",
        )
        tar.unlink(missing_ok=True)
    return StepResult("base", name, time.monotonic() - start)


def pip_conf() -> Path:
    """/etc/pip.conf inside the builds: install from the wheelhouse only."""
    conf = images_dir() / "pip.conf"
    text = "[global]\nno-index = true\nfind-links = /wheelhouse\n"
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)
    return conf


def build_target(target: str, *, base: str, revision: str = "unknown") -> StepResult:
    """One Dockerfile target, with layer caching; tagged `image_name(target)`."""
    if target not in TARGETS:
        raise ImageError(f"unknown image target {target!r}; known: {', '.join(TARGETS)}")
    name = image_name(target)
    start = time.monotonic()
    _run(
        [
            "nice", "buildah", "bud",
            "--isolation", "chroot",
            "--layers",
            "--network", "host",
            "--ulimit", f"nofile={CONTAINER_NOFILE}:{CONTAINER_NOFILE}",
            "--ulimit", f"nproc={CONTAINER_NPROC}:{CONTAINER_NPROC}",
            "--target", target,
            "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", f"VERSION={version()}",
            "--build-arg", f"REVISION={revision}",
            "--volume", f"{wheelhouse.wheelhouse_dir()}:/wheelhouse:ro",
            "--volume", f"{pip_conf()}:/etc/pip.conf:ro",
            "--tag", name,
            "--file", str(ROOT / "Dockerfile"),
            str(ROOT),
        ],
        log=images_dir() / "logs" / f"{target}.log",
        what=f"buildah build of the {target} image",
    )  # fmt: skip
    return StepResult(target, name, time.monotonic() - start)


def build_all(targets: Sequence[str] = TARGETS, *, base_only: bool = False) -> list[StepResult]:
    """The base image, then each target in turn (they share the base and its layers)."""
    missing = missing_tools()
    if missing:
        raise ImageError(
            f"building images needs {', '.join(missing)} (Debian packages: apt-get install {' '.join(missing)})"
        )
    if os.geteuid() != 0:
        raise ImageError("building images here needs root (buildah chroot isolation on overlay storage)")
    base = build_base()
    if base_only:
        return [base]
    try:
        wheels = StepResult("wheels", str(wheelhouse.wheelhouse_dir()), wheelhouse.fill())
    except wheelhouse.WheelhouseError as exc:
        raise ImageError(str(exc)) from exc
    return [base, wheels, *(build_target(t, base=base.image, revision=_git_revision()) for t in targets)]


def _git_revision() -> str:
    result = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() or "unknown"


def build_lock() -> Path:
    """Held by dev/images.sh for the whole of a build (the one dev/setup.sh starts)."""
    return images_dir() / "build.lock"


def build_status() -> Path:
    """``<exit code> <checkout>``, written by dev/images.sh when its build ends."""
    return images_dir() / "build.status"


def build_log() -> Path:
    return images_dir() / "logs" / "build.log"


def wait_for_build() -> list[StepResult]:
    """The images for this checkout: waits for the background build dev/setup.sh started (its
    lock), raises with its log's tail if it failed for this checkout, then `build_all` (every
    layer a cache hit when that build was of this checkout's sources)."""
    images_dir().mkdir(parents=True, exist_ok=True)
    with build_lock().open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            code, _, checkout = build_status().read_text().strip().partition(" ")
        except FileNotFoundError:
            code, checkout = "0", ""
        if code != "0" and Path(checkout) == ROOT:
            raise ImageError(
                f"the image build dev/setup.sh started failed (exit {code}); log {build_log()}:\n"
                f"{log_tail(build_log(), 40)}"
            )
        return build_all()


def podman_run(
    image: str,
    args: Sequence[str] = (),
    *,
    env: Mapping[str, str] | None = None,
    user: str = "10001:10001",
    read_only: bool = True,
    volumes: Sequence[str] = (),
    name: str | None = None,
    detach: bool = False,
    entrypoint: str | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `image` as a pod would: unprivileged, read-only root (writable tmpfs /tmp), all
    capabilities dropped, on the host network (the test's loopback servers)."""
    nofile = min(CONTAINER_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    nproc = min(CONTAINER_NPROC, resource.getrlimit(resource.RLIMIT_NPROC)[0])
    cmd = [
        "podman", "--runtime", "runc", "run",
        "--network", "host",
        "--user", user,
        "--cap-drop", "all",
        "--security-opt", "no-new-privileges",
        "--ulimit", f"nofile={nofile}:{nofile}",
        "--ulimit", f"nproc={nproc}:{nproc}",
    ]  # fmt: skip
    if read_only:
        cmd += ["--read-only", "--read-only-tmpfs"]
    if name:
        cmd += ["--name", name]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    cmd += ["--detach"] if detach else ["--rm"]
    for key, value in (env or {}).items():
        cmd += ["--env", f"{key}={value}"]
    for volume in volumes:
        cmd += ["--volume", volume]
    cmd += [image, *args]
    return subprocess.run(
        cmd, env=storage_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def podman(*args: str, timeout: float | None = 60) -> subprocess.CompletedProcess[str]:
    """Any other podman command on our storage (logs, rm, inspect)."""
    return subprocess.run(
        ["podman", "--runtime", "runc", *args],
        env=storage_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_dev.images", description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"default: all of {', '.join(TARGETS)}")
    parser.add_argument("--base-only", action="store_true", help="only the base image (no wheelhouse needed)")
    args = parser.parse_args(argv)
    try:
        for step in build_all(args.targets or TARGETS, base_only=args.base_only):
            print(f"images: {step.what:<8} {step.image}  ({step.seconds:.0f} s)")
    except ImageError as exc:
        print(f"images: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
