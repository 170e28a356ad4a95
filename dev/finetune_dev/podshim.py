"""Inside a pod's private mount and UTS namespaces: mount its volumes, set its hostname, exec.

The process node starts each container as
``unshare --mount --uts --propagation private -- python -m finetune_dev.podshim PLAN.json``.
This module bind-mounts each prepared volume directory (and the pod's /etc/hosts and termination
message file) at its mount path, sets the hostname, changes directory and replaces itself with
the container's command, so the container's PID is the one the node signals.

Mount points that do not exist on the machine are created (empty directories or files); the
node leaves them in place, because another pod's namespace may be using the same path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def _mount(source_fd: int, is_dir: bool, target: str, read_only: bool) -> None:
    target_path = Path(target)
    if is_dir:
        target_path.mkdir(parents=True, exist_ok=True)
    else:
        target_path.parent.mkdir(parents=True, exist_ok=True)
        if not target_path.exists():
            target_path.touch()
    # Mount through the descriptor opened before any mount: a volume mounted over, say, /tmp
    # must not hide the sources of the mounts that follow it.
    subprocess.run(
        ["mount", "--bind", f"/proc/self/fd/{source_fd}", target], check=True, pass_fds=(source_fd,)
    )
    if read_only:
        subprocess.run(["mount", "-o", "remount,bind,ro", target], check=True)


def hidden_paths(search_path: str, mount_targets: list[str]) -> list[tuple[str, str]]:
    """(PATH entry, volume mount path) for each PATH entry a volume is mounted over. The node
    runs containers from the host's Python environment: a volume at, say, /tmp hides a checkout
    that lives under /tmp."""
    hidden = []
    for entry in filter(None, search_path.split(":")):
        for target in mount_targets:
            if entry == target or entry.startswith(target.rstrip("/") + "/"):
                hidden.append((entry, target))
                break
    return hidden


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    try:
        workdir = os.open(plan.get("workingDir") or "/", os.O_RDONLY | os.O_DIRECTORY)
        sources = [(os.open(m["source"], os.O_PATH), Path(m["source"]).is_dir()) for m in plan["mounts"]]
        for (fd, is_dir), mount in zip(sources, plan["mounts"], strict=True):
            _mount(fd, is_dir, mount["target"], mount.get("readOnly", False))
            os.close(fd)
        socket.sethostname(plan["hostname"])
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"process node: could not prepare the container's namespace: {exc}", file=sys.stderr)
        sys.exit(128)
    os.fchdir(workdir)  # opened before the mounts, for the same reason as the sources
    os.close(workdir)
    argv = plan["command"]
    try:
        os.execvpe(argv[0], argv, plan["env"])
    except OSError as exc:
        # Like a container runtime: a command that cannot be started exits 127 (not found) or 126.
        print(f"process node: cannot run {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        targets = [m["target"] for m in plan["mounts"]]
        for entry, target in hidden_paths(plan["env"].get("PATH", ""), targets):
            print(
                f"process node: the volume mounted at {target} hides {entry} (the host's Python "
                "environment the node runs containers from): keep the checkout outside that path",
                file=sys.stderr,
            )
        sys.exit(127 if isinstance(exc, FileNotFoundError) else 126)


if __name__ == "__main__":
    main()
