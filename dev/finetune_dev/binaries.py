"""Build and cache the local cluster's binaries from pinned Go modules.

Called by ``finetune-dev build`` and ``finetune-dev up``. Each component is built once into
``<cache>/bin/<component>-<version>/`` and marked complete by a stamp file written last, so a
second run reuses it in milliseconds. A failed build raises ``BuildError`` naming the component
and carrying the tail of its build log.

k8s.io/kubernetes and etcd cannot be built with ``go install module@version`` (their go.mod
relies on ``replace`` lines that Go ignores in a dependency), so each is built from a small
generated wrapper module that pins the staging modules explicitly.

Small programs of our own live in this repository with their own go.mod and go.sum (dev/kstatus:
Flux's health library run on our objects by the tests); they are built from that source with
``-mod=readonly``, so go.sum decides every dependency, and their version names the pinned library
plus a digest of the sources, so an edit rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from finetune_dev.paths import cache_dir, log_tail

KUBERNETES_VERSION = "v1.37.2"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
VERSITYGW_VERSION = "v1.8.0"
KUBE_SCORE_VERSION = "v1.20.0"
# Optional components: built by dev/setup.sh (the tests need them), not by `finetune-dev up`.
KUEUE_VERSION = "v0.17.0"
PROMETHEUS_VERSION = "v0.316.0"  # the Go module version of Prometheus 3.16.0
PROMETHEUS_RELEASE = "3.16.0"


class BuildError(RuntimeError):
    """A component failed to build; the message names it and shows its log tail."""


@dataclass(frozen=True)
class Component:
    """One Go module version and the binaries built from it."""

    name: str
    module: str
    version: str
    # binary name -> package import path
    binaries: dict[str, str]
    ldflags: tuple[str, ...] = ()
    # Whether the module's own go.mod needs a generated wrapper to build.
    needs_wrapper: bool = False
    # A module in this repository (with its go.mod and go.sum) instead of one fetched by version.
    source: Path | None = None
    # Go build tags (e.g. to leave out code the local cluster never runs).
    tags: tuple[str, ...] = ()

    @property
    def directory(self) -> Path:
        return cache_dir() / "bin" / f"{self.name}-{self.version}"

    def path(self, binary: str) -> Path:
        return self.directory / binary

    @property
    def complete(self) -> bool:
        return (self.directory / ".complete").exists() and all(self.path(b).exists() for b in self.binaries)


def _kubernetes_ldflags(version: str) -> tuple[str, ...]:
    major, minor = version.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return tuple(flags)


KUBERNETES = Component(
    name="kubernetes",
    module="k8s.io/kubernetes",
    version=KUBERNETES_VERSION,
    binaries={
        "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
        "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
        "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
        "kubectl": "k8s.io/kubernetes/cmd/kubectl",
    },
    ldflags=_kubernetes_ldflags(KUBERNETES_VERSION),
    needs_wrapper=True,
)
ETCD = Component(
    name="etcd",
    module="go.etcd.io/etcd/server/v3",
    version=ETCD_VERSION,
    binaries={"etcd": "go.etcd.io/etcd/server/v3"},
    needs_wrapper=True,
)
HELM = Component(
    name="helm",
    module="helm.sh/helm/v3",
    version=HELM_VERSION,
    binaries={"helm": "helm.sh/helm/v3/cmd/helm"},
    ldflags=(f"-X helm.sh/helm/v3/internal/version.version={HELM_VERSION}",),
)
VERSITYGW = Component(
    name="versitygw",
    module="github.com/versity/versitygw",
    version=VERSITYGW_VERSION,
    binaries={"versitygw": "github.com/versity/versitygw/cmd/versitygw"},
)

# Static checks of the chart's and the training pods' manifests (tests/integration/test_kube_score.py).
KUBE_SCORE = Component(
    name="kube-score",
    module="github.com/zegl/kube-score",
    version=KUBE_SCORE_VERSION,
    binaries={"kube-score": "github.com/zegl/kube-score/cmd/kube-score"},
    ldflags=(f"-X main.version={KUBE_SCORE_VERSION}",),
)


def _source_version(source: Path, pinned_module: str) -> str:
    """``pinned_module``'s version in ``source``/go.mod plus a digest of the module's files."""
    try:
        files = sorted(p for p in source.iterdir() if p.suffix in (".go", ".mod", ".sum"))
        gomod = (source / "go.mod").read_text()
    except FileNotFoundError:
        return "no-source"  # an installed copy of finetune_dev without the repository
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    pinned = re.search(rf"^\s*{re.escape(pinned_module)} (v\S+)", gomod, re.M)
    return f"{pinned.group(1) if pinned else 'unpinned'}-{digest.hexdigest()[:8]}"


KSTATUS_SOURCE = Path(__file__).resolve().parents[1] / "kstatus"
KSTATUS = Component(
    name="kstatus",
    module="finetune.dev/dev/kstatus",
    version=_source_version(KSTATUS_SOURCE, "sigs.k8s.io/cli-utils"),
    binaries={"kstatus": "."},
    source=KSTATUS_SOURCE,
)

# Kueue's controller manager, run against the local cluster by the Kueue integration tests
# (tests/integration/kueue_env.py). No replace directives: a plain `go get` pins it.
KUEUE = Component(
    name="kueue",
    module="sigs.k8s.io/kueue",
    version=KUEUE_VERSION,
    binaries={"kueue": "sigs.k8s.io/kueue/cmd/kueue"},
    ldflags=(f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_VERSION}",),
)

# Prometheus and promtool, for the monitoring tests (tests/integration/test_prometheus.py).
# Only Kubernetes service discovery is compiled in (`remove_all_sd` + `enable_kubernetes_sd`: the
# cloud providers' SDKs are most of the build); without the `builtinassets` tag the web UI is not
# embedded (its assets are not in the Go module), which the HTTP API does not need.
PROMETHEUS = Component(
    name="prometheus",
    module="github.com/prometheus/prometheus",
    version=PROMETHEUS_VERSION,
    binaries={
        "prometheus": "github.com/prometheus/prometheus/cmd/prometheus",
        "promtool": "github.com/prometheus/prometheus/cmd/promtool",
    },
    ldflags=(f"-X github.com/prometheus/common/version.Version={PROMETHEUS_RELEASE}",),
    tags=("remove_all_sd", "enable_kubernetes_sd"),
)


# What `finetune-dev up` needs; OPTIONAL only what some tests run (built by dev/setup.sh).
COMPONENTS: tuple[Component, ...] = (KUBERNETES, ETCD, HELM, VERSITYGW, KSTATUS, KUBE_SCORE)
OPTIONAL_COMPONENTS: tuple[Component, ...] = (KUEUE, PROMETHEUS)


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
        GOFLAGS="-mod=mod -buildvcs=false",
        GOCACHE=str(cache_dir() / "go-build"),  # removed once every component is built
    )
    # Keep the module cache where Go keeps it by default (shared with other projects) unless
    # the caller chose one; it is outside the repository either way.
    return env


def _run(cmd: list[str], *, cwd: Path, log: Path, component: str) -> None:
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        result = subprocess.run(cmd, cwd=cwd, env=_go_env(), stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise BuildError(
            f"building {component} failed (exit {result.returncode}) running "
            f"{' '.join(cmd[:3])}...; log {log}:\n{log_tail(log)}"
        )


def _staging_replaces(component: Component, *, workdir: Path, log: Path) -> list[str]:
    """The ``replace`` lines that pin k8s.io staging modules to the release's v0.X.Y tags."""
    _run(
        ["go", "mod", "download", "-json", f"{component.module}@{component.version}"],
        cwd=workdir,
        log=log,
        component=component.name,
    )
    gomod = _module_cache() / "cache/download" / component.module / "@v" / f"{component.version}.mod"
    staging = sorted(set(re.findall(r"^\s+(k8s\.io/[\w.-]+) v0\.0\.0$", gomod.read_text(), re.M)))
    if not staging:
        raise BuildError(f"building {component.name}: no staging modules found in {gomod}")
    staging_version = "v0." + component.version.lstrip("v").split(".", 1)[1]
    return [f"\t{m} => {m} {staging_version}" for m in staging]


