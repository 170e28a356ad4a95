"""Where the local cluster keeps its files, and small helpers to show logs in errors.

Everything lives outside the repository: binaries under the cache directory (keyed by version,
kept across runs), a running cluster's state under the state directory (recreated by ``up``).
`checkout_problem` says whether the process node can run pods from a checkout at all;
dev/setup.sh asks it (``python -m finetune_dev.paths CHECKOUT``) before installing anything.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Where the project's own pods mount volumes: the operator chart's /tmp; the trainer's config,
# cache, /tmp and /dev/shm. The process node runs every container from the checkout's
# virtualenv, so inside those pods a checkout under one of these paths is hidden by the volume.
POD_MOUNT_PATHS = ("/tmp", "/dev/shm", "/etc/finetune", "/var/cache/finetune")


def checkout_problem(checkout: Path) -> str | None:
    """Why the process node cannot run pods from the checkout at `checkout`, or None."""
    real = checkout.resolve()
    for mount in POD_MOUNT_PATHS:
        if real == Path(mount) or Path(mount) in real.parents:
            return (
                f"this checkout is at {real}, under {mount}: the project's pods mount a volume at {mount}, "
                f"which hides the checkout's .venv inside them, because the local cluster's process node runs "
                f"every container from that virtualenv (the operator's pod would crash-loop). "
                f"Clone or move the repository elsewhere, e.g. ~/finetune-operator, and run make there."
            )
    return None


def cache_dir() -> Path:
    """Built binaries, Go build cache and build logs: ``$FINETUNE_DEV_CACHE`` or ~/.cache/finetune-dev."""
    return Path(os.environ.get("FINETUNE_DEV_CACHE", Path.home() / ".cache" / "finetune-dev"))


def state_dir() -> Path:
    """A running cluster's data, certificates, logs and kubeconfig: ``$FINETUNE_DEV_STATE``."""
    return Path(os.environ.get("FINETUNE_DEV_STATE", Path.home() / ".local" / "state" / "finetune-dev"))


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"    (no log at {path})"
    return "\n".join("    " + line for line in text[-lines:])


if __name__ == "__main__":
    problem = checkout_problem(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
    if problem:
        sys.exit(f"setup: {problem}")
