"""``finetune-dev``: build, start, stop and inspect the local Kubernetes cluster.

    finetune-dev build            build the pinned control-plane binaries (cached by version)
    finetune-dev up               start everything (idempotent), print how to use it
    finetune-dev status           each component's pid and health
    finetune-dev env              shell exports: eval "$(finetune-dev env)" (KUBECONFIG, AWS_*, and
                                  PATH with kubectl, helm and the virtualenv's bin/: kubectl finetune)
    finetune-dev down [--purge]   stop everything; --purge also deletes the cluster's state

The state directory (``$FINETUNE_DEV_STATE``, default ~/.local/state/finetune-dev) and the port
base (``$FINETUNE_DEV_PORT_BASE``, default 16400) select which cluster a command talks to.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from finetune_dev import binaries
from finetune_dev.cluster import DEFAULT_PORT_BASE, Cluster, ClusterError, Ports
from finetune_dev.paths import state_dir


def cluster_from_env() -> Cluster:
    base = int(os.environ.get("FINETUNE_DEV_PORT_BASE", DEFAULT_PORT_BASE))
    return Cluster(root=state_dir(), ports=Ports(base))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune-dev", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "build", help="build the control-plane binaries and the tests' Kueue and Prometheus (cached)"
    )
    sub.add_parser("up", help="start the cluster (safe to re-run)")
    sub.add_parser("status", help="show each component's health")
    sub.add_parser("env", help="print shell exports: KUBECONFIG, S3, PATH (kubectl, helm, kubectl finetune)")
    down = sub.add_parser("down", help="stop the cluster")
    down.add_argument("--purge", action="store_true", help="also delete the cluster's state directory")
    args = parser.parse_args(argv)
    cluster = cluster_from_env()
    try:
        if args.command == "build":
            binaries.build_all(optional=True)
            for component in binaries.COMPONENTS + binaries.OPTIONAL_COMPONENTS:
                print(f"{component.name:12} {component.version:10} {component.directory}")
        elif args.command == "up":
            cluster.up()
            print(f'use it: eval "$({Path(sys.argv[0]).name} env)"; kubectl get nodes')
        elif args.command == "status":
            rows = cluster.status()
            for name, pid, state in rows:
                print(f"{name:24} {pid:>8}  {state}")
            return 0 if all(state == "healthy" for _, _, state in rows) else 1
        elif args.command == "env":
            env = cluster.env()
            # kubectl and helm, then this virtualenv's bin/ (kubectl-finetune, finetune-dev).
            venv_bin = Path(sys.executable).parent
            env["PATH"] = f"{env.pop('FINETUNE_DEV_BIN')}:{venv_bin}:{os.environ.get('PATH', '')}"
            for key, value in env.items():
                print(f"export {key}={shlex.quote(value)}")
        elif args.command == "down":
            cluster.down(purge=args.purge)
    except (ClusterError, binaries.BuildError) as exc:
        print(f"finetune-dev {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
