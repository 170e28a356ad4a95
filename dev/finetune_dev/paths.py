"""Where the local cluster keeps its files, and small helpers to show logs in errors.

Everything lives outside the repository: binaries under the cache directory (keyed by version,
kept across runs), a running cluster's state under the state directory (recreated by ``up``).
"""

from __future__ import annotations

import os
from pathlib import Path


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
