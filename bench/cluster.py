"""Serving on the multi-node cluster (ray_app/cluster.py) while a worker node is lost: serve_config.yaml deployed
with one Classifier replica per node (Serve's `max_replicas_per_node: 1`), a closed-loop HTTP load through the proxy
on the head, then the worker node SIGKILLed (`kill_node`) and restarted (`restart_node`) `--kills` times. The table
compares the load before the first kill (the baseline) with the load after the last restart, and counts the failed
requests and how long after each kill they came.

    sudo .venv/bin/python bench/cluster.py                              # 2 kills, 20 s of load around each
    sudo .venv/bin/python bench/cluster.py --kills 5 --phase-s 60 --callers 8

It builds its own cluster (root: network namespaces), registers the tiny random model (configs/smoke.yaml's) in the
cluster's MLflow and removes everything at the end. tests/test_cluster.py runs the same drill once, short.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ROOT, Row, cluster_parser, fresh_cluster, median, parse, report

from ray_app.cluster import Cluster, Killed, kill_node, restart_node
from ray_app.local import BIN

os.environ.setdefault("RAY_AUTH_MODE", "token")  # the head keeps token authentication; a named address opts in
APP, DEPLOYMENT = "classifier", "Classifier"


# ---- deploying on the cluster ----------------------------------------------------------------------------------


def register_champion(cluster: Cluster, base_model: Path, work: Path) -> tuple[Any, str, str]:
    """A real version of the tiny model in the cluster's MLflow, aliased champion: (config, name, version)."""
    import mlflow

    from ray_app.config_loader import load_config
    from ray_app.runtime import setup_mlflow
    from tests.serving import register_version

    name = f"cluster-serve-{uuid.uuid4().hex[:6]}"
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [f"model.name_or_path={base_model}", f"mlflow.tracking_uri={cluster.mlflow_url}",
         f"mlflow.experiment=cluster-serve-{uuid.uuid4().hex[:6]}", f"registry.model_name={name}"],
    )  # fmt: skip
    setup_mlflow(cfg)
    version = register_version(cfg, base_model, 1, work)
    mlflow.MlflowClient(cluster.mlflow_url).set_registered_model_alias(name, "champion", version)
    return cfg, name, version


def deploy_on_cluster(cluster: Cluster, name: str, port: int, api_key: str, log_uri: str, work: Path) -> str:
    """serve_config.yaml through the real `serve deploy`, adapted for the cluster: the proxy (HeadOnly) on the
    head's address, two replicas that Serve itself keeps on different nodes (`max_replicas_per_node: 1`), the
    cluster's MLflow and the prediction log on the shared bucket. Returns the proxy's base URL."""
    from tests.serving import deploy_config, serve_deploy

    conf = deploy_config(
        work / "serve-cluster.yaml", port, cluster.mlflow_url, name, log_uri, api_key,
        host=cluster.head_ip, classifier={"num_replicas": 2, "max_replicas_per_node": 1},
    )  # fmt: skip
    serve_deploy(conf, cluster.dashboard_url)
    return f"http://{cluster.head_ip}:{port}"


def serve_shutdown(dashboard: str) -> None:
    """`serve shutdown`: the app and its replicas gone, their CPUs back for the next job on the cluster."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(BIN / "serve"), "shutdown", "--address", dashboard, "-y"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def replicas(dashboard: str) -> list[tuple[str, str]]:
    """(state, node IP) of each Classifier replica, as Serve's controller reports them (what `serve status` reads,
    through the dashboard: no GCS connection in this process)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    details = ServeSubmissionClient(dashboard).get_serve_details()
    app = details.get("applications", {}).get(APP) or {}
    if app.get("status") == "DEPLOY_FAILED":  # fail at once, with Serve's own message, not after a timeout
        raise RuntimeError(f"serve deploy failed: {app.get('message')}")
    deployment = app.get("deployments", {}).get(DEPLOYMENT) or {}
    return sorted((r["state"], r.get("node_ip") or "") for r in deployment.get("replicas", []))


def running_ips(dashboard: str) -> list[str]:
    return sorted(ip for state, ip in replicas(dashboard) if state == "RUNNING")


def wait_running(dashboard: str, ips: list[str], timeout: float) -> float:
    """Seconds until the RUNNING replicas are exactly on `ips` (sorted); raises past `timeout`."""
    started = time.monotonic()
    while running_ips(dashboard) != sorted(ips):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"replicas {replicas(dashboard)} after {timeout}s; wanted RUNNING on {ips}")
        time.sleep(0.5)
    return time.monotonic() - started


