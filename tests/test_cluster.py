"""A real two-node Ray cluster on this machine (ray_app/cluster.py): the head in the root network namespace, one
worker node in a namespace of its own behind a veth pair, moto's S3 API server and the MLflow server on the head's
address. The pipeline is submitted the way a user submits it to any cluster (`ray job submit`, here through the Jobs
SDK the CLI uses), with two Ray Train workers that must land on different nodes."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ray_app.cluster import (
    Cluster,
    add_link,
    alive_node_ips,
    down,
    free_octets,
    kill_node,
    remove_link,
    restart_node,
    up,
)
from tests.conftest import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="network namespaces need root and iproute2's `ip`; without root, docs/cluster.md shows the same "
        "cluster on loopback aliases (`python -m ray_app.cluster up --no-netns`)",
    ),
]
JOB_TIMEOUT_S = 300
TOLERANCE = 0.02  # val F1 after a node loss against the uninterrupted run
MLFLOW_DRILL_EPOCHS, OUTAGE_S = 16, 20
EPOCHS = 6  # the reference run and the node-loss drill: an epoch to lose between the first two and the last


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Built once for the module, removed (processes, namespace, veth pair, temp dirs) however the tests end. The
    head has room for both Train workers (2 CPUs), so only the placement strategy puts one on the other node."""
    root = tmp_path_factory.mktemp("cluster")
    state = root / "cluster.json"
    try:
        yield up(state, root, workers=1, netns=True, head_cpus=2, worker_cpus=1)
    finally:
        down(state)
        assert not state.exists()


def _link_bytes(link: str) -> int:
    stats = Path("/sys/class/net") / link / "statistics"
    return int((stats / "rx_bytes").read_text()) + int((stats / "tx_bytes").read_text())


def submit(cluster: Cluster, command: str, model: Path, experiment: str, *overrides: str) -> tuple[object, str]:
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
        f"train.epochs={EPOCHS}",
        *overrides,
    ]
    client = JobSubmissionClient(cluster.dashboard_url)
    entrypoint = shlex.join(["ray-app", command, "--config", "configs/smoke.yaml", *(f"--set={s}" for s in sets)])
    return client, client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(ROOT)})


def wait_job(client, job: str) -> tuple[str, str, str]:
    """(status, logs, the driver's Ray job id) once the job ended."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job)
            pytest.fail(f"job {job} still {status} after {JOB_TIMEOUT_S}s:\n{client.get_job_logs(job)[-6000:]}")
        time.sleep(2)
    info = client.get_job_info(job)
    return str(status), client.get_job_logs(job), info.driver_info.id if info.driver_info else ""


def submit_pipeline(cluster: Cluster, model: Path, experiment: str, *overrides: str) -> tuple[str, str, str]:
    return wait_job(*submit(cluster, "pipeline", model, experiment, *overrides))


def train_worker_ips(cluster: Cluster, ray_job_id: str) -> list[str]:
    """The node IP of every Ray Train worker actor of one job, from Ray's state API (dead actors stay listed)."""
    from ray.util.state import list_actors, list_nodes

    # The dashboard's URL, not the GCS address: given a GCS address, Ray's state API re-points this process's global
    # GCS client at that cluster (ray.dashboard.utils.ray_address_to_api_server_url), and once the cluster is torn
    # down a test process still joined to its session head exits after 60 s of "GCS unavailable" (seen in a run).
    ips = {n.node_id: n.node_ip for n in list_nodes(address=cluster.dashboard_url)}
    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    return sorted(ips[a.node_id] for a in actors if a.job_id == ray_job_id)


@pytest.fixture(scope="module")
def reference(cluster: Cluster, tiny_model: Path) -> dict[str, object]:
    """The pipeline as a user submits it to the cluster, uninterrupted: one test checks it, the node-loss drill
    compares its val F1 with this run's (same config and seed)."""
    prefix = f"ray_results-{uuid.uuid4().hex[:6]}"
    before = _link_bytes(cluster.workers[0].link)
    started = time.monotonic()
    experiment = f"cluster-{uuid.uuid4().hex[:8]}"
    status, logs, job_id = submit_pipeline(
        cluster, tiny_model, experiment, f"train.storage_path=s3://{cluster.bucket}/{prefix}"
    )
    print(f"CLUSTER pipeline job: {time.monotonic() - started:.0f} s, {status}")
    veth_bytes = _link_bytes(cluster.workers[0].link) - before
    return {"status": status, "logs": logs, "job_id": job_id, "prefix": prefix, "experiment": experiment,
            "veth_bytes": veth_bytes}  # fmt: skip


