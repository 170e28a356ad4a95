"""The process node's pod ports (`finetune_dev.node.pod_ports`): with the preload library two
pods both listen on the wildcard address and the same port, each on its own IP, as pods in their
own network namespaces do (rank 0 of two multi-node jobs, each with torchrun's store on 29500)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from finetune_dev.node import pod_ports

LISTEN = """
import json, socket, sys
family, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sock = socket.socket(socket.AF_INET6 if family == "6" else socket.AF_INET)
if family == "6":
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
sock.bind((host, port))
sock.listen()
print(json.dumps(sock.getsockname()[:2]), flush=True)
sys.stdin.read()  # hold the port until the test closes stdin
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _listen(
    library: Path, pod_ip: str, family: str, host: str, port: int
) -> tuple[subprocess.Popen[str], list[object]]:
    env = {"PATH": "/usr/bin:/bin", **pod_ports.env(library, pod_ip)}
    proc = subprocess.Popen(
        [sys.executable, "-c", LISTEN, family, host, str(port)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.communicate()[1]
    return proc, json.loads(line)


def test_two_pods_listen_on_the_wildcard_address_and_the_same_port(tmp_path: Path) -> None:
    library = pod_ports.build(tmp_path)
    assert library is not None, "the process node needs a C compiler (cc) for pods' own ports"
    assert pod_ports.build(tmp_path) == library, "built once, then taken from the cache"
    port = _free_port()
    first, first_addr = _listen(library, "127.0.0.21", "4", "0.0.0.0", port)
    second, second_addr = _listen(library, "127.0.0.22", "6", "::", port)  # dual-stack wildcard
    explicit, explicit_addr = _listen(library, "127.0.0.23", "4", "127.0.0.24", port)
    try:
        assert first_addr == ["127.0.0.21", port]
        assert second_addr == ["::ffff:127.0.0.22", port]
        assert explicit_addr == ["127.0.0.24", port], "an explicit address is left alone"
        with socket.create_connection(("127.0.0.22", port), timeout=5):
            pass  # the second pod's port is reachable at its IP
    finally:
        for proc in (first, second, explicit):
            proc.communicate("")


def test_without_a_library_a_container_gets_no_variables() -> None:
    assert pod_ports.env(None, "127.0.0.21") == {}
    assert pod_ports.env(Path("/c/pod.so"), "127.0.0.21", "/x/other.so") == {
        "LD_PRELOAD": "/c/pod.so:/x/other.so",
        "FINETUNE_DEV_POD_IP": "127.0.0.21",
    }
