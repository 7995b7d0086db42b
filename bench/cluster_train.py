"""Training on the multi-node cluster (ray_app/cluster.py) through two drills, against an uninterrupted run of the
same config and seed measured in the same bench run (the baseline): the worker node SIGKILLed `--kills` times in one
run of two Train workers (one per node, `STRICT_SPREAD`) and started again at once each time, and the head's MLflow
port dropped `--drops` times for `--outage-s` inside the worker node's network namespace while the one Train worker
there (rank 0, which logs every epoch) trains.

    sudo .venv/bin/python bench/cluster_train.py                                  # 2 kills, 2 drops of 20 s
    sudo .venv/bin/python bench/cluster_train.py --epochs 16 --kills 3 --drops 3 --outage-s 30

It builds its own cluster (root: network namespaces; `nft` for the drops), makes the tiny random model
(configs/smoke.yaml's) and removes everything at the end. tests/test_cluster.py runs each drill once, short.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import ROOT, Row, cluster_parser, fresh_cluster, median, parse, report

from ray_app.cluster import Cluster, alive_node_ips, kill_node, restart_node

os.environ.setdefault("RAY_AUTH_MODE", "token")  # the head keeps token authentication; a named address opts in
JOB_TIMEOUT_S = 300
WORKER_CPUS = 1
RESUMED = re.compile(r"resuming from the checkpoint of epoch (\d+)")


class DrillError(AssertionError):
    """A drill that could not run to its end (a job that failed or hung): an assertion, so pytest reports it."""


# ---- jobs on the cluster --------------------------------------------------------------------------------------


def submit(cluster: Cluster, command: str, model: Path, experiment: str, *overrides: str) -> tuple[Any, str]:
    """`ray-app COMMAND` on the smoke config as a Ray job with this repository as its working dir, two Train workers
    spread over the nodes, logging to its own MLflow experiment; later overrides win. (Jobs client, job id)."""
    from ray.job_submission import JobSubmissionClient

    sets = [
        f"model.name_or_path={model}",
        f"mlflow.tracking_uri={cluster.mlflow_url}",
        f"mlflow.experiment={experiment}",
        f"registry.model_name=cluster-{uuid.uuid4().hex[:6]}",
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.torch_threads=1",
        "train.placement_strategy=STRICT_SPREAD",
        *overrides,
    ]
    client = JobSubmissionClient(cluster.dashboard_url)
    entrypoint = shlex.join(["ray-app", command, "--config", "configs/smoke.yaml", *(f"--set={s}" for s in sets)])
    return client, client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})


def ended(client: Any, job: str) -> bool:
    from ray.job_submission import JobStatus

    return client.get_job_status(job) in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def wait_job(client: Any, job: str, timeout_s: float = JOB_TIMEOUT_S) -> tuple[str, str, str]:
    """(status, logs, the driver's Ray job id) once the job ended; stopped and failed after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not ended(client, job):
        if time.monotonic() > deadline:
            client.stop_job(job)
            raise DrillError(f"job {job} still running after {timeout_s}s:\n{client.get_job_logs(job)[-6000:]}")
        time.sleep(2)
    info = client.get_job_info(job)
    return str(info.status), client.get_job_logs(job), info.driver_info.id if info.driver_info else ""


def running_or_fail(client: Any, job: str, started: float, timeout_s: float = JOB_TIMEOUT_S) -> None:
    """Between polls of a drill: the job must still be going, and not for longer than `timeout_s`."""
    if ended(client, job) or time.monotonic() - started > timeout_s:
        raise DrillError(f"job {job} {client.get_job_status(job)} before the drill's step:\n"
                         f"{client.get_job_logs(job)[-4000:]}")  # fmt: skip


def train_worker_ips(cluster: Cluster, ray_job_id: str) -> list[str]:
    """The node IP of every Ray Train worker actor of one job, from Ray's state API (dead actors stay listed)."""
    from ray.util.state import list_actors, list_nodes

    # The dashboard's URL, not the GCS address: given a GCS address, Ray's state API re-points this process's global
    # GCS client at that cluster (ray.dashboard.utils.ray_address_to_api_server_url), and once the cluster is torn
    # down a test process still joined to its session head exits after 60 s of "GCS unavailable" (seen in a run).
    ips = {n.node_id: n.node_ip for n in list_nodes(address=cluster.dashboard_url)}
    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    return sorted(ips[a.node_id] for a in actors if a.job_id == ray_job_id)


def settled(cluster: Cluster, timeout_s: float = 120) -> None:
    """The cluster as the next job expects it: the head and the (restarted) worker alive, and a killed node's old
    entry marked dead, which the GCS does only after missed health checks."""
    want, deadline = sorted([cluster.head_ip, cluster.workers[0].ip]), time.monotonic() + timeout_s
    while (alive := alive_node_ips(cluster.ray_address)) != want:
        if time.monotonic() > deadline:
            raise DrillError(f"alive nodes {alive}, want {want}")
        time.sleep(1)


# ---- MLflow and the bucket ------------------------------------------------------------------------------------


def only_run(cluster: Cluster, experiment: str, timeout: float = 0):
    """The one MLflow run of a job's experiment (waiting up to `timeout` for it to appear)."""
    import mlflow

    client = mlflow.MlflowClient(cluster.mlflow_url)
    deadline = time.monotonic() + timeout
    while True:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], max_results=2) if found else []
        if runs or time.monotonic() >= deadline:
            if len(runs) != 1:
                raise DrillError(f"{len(runs)} runs in {experiment}")
            return runs[0]
        time.sleep(0.5)