# ---- the load ---------------------------------------------------------------------------------------------------


@dataclass
class Shot:
    """One request: when it was sent and answered (monotonic seconds), its status (0: no HTTP answer) and, when it
    failed, the start of its body."""

    sent: float
    done: float
    status: int
    body: str = ""
    version: str = ""


@dataclass
class Load:
    """`callers` threads, each sending one /predict after the other through the proxy (a closed loop, real HTTP)."""

    base: str
    api_key: str
    callers: int = 4
    timeout_s: float = 30.0
    shots: list[Shot] = field(default_factory=list)

    def __post_init__(self) -> None:
        frame = pd.read_csv(ROOT / "data" / "projects" / "dataset.csv", keep_default_na=False)
        self.rows = frame[["title", "description"]].head(200).to_dict("records")
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.callers)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout_s + 5)

    def _run(self, caller: int) -> None:
        headers = {"X-API-Key": self.api_key}
        with httpx.Client(base_url=self.base, headers=headers, timeout=self.timeout_s) as http:
            i = caller
            while not self.stop.is_set():
                shot = self._one(http, self.rows[i % len(self.rows)])
                with self.lock:
                    self.shots.append(shot)
                i += self.callers

    @staticmethod
    def _one(http: httpx.Client, row: dict[str, str]) -> Shot:
        sent = time.monotonic()
        try:
            r = http.post("/predict", json=row)
        except httpx.HTTPError as exc:
            return Shot(sent, time.monotonic(), 0, f"{type(exc).__name__}: {exc}"[:300])
        ok = r.status_code == 200
        return Shot(
            sent, time.monotonic(), r.status_code, "" if ok else r.text[:300], r.json()["version"] if ok else ""
        )

    def between(self, start: float, end: float) -> list[Shot]:
        with self.lock:
            return [s for s in self.shots if start <= s.sent < end]


def phase_stats(shots: list[Shot], seconds: float) -> dict[str, float]:
    """Throughput and latency of the answered requests of one phase."""
    ok = sorted(s.done - s.sent for s in shots if s.status == 200)
    p99 = ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else float("nan")
    return {
        "req_s": len(ok) / seconds,
        "p50_ms": 1000 * median(ok),
        "p99_ms": 1000 * p99,
        "failed": len(shots) - len(ok),
    }


def failures(shots: list[Shot], kill: Killed) -> dict[str, Any]:
    """What failed around one kill: how many, when (seconds after the SIGKILLs, by answer time), with which status
    and body; and how many were sent after every process of the node was dead (a request the router sent to a dead
    replica). One sent between the SIGKILLs and the last death may have been accepted by the replica just before
    it died: in flight, like one sent before."""
    bad = [s for s in shots if s.status != 200]
    return {
        "sent": len(shots),
        "failed": len(bad),
        "failed_sent_after_kill": sum(s.sent > kill.gone_at for s in bad),
        "dying_ms": round(1000 * (kill.gone_at - kill.signalled_at), 1),
        "window_s": round(max((s.done - kill.signalled_at for s in bad), default=0.0), 2),
        "first_failed_at_s": round(min((s.done - kill.signalled_at for s in bad), default=0.0), 2),
        "failed_sent_at_s": sorted(round(s.sent - kill.signalled_at, 3) for s in bad),
        "statuses": dict(Counter(s.status for s in bad)),
        "bodies": sorted({s.body for s in bad})[:5],
    }


# ---- the drill ---------------------------------------------------------------------------------------------------


def node_loss(cluster: Cluster, load: Load, phase_s: float, timeout_s: float = 180) -> dict[str, Any]:
    """One loss under `load`: `phase_s` of load, the worker node SIGKILLed, Serve left to notice, the node restarted
    and the deployment waited for until it is back to one RUNNING replica on each node, `phase_s` more of load."""
    node, both = cluster.workers[0], sorted([cluster.head_ip, cluster.workers[0].ip])
    start = time.monotonic()
    time.sleep(phase_s)
    kill = kill_node(node)
    kill_at = kill.signalled_at
    noticed = wait_running(cluster.dashboard_url, [cluster.head_ip], timeout_s)
    restart_at = time.monotonic()
    restart_node(cluster, node, 1)
    restored = wait_running(cluster.dashboard_url, both, timeout_s)
    back_at = time.monotonic()
    time.sleep(phase_s)
    end = time.monotonic()
    before = load.between(start, kill_at)
    in_flight = [s for s in before if s.done > kill_at]  # sent before the kill, answered (or not) after it
    around = in_flight + load.between(kill_at, back_at)
    return {
        "processes_killed": kill.processes,
        "noticed_s": round(noticed, 1),
        "restart_s": round(back_at - restart_at, 1),
        "restored_s": round(back_at - kill_at, 1),
        "replica_start_s": round(restored, 1),
        "before": phase_stats([s for s in before if s.done <= kill_at], kill_at - start),
        "outage": phase_stats(around, back_at - kill_at),
        "after": phase_stats(load.between(back_at, end), end - back_at),
        **failures(around + load.between(back_at, end), kill),
    }


