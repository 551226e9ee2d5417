"""A port for a server to listen on, chosen so that nothing else takes it before the server binds it.

A port from bind(host, 0) comes from the kernel's ephemeral range, the same range every outgoing connection on the
machine draws its local port from (Ray's gRPC channels open many): between the probe and the server's own bind,
one of them can take it, and the server fails with EADDRINUSE. A port below that range is only ever taken by a
listener that asks for it by number.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10_000  # below this sit well-known services (Redis 6379, MLflow 5000, Ray 6379/8265/10001)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default where /proc does not say)."""
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1", attempts: int = 200) -> int:
    """A TCP port free on `host` ("" = every interface) now and outside the ephemeral range, so it stays free until
    a listener binds it by number. Falls back to an ephemeral port only if the range below is exhausted."""
    low, high = ephemeral_range()
    candidates = [(LOWEST, low - 1)] if low - 1 >= LOWEST else []
    candidates += [(high + 1, 65535)] if high < 65535 else []
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    rng = random.SystemRandom()
    for _ in range(attempts if candidates else 0):
        lo, hi = rng.choice(candidates)
        port = rng.randint(lo, hi)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rendezvous_address() -> tuple[str, int]:
    """This node's cluster IP and a port free on it, for the learner ranks' process-group rendezvous: a Ray task run on
    rank 0's node. It lives here because a task's worker imports the function's module: this one loads in
    milliseconds, the learner's module (DeepSpeed, the model) in about 10 s of CPU."""
    import ray

    ip = ray.util.get_node_ip_address()
    return ip, free_port(ip)