def metric_history(cluster: Cluster, run_id: str, key: str = "train/loss") -> list[Any]:
    import mlflow

    return mlflow.MlflowClient(cluster.mlflow_url).get_metric_history(run_id, key)


def epoch_steps(cluster: Cluster, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in metric_history(cluster, run_id, key))


def epoch_value(cluster: Cluster, run_id: str, key: str, step: int) -> float:
    (value,) = [m.value for m in metric_history(cluster, run_id, key) if m.step == step]
    return value


def s3_client(cluster: Cluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, aws_access_key_id=cluster.access_key,
                        aws_secret_access_key=cluster.secret_key, region_name="us-east-1")  # fmt: skip


def bucket_keys(cluster: Cluster, prefix: str) -> list[str]:
    pages = s3_client(cluster).get_paginator("list_objects_v2").paginate(Bucket=cluster.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def registered_epoch(cluster: Cluster, prefix: str) -> int:
    """The last epoch whose checkpoint Ray Train's controller registered (the latest, not the best kept), from the
    snapshot it keeps beside the run on storage (0 before the first). An epoch in MLflow is not yet one: the
    controller takes a worker's report when it next polls it (every 2 s by default)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME  # private: fails loudly if moved

    s3 = s3_client(cluster)
    for key in bucket_keys(cluster, prefix):
        if key.endswith("/" + CHECKPOINT_MANAGER_SNAPSHOT_FILENAME):
            try:
                snapshot = json.loads(s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read())
                return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
            except (ValueError, KeyError, TypeError):  # caught mid-write, or none registered yet
                return 0
    return 0


# ---- the drills -----------------------------------------------------------------------------------------------


def uninterrupted(cluster: Cluster, model: Path, epochs: int) -> dict[str, Any]:
    """The baseline: the same two-worker training with nothing done to it."""
    experiment, prefix = f"cluster-base-{uuid.uuid4().hex[:8]}", f"base-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    client, job = submit(cluster, "train", model, experiment, f"train.epochs={epochs}",
                         f"train.storage_path=s3://{cluster.bucket}/{prefix}")  # fmt: skip
    status, logs, _ = wait_job(client, job)
    if status != "SUCCEEDED":
        raise DrillError(logs[-4000:])
    run_id = only_run(cluster, experiment).info.run_id
    return {"job_s": time.monotonic() - started, "run_id": run_id, **last_epoch(cluster, run_id, epochs)}


def node_loss_training(cluster: Cluster, model: Path, epochs: int, kill_after: list[int]) -> dict[str, Any]:
    """Two workers, one per node, `epochs` epochs; the worker node SIGKILLed each time Ray Train has registered the
    checkpoint of the next epoch in `kill_after`, and started again at once (a replacement machine at the same
    address). Per kill: the epoch checkpointed, processes killed, seconds until the node is back and until the next
    checkpoint is registered (training going on). The job's logs, MLflow run and worker IPs are left to the caller
    to judge; the cluster is settled again (the dead entries marked dead) before this returns."""
    experiment, prefix = f"cluster-drill-{uuid.uuid4().hex[:8]}", f"drill-{uuid.uuid4().hex[:6]}"
    client, job = submit(
        cluster, "train", model, experiment, f"train.epochs={epochs}", f"train.max_failures={len(kill_after)}",
        f"train.storage_path=s3://{cluster.bucket}/{prefix}",
    )  # fmt: skip
    started, kills = time.monotonic(), []
    try:
        for threshold in kill_after:
            while (registered := registered_epoch(cluster, prefix)) < threshold:
                running_or_fail(client, job, started)
                time.sleep(0.3)
            kill = kill_node(cluster.workers[0])
            killed_at, processes = kill.signalled_at, kill.processes
            restart_node(cluster, cluster.workers[0], WORKER_CPUS)
            back_at = time.monotonic()
            resumed_at, resumed = _resumed(client, job, len(kills) + 1)
            while resumed is not None and registered_epoch(cluster, prefix) <= resumed and not ended(client, job):
                time.sleep(0.3)
            next_at = time.monotonic() if resumed is not None and registered_epoch(cluster, prefix) > resumed else None
            kills.append({"epoch": registered, "at_s": killed_at - started, "processes": processes,
                          "node_back_s": back_at - killed_at, "resumed_from": resumed,
                          "resumed_s": resumed_at - killed_at if resumed_at else None,
                          "next_checkpoint_s": next_at - killed_at if next_at else None})  # fmt: skip
        status, logs, job_id = wait_job(client, job)
        job_s = time.monotonic() - started
    finally:
        settled(cluster)
    run_id = only_run(cluster, experiment).info.run_id if status == "SUCCEEDED" else ""
    last = last_epoch(cluster, run_id, epochs) if run_id else {"f1": float("nan"), "loss": float("nan")}
    return {"status": status, "logs": logs, "job_id": job_id, "run_id": run_id, "kills": kills, "job_s": job_s,
            "resumed": [int(e) for e in RESUMED.findall(logs)], "steps": epoch_steps(cluster, run_id) if run_id else [],
            **last}  # fmt: skip


def last_epoch(cluster: Cluster, run_id: str, epochs: int) -> dict[str, float]:
    """The last epoch's val F1 (what the drill is judged on) and val loss (which shows a difference F1 rounds away:
    the tiny random model's F1 barely moves between epochs)."""
    return {"f1": epoch_value(cluster, run_id, "val/f1_weighted", epochs),
            "loss": epoch_value(cluster, run_id, "val/loss", epochs)}  # fmt: skip


def _resumed(client: Any, job: str, count: int) -> tuple[float | None, int | None]:
    """When the job's log first shows its `count`-th resume, and from which epoch ((None, None) if it ended first):
    the new worker group has loaded the checkpoint. Checkpoints registered between the kill and this point were
    reported before the kill and still in the controller's queue."""
    while not ended(client, job):
        found = RESUMED.findall(client.get_job_logs(job))
        if len(found) >= count:
            return time.monotonic(), int(found[count - 1])
        time.sleep(0.5)
    return None, None


def node_loss_line(result: dict[str, Any], epochs: int, reference: dict[str, float]) -> str:
    kills = "; ".join(
        f"killed ({k['processes']} processes) {k['at_s']:.1f} s into the job with epoch {k['epoch']} checkpointed, "
        f"node back {k['node_back_s']:.1f} s later, resumed from epoch {k['resumed_from']} {_s(k['resumed_s'])} and "
        f"its next checkpoint registered {_s(k['next_checkpoint_s'])} after the kill"
        for k in result["kills"]
    )
    return (
        f"DRILL train-node-loss: {kills}; resumed from epochs {result['resumed']}; job {result['job_s']:.0f} s; "
        f"epochs in MLflow {result['steps']}; at epoch {epochs} val F1 {result['f1']:.4f} vs {reference['f1']:.4f} "
        f"uninterrupted (|diff| {abs(result['f1'] - reference['f1']):.4f}), val loss {result['loss']:.4f} vs "
        f"{reference['loss']:.4f}"
    )


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def _nft(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "nft", *args], check=True, capture_output=True, timeout=30)