def drill_line(result: dict[str, Any]) -> str:
    """The one line a test prints and the bench logs per kill."""
    return (
        f"DRILL serve-node-loss: {result['sent']} requests around the kill, {result['failed']} failed "
        f"({result['failed_sent_after_kill']} sent after the node's processes were dead, {result['dying_ms']} ms after "
        f"the SIGKILLs) within {result['window_s']} s of it, statuses "
        f"{result['statuses']}; Serve saw the replica gone after {result['noticed_s']} s; 2 RUNNING replicas "
        f"again {result['restored_s']} s after the kill ({result['restart_s']} s after `ray start`); "
        f"{result['processes_killed']} processes killed"
    )


# ---- the bench ----------------------------------------------------------------------------------------------------


PER_KILL = [
    ("failed", "failed requests per kill"),
    ("failed_sent_after_kill", "... of them sent after the node was dead"),
    ("dying_ms", "SIGKILLs -> every process dead: ms"),
    ("window_s", "last failure: s after the kill"),
    ("noticed_s", "Serve sees the replica gone: s after the kill"),
    ("restart_s", "ray start -> 2 RUNNING replicas: s"),
    ("restored_s", "kill -> 2 RUNNING replicas: s"),
]


def rows_of(runs: list[dict[str, Any]]) -> list[Row]:
    """Before the first kill (baseline) against after the last restart; failures and times per kill as medians."""
    first, last = runs[0]["before"], runs[-1]["after"]
    rows: list[Row] = [
        {"metric": what, "before kill": first[key], "after restart": last[key]}
        for key, what in [("req_s", "throughput: req/s"), ("p50_ms", "latency p50: ms"), ("p99_ms", "latency p99: ms")]
    ]
    outage = median([r["outage"]["req_s"] for r in runs])
    rows.append({"metric": "throughput, kill -> restored: req/s", "before kill": None, "after restart": outage})
    for key, what in PER_KILL:
        rows.append({"metric": what, "before kill": None, "after restart": median([float(r[key]) for r in runs])})
    total = float(sum(r["failed"] for r in runs))
    rows.append({"metric": "failed requests, all kills", "before kill": None, "after restart": total})
    return rows


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """A fresh cluster, the app deployed on it, `args.kills` losses under one continuous load; all removed after."""
    from ray_app.model import make_tiny_model
    from ray_app.ports import free_port
    from tests.serving import wait_until

    key = uuid.uuid4().hex
    with fresh_cluster("rayapp-bench-cluster-") as (cluster, root):
        _, name, _ = register_champion(cluster, make_tiny_model(root / "tiny-bert"), root)
        log_uri = f"s3://{cluster.bucket}/predlog-bench"
        base = deploy_on_cluster(cluster, name, free_port(), key, log_uri, root)
        wait_until(lambda: httpx.get(f"{base}/ready", headers={"X-API-Key": key}).status_code == 200, 300, "/ready")
        wait_running(cluster.dashboard_url, [cluster.head_ip, cluster.workers[0].ip], 300)
        runs = []
        with Load(base, key, callers=args.callers) as load:
            for _ in range(args.kills):
                runs.append(node_loss(cluster, load, args.phase_s))
                print(drill_line(runs[-1]), flush=True)
        with contextlib.suppress(AssertionError):
            serve_shutdown(cluster.dashboard_url)
        return runs


def main() -> None:
    p = cluster_parser(__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=2, help="Worker-node losses, one after the other under one load")
    p.add_argument("--phase-s", type=float, default=20, help="Seconds of load before each kill and after each restore")
    p.add_argument("--callers", type=int, default=4, help="Concurrent HTTP callers (closed loop)")
    args = parse(p)
    runs = run(args)
    extra = {"kills": runs, "phase_s": args.phase_s, "callers": args.callers}
    report("cluster_node_loss", "before kill", "after restart", rows_of(runs), args, extra)


if __name__ == "__main__":
    main()