def _module_cache() -> Path:
    out = subprocess.run(
        ["go", "env", "GOMODCACHE"], env=_go_env(), capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip())


def _write_wrapper(component: Component, *, workdir: Path, log: Path) -> None:
    replaces: list[str] = []
    if component.module == "k8s.io/kubernetes":
        replaces = _staging_replaces(component, workdir=workdir, log=log)
    imports = "\n".join(f'\t_ "{pkg}"' for pkg in sorted(set(component.binaries.values())))
    gomod = f"module finetune.dev/localcluster/{component.name}\n\ngo 1.26\n\n"
    gomod += f"require {component.module} {component.version}\n"
    if replaces:
        gomod += "\nreplace (\n" + "\n".join(replaces) + "\n)\n"
    (workdir / "go.mod").write_text(gomod)
    # A tools file so `go mod tidy` keeps the main packages' dependencies.
    (workdir / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{imports}\n)\n")
    _run(["go", "mod", "tidy", "-e"], cwd=workdir, log=log, component=component.name)


def build(component: Component, *, force: bool = False) -> Path:
    """Build ``component`` into its cache directory unless it is already complete."""
    if component.complete and not force:
        return component.directory
    log = _fresh_log(component)
    staging = _fresh_staging(component)
    if component.source is not None:
        # A module of this repository, built in place: go.sum pins every dependency.
        return _go_build(component, cwd=component.source, staging=staging, log=log, flags=("-mod=readonly",))
    workdir = cache_dir() / "src" / f"{component.name}-{component.version}"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    if component.needs_wrapper:
        _write_wrapper(component, workdir=workdir, log=log)
    else:
        (workdir / "go.mod").write_text(f"module finetune.dev/localcluster/{component.name}\n\ngo 1.26\n")
        _run(
            ["go", "get", f"{component.module}@{component.version}"],
            cwd=workdir,
            log=log,
            component=component.name,
        )
    return _go_build(component, cwd=workdir, staging=staging, log=log)