def alive_node_id(cluster: Cluster, ip: str) -> str:
    from ray.util.state import list_nodes

    # (a killed node's dead entry stays listed; the state API counts the filtered-out one as missing output)
    alive = list_nodes(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    (node_id,) = [n.node_id for n in alive if n.node_ip == ip]
    return node_id


def mlflow_drop_training(
    cluster: Cluster, model: Path, epochs: int, outage_s: float, drops: int = 1, gap_s: float = 10
) -> dict[str, Any]:
    """One Train worker pinned to the worker node (`train.label_selector` on its node id), so rank 0, which logs
    every epoch, runs there; from its first epoch in MLflow, the head's MLflow port dropped inside the worker's
    namespace only (Ray's traffic and the head's own MLflow calls go on) for `outage_s`, `drops` times `gap_s`
    apart. Per drop: epochs in MLflow when it began, whether any arrived during it (none should), epochs that ended
    during it, and seconds after the restore until the last of those is in MLflow."""
    node = cluster.workers[0]
    experiment = f"cluster-mlflow-{uuid.uuid4().hex[:8]}"
    client, job = submit(
        cluster, "train", model, experiment, f"train.storage_path=s3://{cluster.bucket}/mlf-{uuid.uuid4().hex[:6]}",
        "train.num_workers=1", "train.placement_strategy=PACK", f"train.epochs={epochs}",
        f'train.label_selector={{"ray.io/node-id": "{alive_node_id(cluster, node.ip)}"}}',
    )  # fmt: skip
    started = time.monotonic()
    run_id = only_run(cluster, experiment, timeout=JOB_TIMEOUT_S).info.run_id
    while not epoch_steps(cluster, run_id):
        running_or_fail(client, job, started)
        time.sleep(0.3)
    outages = []
    for i in range(drops):
        if i:
            time.sleep(gap_s)
        outages.append(_drop_port(cluster, node.namespace, run_id, outage_s))
    status, logs, job_id = wait_job(client, job)
    times = [m.timestamp / 1000 for m in metric_history(cluster, run_id)]
    for outage in outages:
        ended_during = [t for t in times if outage["dropped"] <= t <= outage["restored"]]
        outage["ended_during"] = len(ended_during)
    return {"status": status, "logs": logs, "job_id": job_id, "run_id": run_id, "outages": outages,
            "steps": epoch_steps(cluster, run_id), "job_s": time.monotonic() - started}  # fmt: skip


def _drop_port(cluster: Cluster, namespace: str, run_id: str, outage_s: float) -> dict[str, Any]:
    """An nftables table in the node's namespace dropping its packets to the head's MLflow port, for `outage_s`."""
    port, table = cluster.mlflow_url.rsplit(":", 1)[1], f"rayapp_drill_{uuid.uuid4().hex[:6]}"
    _nft(namespace, "add", "table", "inet", table)
    try:
        _nft(namespace, "add", "chain", "inet", table, "out", "{ type filter hook output priority 0 ; }")
        _nft(namespace, "add", "rule", "inet", table, "out", "ip", "daddr", cluster.head_ip, "tcp", "dport", port,
             "drop")  # fmt: skip
        dropped = time.time()
        time.sleep(2)  # a batch already on the wire may land; after that nothing from the worker does
        at_drop = epoch_steps(cluster, run_id)
        time.sleep(max(0.0, outage_s - 2))
        arrived = len(epoch_steps(cluster, run_id)) - len(at_drop)
    finally:
        _nft(namespace, "delete", "table", "inet", table)
    restored = time.time()
    return {"dropped": dropped, "restored": restored, "seconds": restored - dropped, "logged_at_drop": len(at_drop),
            "arrived_during": arrived}  # fmt: skip


def mlflow_drop_line(result: dict[str, Any], epochs: int) -> str:
    drops = "; ".join(
        f"{o['seconds']:.1f} s with {o['logged_at_drop']} epochs logged before, {o['ended_during']} ended during it, "
        f"{o['arrived_during']} arrived during it" for o in result["outages"]
    )  # fmt: skip
    return (
        f"DRILL mlflow-port-dropped-on-worker-node: {drops}; {epochs} epochs, {len(result['steps'])} in MLflow "
        f"({len(set(result['steps']))} distinct); job {result['job_s']:.0f} s"
    )


# ---- the bench ----------------------------------------------------------------------------------------------------


def kill_points(epochs: int, kills: int) -> list[int]:
    """Epochs after whose registered checkpoint the node is killed: spread over the run, none in its last epoch."""
    points = sorted({max(1, round(epochs * (i + 1) / (kills + 1))) for i in range(kills)})
    if len(points) != kills or points[-1] >= epochs:
        raise SystemExit(f"--epochs {epochs} leaves no room for {kills} kills: give more epochs")
    return points


def rows_of(base: dict, losses: list[dict], drops: list[dict], epochs: int, drop_epochs: int) -> list[Row]:
    kills = [k for r in losses for k in r["kills"]]
    outages = [o for r in drops for o in r["outages"]]
    resumed_ok = sum(r["status"] == "SUCCEEDED" and len(r["resumed"]) == len(r["kills"]) for r in losses)
    lost = sum(len(set(range(1, epochs + 1)) - set(r["steps"])) for r in losses)
    dropped_lost = sum(len(set(range(1, drop_epochs + 1)) - set(r["steps"])) for r in drops)
    dropped_twice = sum(len(r["steps"]) - len(set(r["steps"])) for r in drops)

    def row(metric: str, baseline: float | None, other: float | None) -> Row:
        return {"metric": metric, "uninterrupted": baseline, "drilled": other}

    resume = [k["resumed_s"] for k in kills if k["resumed_s"] is not None]
    recover = [k["next_checkpoint_s"] for k in kills if k["next_checkpoint_s"] is not None]
    arrived = float(sum(o["arrived_during"] for o in outages))
    return [
        row("train job: s (node-loss runs)", base["job_s"], median([r["job_s"] for r in losses])),
        row(f"val F1 at epoch {epochs}", base["f1"], median([r["f1"] for r in losses])),
        row("val F1, largest difference from uninterrupted", None, max(abs(r["f1"] - base["f1"]) for r in losses)),
        row(f"val loss at epoch {epochs}", base["loss"], median([r["loss"] for r in losses])),
        row("runs finished, resumed once per kill", None, float(resumed_ok)),
        row("epochs missing from MLflow, all runs", None, float(lost)),
        row("kill -> node back: s", None, median([k["node_back_s"] for k in kills])),
        row("kill -> new workers resumed from the checkpoint: s", None, median(resume)),
        row("kill -> their first checkpoint registered: s", None, median(recover)),
        row("MLflow drop: epochs ended during it", None, median([float(o["ended_during"]) for o in outages])),
        row("MLflow drop: epochs that reached MLflow during it", None, arrived),
        row("MLflow drills: epochs missing from MLflow", None, float(dropped_lost)),
        row("MLflow drills: epochs in MLflow twice", None, float(dropped_twice)),
        row("train job: s (MLflow-drop runs, 1 worker)", None, median([r["job_s"] for r in drops])),
    ]


def run(args) -> tuple[dict, list[dict], list[dict]]:
    """A fresh cluster; the baseline, `--repeats` node-loss runs and `--repeats` MLflow-drop runs; removed after."""
    from ray_app.model import make_tiny_model

    logging.getLogger("ray").setLevel(logging.WARNING)  # the Jobs SDK's packaging lines would bury the DRILL lines
    with fresh_cluster("rayapp-bench-cluster-train-") as (cluster, root):
        model = make_tiny_model(root / "tiny-bert")
        base = uninterrupted(cluster, model, args.epochs)
        print(f"uninterrupted: {base['job_s']:.0f} s, val F1 {base['f1']:.4f}, val loss {base['loss']:.4f}", flush=True)
        losses, drops = [], []
        for _ in range(args.repeats):
            losses.append(node_loss_training(cluster, model, args.epochs, kill_points(args.epochs, args.kills)))
            print(node_loss_line(losses[-1], args.epochs, base), flush=True)
        for _ in range(args.repeats if args.drops else 0):
            drops.append(mlflow_drop_training(cluster, model, args.drop_epochs, args.outage_s, args.drops))
            print(mlflow_drop_line(drops[-1], args.drop_epochs), flush=True)
        return base, losses, drops


def main() -> None:
    p = cluster_parser(__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10, help="Epochs of the baseline and the node-loss runs")
    p.add_argument("--kills", type=int, default=2, help="Worker-node losses in each node-loss run")
    p.add_argument("--drops", type=int, default=2, help="MLflow outages in each MLflow-drop run (0: none)")
    p.add_argument("--outage-s", type=float, default=20, help="Seconds of each MLflow outage")
    p.add_argument("--drop-epochs", type=int, default=40, help="Epochs of each MLflow-drop run")
    args = parse(p)
    if args.drops and shutil.which("nft") is None:
        raise SystemExit("the MLflow drops need nftables' `nft` (apt-get install nftables), or --drops 0")
    base, losses, drops = run(args)
    strip = ("logs",)
    extra = {"epochs": args.epochs, "kills": args.kills, "drops": args.drops, "outage_s": args.outage_s,
             "node_loss_runs": [{k: v for k, v in r.items() if k not in strip} for r in losses],
             "mlflow_drop_runs": [{k: v for k, v in r.items() if k not in strip} for r in drops]}  # fmt: skip
    report(
        "cluster_train_drills",
        "uninterrupted",
        "drilled",
        rows_of(base, losses, drops, args.epochs, args.drop_epochs),
        args,
        extra,
    )


if __name__ == "__main__":
    main()
