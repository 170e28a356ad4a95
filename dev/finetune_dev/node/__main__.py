"""``python -m finetune_dev.node``: start the process node (``finetune-dev up`` does).

Checks that mount and UTS namespaces work, then starts the kubelet API, the `kubernetes`
Service forwarder and the node agent, and runs until SIGTERM/SIGINT (which stops every pod's
processes first).
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path

from kubernetes import client, config

from finetune_dev.node.agent import NodeAgent
from finetune_dev.node.kubelet_api import serve_kubelet_api
from finetune_dev.node.service_proxy import serve_kubernetes_service

log = logging.getLogger("process-node")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_dev.node",
        description="The process node: a Kubernetes Node whose pods run as local processes.",
    )
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--node-name", default="process-node")
    parser.add_argument("--kubelet-port", type=int, required=True)
    parser.add_argument("--apiserver-port", type=int, required=True)
    parser.add_argument("--pki-dir", type=Path, required=True)
    parser.add_argument("--pod-network", default="127.0", help="first two octets of pod IPs")
    parser.add_argument(
        "--kubernetes-service-ip", default=None, help="serve the kubernetes Service here (port 443)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")
    if subprocess.run(["unshare", "--mount", "--uts", "true"], capture_output=True).returncode != 0:
        sys.exit("process node: needs mount and UTS namespaces (run as root, or where `unshare -m -u` works)")
    api = config.new_client_from_config(config_file=args.kubeconfig)
    agent = NodeAgent(
        core=client.CoreV1Api(api),
        node_name=args.node_name,
        state_dir=args.state_dir,
        kubelet_port=args.kubelet_port,
        apiserver_port=args.apiserver_port,
        pod_network=args.pod_network,
        kubernetes_service_ip=args.kubernetes_service_ip,
    )

    def stop(signum: int, frame: object) -> None:
        agent.shutdown()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    serve_kubelet_api(agent, args.kubelet_port, args.pki_dir)
    if args.kubernetes_service_ip:
        serve_kubernetes_service(args.kubernetes_service_ip, args.apiserver_port, agent.stopping)
    log.info("process node %s starting", args.node_name)
    agent.run()


if __name__ == "__main__":
    main()
