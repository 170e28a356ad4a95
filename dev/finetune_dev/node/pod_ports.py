"""Each pod's own listening ports on the process node: a wildcard bind means the pod's IP.

On a real node every pod has its own network namespace, so two pods may both listen on
0.0.0.0:29500 — rank 0 of every multi-node job does (torchrun's rendezvous store binds every
address). The process node runs pods as processes in the machine's network namespace, each with
its own loopback IP (127.x.0.y); without help the second such pod fails with EADDRINUSE.

This module builds a tiny preload library (`bind()` from libc, wrapped) that turns a bind to the
IPv4 or dual-stack IPv6 wildcard address into a bind to the pod's IP (`FINETUNE_DEV_POD_IP`), which
is what a wildcard bind in a pod's namespace amounts to: the port is the pod's, reachable at the
pod's IP. Explicit addresses are left alone. The node compiles it once with the system's C
compiler into the cache (keyed by the source) and sets `LD_PRELOAD` in every container; without a
compiler it warns and pods share the machine's ports as before.

Called by the node agent (`agent.NodeAgent`); the worker passes `env(...)` into each container.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

POD_IP_ENV = "FINETUNE_DEV_POD_IP"

SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

typedef int (*bind_fn)(int, const struct sockaddr *, socklen_t);

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    static bind_fn real_bind;
    if (!real_bind) real_bind = (bind_fn)dlsym(RTLD_NEXT, "bind");
    const char *ip = getenv("FINETUNE_DEV_POD_IP");
    struct in_addr pod;
    if (ip == NULL || addr == NULL || inet_pton(AF_INET, ip, &pod) != 1)
        return real_bind(fd, addr, len);
    if (addr->sa_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        struct sockaddr_in in4;
        memcpy(&in4, addr, sizeof in4);
        if (in4.sin_addr.s_addr == htonl(INADDR_ANY)) {
            in4.sin_addr = pod;
            return real_bind(fd, (const struct sockaddr *)&in4, sizeof in4);
        }
    } else if (addr->sa_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6;
        int v6only = 0;
        socklen_t optlen = sizeof v6only;
        memcpy(&in6, addr, sizeof in6);
        if (IN6_IS_ADDR_UNSPECIFIED(&in6.sin6_addr)
            && getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &optlen) == 0 && !v6only) {
            memset(&in6.sin6_addr, 0, sizeof in6.sin6_addr);
            in6.sin6_addr.s6_addr[10] = 0xff;
            in6.sin6_addr.s6_addr[11] = 0xff;
            memcpy(&in6.sin6_addr.s6_addr[12], &pod, 4);
            return real_bind(fd, (const struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real_bind(fd, addr, len);
}
"""


def build(cache: Path) -> Path | None:
    """The preload library in `cache` (compiled once per source), or None without a C compiler."""
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:12]
    target = cache / f"pod-bind-{digest}.so"
    if target.exists():
        return target
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning(
            "no C compiler (cc): pods share the machine's ports, so two pods listening on the same "
            "port (two multi-node jobs' rendezvous) collide; install gcc to give each pod its own"
        )
        return None
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        source = Path(scratch) / "pod_bind.c"
        source.write_text(SOURCE)
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source), "-ldl"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            log.warning("could not build the pods' bind library: %s", result.stderr.strip())
            return None
        built.replace(target)  # atomic: a concurrent node sees all of it or nothing
    return target


def env(library: Path | None, pod_ip: str, inherited: str | None = None) -> dict[str, str]:
    """The container's variables that give it its own ports (none without the library)."""
    if library is None:
        return {}
    preload = f"{library}:{inherited}" if inherited else str(library)
    return {"LD_PRELOAD": preload, POD_IP_ENV: pod_ip}
