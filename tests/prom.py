"""A real Prometheus server for tests (Debian's `prometheus` package): the shipped monitoring/prometheus/prometheus.yml
pointed at the test's targets, started on a free loopback port with its own storage dir, read through its HTTP API,
and stopped by its own pid."""

from __future__ import annotations

import math
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from ray_app.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PROM_DIR = ROOT / "monitoring" / "prometheus"
RULES = PROM_DIR / "alerts.yml"
EXAMPLE_CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "ray_app_dashboard.json"
# Ray's head writes this into its temp dir (`ray start --temp-dir`, /tmp/ray by default) and rewrites it every few
# seconds with every node's metrics endpoint.
RAY_SD_FILE = "prom_metrics_service_discovery.json"


def need(binary: str, package: str = "prometheus") -> str:
    """The binary's path, or skip: CI installs it (.ci/run), a developer's machine may not have it."""
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"`{binary}` is not installed: `apt-get install -y {package}` (Debian) ships it; .ci/run does this")
    return path


class QueryError(AssertionError):
    """Prometheus refused a query (a PromQL parse or type error) or an API call."""


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen
    log: Path

    def api(self, path: str, **params: Any) -> Any:
        """The `data` of a Prometheus API answer; any non-success answer raises with Prometheus's own message."""
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        try:
            body = r.json()
        except ValueError:
            raise QueryError(f"{path} {params}: HTTP {r.status_code}: {r.text[:500]}") from None
        if body.get("status") != "success":
            raise QueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (or scalar/string as a one-element list)."""
        data = self.api("query", query=expr)
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def values(self, expr: str) -> dict[str, float]:
        """version label -> value, for the per-version series the rules and the dashboard show."""
        return {s["metric"].get("version", ""): float(s["value"][1]) for s in self.query(expr)}

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets")["activeTargets"]


def finite(values: dict[str, float], *keys: str) -> bool:
    return all(k in values and math.isfinite(values[k]) for k in keys)


def example_config(sd_files: list[str] | None = None, static: list[str] | None = None, interval: str = "1s") -> dict:
    """The shipped prometheus.yml, with its rules by absolute path, a short interval, and the test's targets.

    The scrape timeout is the interval (the most Prometheus allows): its own default, 10 s capped at the interval,
    marked a Ray node's endpoint down on a loaded 2-core machine, where one scrape can take over a second."""
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    config["global"] = {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval}
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    if sd_files is not None:
        job["file_sd_configs"][0]["files"] = sd_files
    if static is not None:
        job.pop("file_sd_configs")
        job["static_configs"] = [{"targets": static}]
    return config


@contextmanager
def running_prometheus(config: dict, workdir: Path, timeout: float = 60) -> Iterator[Prometheus]:
    """`prometheus` on 127.0.0.1:<free port>, storage and log under workdir; stopped (its pid only) on exit."""
    binary = need("prometheus")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "prometheus.yml"
    conf.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    log = workdir / "prometheus.log"
    cmd = [
        binary,
        f"--config.file={conf}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    prom = Prometheus(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(prom, timeout)
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_ready(prom: Prometheus, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if prom.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {prom.process.returncode}: {prom.log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"prometheus not ready after {timeout}s: {prom.log.read_text()[-2000:]}")


def wait_for(check, timeout: float, what: str, interval: float = 0.5) -> Any:
    """check() until it returns something truthy; a QueryError or HTTP error on the way is retried, then reported."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, QueryError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