def only_run(cluster: Cluster, experiment: str, timeout: float = 0):
    """The one MLflow run of a job's experiment (waiting up to `timeout` for it to appear)."""
    import mlflow

    client = mlflow.MlflowClient(cluster.mlflow_url)
    deadline = time.monotonic() + timeout
    while True:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id], max_results=2) if found else []
        if runs or time.monotonic() >= deadline:
            assert len(runs) == 1, f"{len(runs)} runs in {experiment}"
            return runs[0]
        time.sleep(0.5)


def epoch_steps(cluster: Cluster, run_id: str, key: str = "train/loss") -> list[int]:
    import mlflow

    return sorted(m.step for m in mlflow.MlflowClient(cluster.mlflow_url).get_metric_history(run_id, key))


def test_the_pipeline_trains_on_two_nodes_with_checkpoints_on_s3_and_artifacts_in_mlflow(
    cluster: Cluster, reference: dict
) -> None:
    import boto3
    import mlflow

    status, logs, job_id, prefix = (reference[k] for k in ("status", "logs", "job_id", "prefix"))
    experiment_name = reference["experiment"]
    assert status == "SUCCEEDED", logs[-4000:]
    # STRICT_SPREAD: one Train worker on the head, one on the worker node, each by its own node IP
    assert train_worker_ips(cluster, job_id) == sorted([cluster.head_ip, cluster.workers[0].ip])
    # and the traffic between them (DDP's all-reduce, data shards, the working dir) crossed the veth pair
    assert reference["veth_bytes"] > 1_000_000

    s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, aws_access_key_id=cluster.access_key,
                      aws_secret_access_key=cluster.secret_key, region_name="us-east-1")  # fmt: skip
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=cluster.bucket, Prefix=prefix).get("Contents", [])]
    assert any(k.endswith("/model/model.safetensors") for k in keys), keys
    assert any(k.endswith("/train_state.pt") for k in keys), keys

    client = mlflow.MlflowClient(cluster.mlflow_url)
    experiment = client.get_experiment_by_name(experiment_name)
    (run,) = client.search_runs([experiment.experiment_id], max_results=1)
    assert run.data.tags["checkpoint_path"].startswith(f"s3://{cluster.bucket}/{prefix}/")
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert {"config.yaml", "results", "training"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    # served by the tracking server: the files are in its artifacts destination, written by nobody else
    stored = Path(cluster.root) / "mlflow" / "artifacts" / experiment.experiment_id / run.info.run_id
    assert (stored / "artifacts" / "config.yaml").is_file()


def test_a_local_storage_path_on_two_nodes_fails_before_training_naming_the_setting(
    cluster: Cluster, tiny_model: Path, tmp_path: Path
) -> None:
    started = time.monotonic()
    storage = f"train.storage_path={tmp_path / 'results'}"
    status, logs, job_id = submit_pipeline(cluster, tiny_model, f"cluster-{uuid.uuid4().hex[:8]}", storage)
    print(f"CLUSTER local-storage job: {time.monotonic() - started:.0f} s, {status}")
    assert status == "FAILED" and job_id  # the driver ran: the refusal is the app's, not a failed job start
    assert (
        f"error: train.storage_path='{tmp_path / 'results'}' is a local path, but the Ray cluster has 2 nodes" in logs
    )
    assert "train.shared_filesystem=true" in logs and "Traceback" not in logs
    assert "epoch 1" not in logs and train_worker_ips(cluster, job_id) == []
    assert not (tmp_path / "results").exists()


def _settled(cluster: Cluster) -> None:
    """The cluster as the tests after a drill expect it: the head and the (restarted) worker alive, and the killed
    node's old entry marked dead, which the GCS does only after missed health checks."""
    want, deadline = sorted([cluster.head_ip, cluster.workers[0].ip]), time.monotonic() + 120
    while (alive := alive_node_ips(cluster.ray_address)) != want:
        assert time.monotonic() < deadline, f"alive nodes {alive}, want {want}"
        time.sleep(1)


def test_drill_a_worker_node_killed_mid_training_goes_on_from_the_last_checkpoint(
    cluster: Cluster, tiny_model: Path, reference: dict
) -> None:
    """Two workers, one per node: the worker node SIGKILLed once epoch 2 is in MLflow, and started again at once
    (a replacement machine at the same address). Ray Train restarts the group on the head and the new node from the
    last checkpoint; no finished epoch runs twice, none is lost, and the last epoch's val F1 is the uninterrupted
    reference run's (same seed), within TOLERANCE. Without the node, the start would fail after train.start_timeout_s
    instead of waiting for ever."""
    experiment, prefix = f"cluster-drill-{uuid.uuid4().hex[:8]}", f"drill-{uuid.uuid4().hex[:6]}"
    client, job = submit(cluster, "train", tiny_model, experiment, f"train.storage_path=s3://{cluster.bucket}/{prefix}")
    started = time.monotonic()
    try:
        while (registered := registered_epoch(cluster, prefix)) < 2:
            assert time.monotonic() - started < JOB_TIMEOUT_S and client.get_job_status(job) in {"PENDING", "RUNNING"}
            time.sleep(0.3)
        killed_at = time.monotonic()
        processes = kill_node(cluster.workers[0])
        restart_node(cluster, cluster.workers[0], 1)
        back_at = time.monotonic()
        status, logs, job_id = wait_job(client, job)
        finished_at = time.monotonic()
    finally:
        _settled(cluster)
    assert status == "SUCCEEDED", logs[-4000:]
    resumed = [int(w) for w in re.findall(r"resuming from the checkpoint of epoch (\d+)", logs)]
    assert len(resumed) == 1 and resumed[0] >= registered, logs[-4000:]  # no finished epoch runs again
    run_id = only_run(cluster, experiment).info.run_id
    steps = epoch_steps(cluster, run_id)
    # none lost; an epoch twice in MLflow only if it was logged after the last checkpoint Ray Train registered
    assert sorted(set(steps)) == list(range(1, EPOCHS + 1)) and all(
        steps.count(e) == 1 for e in range(1, resumed[0] + 1)
    )
    ips = train_worker_ips(cluster, job_id)  # dead actors stay listed: the first group, then the resumed one
    assert ips == sorted([cluster.head_ip] * 2 + [cluster.workers[0].ip] * 2), ips
    f1 = epoch_value(cluster, run_id, "val/f1_weighted", EPOCHS)
    reference_run = only_run(cluster, reference["experiment"]).info.run_id
    reference_f1 = epoch_value(cluster, reference_run, "val/f1_weighted", EPOCHS)
    print(
        f"DRILL train-node-loss: worker node killed ({processes} processes) {killed_at - started:.1f} s into the "
        f"job, with epoch {registered} of {EPOCHS} checkpointed; node back {back_at - killed_at:.1f} s later; resumed "
        f"from epoch {resumed[0]} on both nodes; job done {finished_at - killed_at:.1f} s after the kill; epochs in "
        f"MLflow {steps}; val F1 {f1:.4f} vs {reference_f1:.4f} uninterrupted "
        f"(|diff| {abs(f1 - reference_f1):.4f}, tolerance {TOLERANCE})"
    )
    assert abs(f1 - reference_f1) <= TOLERANCE


def registered_epoch(cluster: Cluster, prefix: str) -> int:
    """The last epoch whose checkpoint Ray Train's controller registered (the latest, not the best kept), from the
    snapshot it keeps beside the run on storage (0 before the first). An epoch in MLflow is not yet one: the
    controller takes a worker's report when it next polls it (every 2 s by default)."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME  # private: fails loudly if moved

    s3 = _s3(cluster)
    for key in _keys(cluster, prefix):
        if key.endswith("/" + CHECKPOINT_MANAGER_SNAPSHOT_FILENAME):
            try:
                snapshot = json.loads(s3.get_object(Bucket=cluster.bucket, Key=key)["Body"].read())
                return int(snapshot["latest_checkpoint_result"]["metrics"]["epoch"])
            except (ValueError, KeyError, TypeError):  # caught mid-write, or none registered yet
                return 0
    return 0


def epoch_value(cluster: Cluster, run_id: str, key: str, step: int) -> float:
    import mlflow

    history = mlflow.MlflowClient(cluster.mlflow_url).get_metric_history(run_id, key)
    (value,) = [m.value for m in history if m.step == step]
    return value


def _nft(node_namespace: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", node_namespace, "nft", *args], check=True, capture_output=True, timeout=30)


@pytest.mark.skipif(shutil.which("nft") is None, reason="the MLflow drill drops a port with nftables' `nft`")
def test_drill_mlflow_unreachable_from_the_worker_node_for_20s_loses_no_epoch(
    cluster: Cluster, tiny_model: Path
) -> None:
    """The existing MLflow drill across nodes: the one Train worker (rank 0, which logs each epoch) on the worker
    node, the tracking server on the head; its port dropped inside the worker's namespace only (Ray's own traffic
    and the driver's MLflow calls from the head go on) for 20 s from the first epoch's metrics."""
    from ray.util.state import list_nodes

    node = cluster.workers[0]
    # (a killed node's dead entry stays listed; the state API counts the filtered-out one as missing output)
    alive = list_nodes(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    (node_id,) = [n.node_id for n in alive if n.node_ip == node.ip]
    experiment = f"cluster-mlflow-{uuid.uuid4().hex[:8]}"
    client, job = submit(
        cluster, "train", tiny_model, experiment, f"train.storage_path=s3://{cluster.bucket}/mlf-{uuid.uuid4().hex[:6]}",
        "train.num_workers=1", "train.placement_strategy=PACK", f"train.epochs={MLFLOW_DRILL_EPOCHS}",
        f'train.label_selector={{"ray.io/node-id": "{node_id}"}}',
    )  # fmt: skip
    port = cluster.mlflow_url.rsplit(":", 1)[1]
    table = f"rayapp_drill_{uuid.uuid4().hex[:6]}"
    run = only_run(cluster, experiment, timeout=JOB_TIMEOUT_S)
    while not epoch_steps(cluster, run.info.run_id):
        assert client.get_job_status(job) == "RUNNING", client.get_job_logs(job)[-4000:]
        time.sleep(0.3)
    _nft(node.namespace, "add", "table", "inet", table)
    try:
        _nft(node.namespace, "add", "chain", "inet", table, "out", "{ type filter hook output priority 0 ; }")
        _nft(node.namespace, "add", "rule", "inet", table, "out", "ip", "daddr", cluster.head_ip, "tcp", "dport",
             port, "drop")  # fmt: skip
        dropped = time.time()
        time.sleep(2)  # a batch already on the wire may land; after that nothing from the worker does
        logged_at_drop = epoch_steps(cluster, run.info.run_id)
        time.sleep(OUTAGE_S - 2)
        assert epoch_steps(cluster, run.info.run_id) == logged_at_drop, "the worker still reached MLflow"
    finally:
        _nft(node.namespace, "delete", "table", "inet", table)
    restored = time.time()
    status, logs, job_id = wait_job(client, job)
    assert status == "SUCCEEDED", logs[-4000:]
    assert train_worker_ips(cluster, job_id) == [node.ip]
    assert epoch_steps(cluster, run.info.run_id) == list(range(1, MLFLOW_DRILL_EPOCHS + 1))
    import mlflow

    times = [
        m.timestamp / 1000
        for m in mlflow.MlflowClient(cluster.mlflow_url).get_metric_history(run.info.run_id, "train/loss")
    ]
    during = sum(dropped <= t <= restored for t in times)
    print(
        f"DRILL mlflow-port-dropped-on-worker-node: {restored - dropped:.1f} s, {len(logged_at_drop)} epochs logged "
        f"before; {MLFLOW_DRILL_EPOCHS} epochs, all in MLflow, {during} ended while the port was dropped"
    )
    assert during >= 1, "no epoch ended while MLflow was unreachable: the drill missed training"


def test_a_worker_link_is_a_namespace_with_its_own_address_and_is_removed_completely() -> None:
    """The pieces `up` and `down` use, without Ray: a connection from the namespace to the root side's address
    arrives from the namespace's own address and its bytes cross the veth pair."""
    import socket
    import subprocess
    import sys

    node = add_link(uuid.uuid4().hex[:6], 1, free_octets(1)[0])
    try:
        root_side = node.ip.rsplit(".", 1)[0] + ".1"
        with socket.create_server((root_side, 0)) as server:
            server.settimeout(20)
            address = (root_side, server.getsockname()[1])
            send = f"import socket; socket.create_connection({address!r}).sendall(b'x' * 100000)"
            before = _link_bytes(node.link)
            proc = subprocess.Popen(["ip", "netns", "exec", node.namespace, sys.executable, "-c", send])
            conn, (peer, _) = server.accept()
            with conn:
                received = b"".join(iter(lambda: conn.recv(65536), b""))
            assert proc.wait(timeout=20) == 0
        assert peer == node.ip and len(received) == 100000
        assert _link_bytes(node.link) - before > 100000
    finally:
        remove_link(node)
    assert node.namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not Path("/sys/class/net", node.link).exists()


# ---- Serving and batch inference on the cluster --------------------------------------------------------------------
# One registered version and one `serve deploy` for the tests below; the drill's pieces are bench/cluster.py's, which
# runs the same drill longer and several times (`sudo .venv/bin/python bench/cluster.py`).

SERVE_KEY = "cluster-key-" + uuid.uuid4().hex[:6]


def _s3(cluster: Cluster):
    import boto3

    return boto3.client("s3", endpoint_url=cluster.s3_endpoint, aws_access_key_id=cluster.access_key,
                        aws_secret_access_key=cluster.secret_key, region_name="us-east-1")  # fmt: skip


def _keys(cluster: Cluster, prefix: str) -> list[str]:
    pages = _s3(cluster).get_paginator("list_objects_v2").paginate(Bucket=cluster.bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _read_parquet(cluster: Cluster, keys: list[str]):
    import io

    import pandas as pd

    s3 = _s3(cluster)
    frames = [pd.read_parquet(io.BytesIO(s3.get_object(Bucket=cluster.bucket, Key=k)["Body"].read())) for k in keys]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


@pytest.fixture(scope="module")
def champion(cluster: Cluster, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A real version of the tiny model in the cluster's MLflow, aliased champion: (name, version)."""
    from bench.cluster import register_champion

    started = time.monotonic()
    _, name, version = register_champion(cluster, tiny_model, tmp_path_factory.mktemp("cluster-serve"))
    print(f"CLUSTER register champion: {time.monotonic() - started:.0f} s")
    return name, version


@pytest.fixture(scope="module")
def served(
    cluster: Cluster, champion: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """serve_config.yaml deployed with the real `serve deploy`, one Classifier replica per node, the prediction log
    on the bucket; shut down after the module (the drill shuts it down earlier, so later tests get the CPUs)."""
    import httpx

    from bench.cluster import deploy_on_cluster, serve_shutdown, wait_running
    from ray_app.ports import free_port
    from tests.serving import wait_until

    prefix, started = f"predlog-{uuid.uuid4().hex[:6]}", time.monotonic()
    work = tmp_path_factory.mktemp("cluster-deploy")
    try:
        base = deploy_on_cluster(cluster, champion[0], free_port(), SERVE_KEY, f"s3://{cluster.bucket}/{prefix}", work)
        wait_running(cluster.dashboard_url, [cluster.head_ip, cluster.workers[0].ip], 240)
        wait_until(
            lambda: httpx.get(f"{base}/ready", headers={"X-API-Key": SERVE_KEY}).status_code == 200, 120, "ready"
        )
        print(f"CLUSTER serve deploy -> 2 replicas ready: {time.monotonic() - started:.0f} s")
        yield {"base": base, "prefix": prefix, "version": champion[1]}
    finally:
        serve_shutdown(cluster.dashboard_url)


def test_serve_deploy_runs_one_replica_on_each_node_and_both_log_predictions_to_s3(
    cluster: Cluster, served: dict[str, str]
) -> None:
    """Serve's `max_replicas_per_node: 1` puts the two replicas on the two nodes (Serve's controller reports their
    node IPs); requests through the head's proxy are answered; both replicas' prediction logs reach the bucket. The
    log's rows name no replica or node: each replica writes its own files, named by a writer id of its own."""
    from bench.cluster import Load, replicas
    from tests.serving import wait_until

    started = time.monotonic()
    assert replicas(cluster.dashboard_url) == sorted([("RUNNING", cluster.head_ip), ("RUNNING", cluster.workers[0].ip)])
    with Load(served["base"], SERVE_KEY, callers=4) as load:
        time.sleep(3)
    assert len(load.shots) >= 8 and {(s.status, s.version) for s in load.shots} == {(200, served["version"])}

    def logged() -> tuple[list[str], Any] | None:  # a row per request, in files predictions-TIME-WRITER-N.parquet
        keys = _keys(cluster, served["prefix"] + "/predictions-")
        rows = _read_parquet(cluster, keys)
        return (keys, rows) if len(rows) == len(load.shots) else None

    keys, rows = wait_until(logged, 30, "a log row for every request")
    assert len({k.rsplit("/", 1)[1].split("-")[2] for k in keys}) == 2  # both replicas wrote to the bucket
    assert set(rows["model_version"]) == {served["version"]}
    print(f"CLUSTER serve on two nodes: {len(load.shots)} requests, {len(rows)} log rows, "
          f"{time.monotonic() - started:.0f} s")  # fmt: skip


def test_serve_survives_the_worker_node_killed_under_load_and_gets_its_replica_back_after_restart(
    cluster: Cluster, served: dict[str, str]
) -> None:
    """The worker node SIGKILLed mid-load: only requests in flight on it may fail, and none with a traceback; the
    surviving replica on the head answers the rest. Restarted, the node gets its replica back (Serve's controller
    places it, `max_replicas_per_node` keeps it off the head). Serve is shut down at the end: later tests need the
    CPUs."""
    from bench.cluster import Load, drill_line, node_loss, serve_shutdown

    started = time.monotonic()
    try:
        with Load(served["base"], SERVE_KEY, callers=4) as load:
            result = node_loss(cluster, load, phase_s=4, timeout_s=150)
        print(drill_line(result), f"({time.monotonic() - started:.0f} s)")
        print("DRILL details:", {k: result[k] for k in ("before", "outage", "after", "bodies")})
    finally:
        serve_shutdown(cluster.dashboard_url)
    # Only requests already in flight at the kill may fail (a closed loop has at most `callers` of them), and
    # with Serve's own plain-text error, never a traceback; every request sent after the kill is answered.
    assert result["failed_sent_after_kill"] == 0 and result["failed"] <= 4, result
    assert all("Traceback" not in body for body in result["bodies"]), result["bodies"]
    assert result["before"]["failed"] == 0 and result["after"]["failed"] == 0 and result["after"]["req_s"] > 0


def submit_batch(cluster: Cluster, model: str, input_uri: str, output_uri: str) -> tuple[str, str]:
    """`ray-app batch` on the smoke config as a Ray job (working dir: this repository), reading and writing the
    bucket; (status, logs)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    sets = [f"mlflow.tracking_uri={cluster.mlflow_url}", "batch.torch_threads=1", "batch.batch_size=16"]
    client = JobSubmissionClient(cluster.dashboard_url)
    job = client.submit_job(
        entrypoint=f"ray-app batch --model {model} --input {input_uri} --output {output_uri} "
        "--config configs/smoke.yaml " + " ".join(f"--set {s}" for s in sets),
        runtime_env={"working_dir": str(ROOT)},
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job} still {status} after {JOB_TIMEOUT_S}s"
        time.sleep(1)
    return str(status), client.get_job_logs(job)


def test_batch_job_reads_its_input_from_s3_and_writes_predictions_to_s3(
    cluster: Cluster, champion: tuple[str, str]
) -> None:
    """`ray-app batch` as a Ray job on the cluster: the input CSV uploaded to the bucket, the predictions written
    there by whichever node runs the model actor (every node has the endpoint and keys), read back: one prediction
    per input row, by the registered version."""
    import pandas as pd

    (name, version), prefix, started = champion, f"batch-{uuid.uuid4().hex[:6]}", time.monotonic()
    rows = pd.read_csv(ROOT / "data" / "projects" / "dataset.csv").head(40)[["id", "title", "description"]]
    _s3(cluster).put_object(Bucket=cluster.bucket, Key=f"{prefix}/in/projects.csv", Body=rows.to_csv(index=False))
    base = f"s3://{cluster.bucket}/{prefix}"
    status, logs = submit_batch(cluster, f"{name}/{version}", f"{base}/in/projects.csv", f"{base}/out")
    print(f"CLUSTER batch job: {time.monotonic() - started:.0f} s, {status}")
    assert status == "SUCCEEDED", logs[-4000:]
    assert "batch: 40 rows read, 40 predicted, 0 errors" in logs
    out = _read_parquet(cluster, [k for k in _keys(cluster, f"{prefix}/out/predictions/") if k.endswith(".parquet")])
    assert sorted(out["id"]) == sorted(rows["id"].astype(str)) and out["label"].notna().all()  # ids read as text
    assert set(out["model_version"]) == {version} and f"{prefix}/out/errors.parquet" in _keys(cluster, prefix)