def _fresh_log(component: Component) -> Path:
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"build-{component.name}-{component.version}.log"
    log.write_text("")
    return log


def _fresh_staging(component: Component) -> Path:
    staging = component.directory.with_name(component.directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _go_build(
    component: Component, *, cwd: Path, staging: Path, log: Path, flags: tuple[str, ...] = ()
) -> Path:
    """Build every binary into ``staging``, stamp it complete, and move it into place."""
    ldflags = " ".join(("-s", "-w", *component.ldflags))
    if component.tags:
        flags = (*flags, f"-tags={','.join(component.tags)}")
    for binary, package in component.binaries.items():
        _run(
            ["go", "build", *flags, "-trimpath", f"-ldflags={ldflags}", "-o", str(staging / binary), package],
            cwd=cwd,
            log=log,
            component=component.name,
        )
    (staging / ".complete").write_text(f"{component.module}@{component.version}\n")
    shutil.rmtree(component.directory, ignore_errors=True)
    staging.rename(component.directory)
    return component.directory


def build_all(*, force: bool = False, echo: bool = True, optional: bool = False) -> None:
    """Build the cluster's components; with `optional`, also OPTIONAL_COMPONENTS (after them)."""
    for component in COMPONENTS + (OPTIONAL_COMPONENTS if optional else ()):
        if echo and not component.complete:
            print(f"building {component.name} {component.version} (cached after the first time)", flush=True)
        build(component, force=force)
    if all(component.complete for component in COMPONENTS + OPTIONAL_COMPONENTS):
        _drop_build_cache()


def _drop_build_cache() -> None:
    """Remove Go's build cache once every component is built: the binaries are cached by
    version, so it only ever serves a rebuild, and it is the largest thing a fresh setup
    leaves on disk (7.7 GB after kubernetes, Kueue and Prometheus). The module cache stays:
    it is Go's own, shared with other projects, and `module_source` reads Kueue's manifests
    from it."""
    shutil.rmtree(cache_dir() / "go-build", ignore_errors=True)


def module_source(component: Component) -> Path:
    """The component's module source in Go's module cache (downloaded if missing): where
    manifests that ship with a binary live, e.g. Kueue's CRDs and webhook configuration."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{component.module}@{component.version}"],
        env=_go_env(),
        capture_output=True,
        text=True,
        cwd=cache_dir() if cache_dir().exists() else None,
    )
    if out.returncode != 0:
        raise BuildError(f"downloading {component.module}@{component.version} failed: {out.stderr.strip()}")
    return Path(json.loads(out.stdout)["Dir"])


def binary(name: str) -> Path:
    """Path of a built binary by name (e.g. ``kube-apiserver``); raises if not built yet."""
    for component in COMPONENTS + OPTIONAL_COMPONENTS:
        if name in component.binaries:
            if not component.complete:
                raise BuildError(
                    f"{component.name} {component.version} is not built: run `finetune-dev build`"
                )
            return component.path(name)
    raise KeyError(name)


if __name__ == "__main__":
    # Needs only the standard library, so dev/setup.sh runs it before the virtualenv exists
    # (in parallel with pip): PYTHONPATH=dev python3 -m finetune_dev.binaries
    build_all(optional=True)
