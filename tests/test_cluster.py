"""A real two-node Ray cluster on this machine (ray_app/cluster.py): the head in the root network namespace, one
worker node in a namespace of its own behind a veth pair, moto's S3 API server and the MLflow server on the head's
address. The pipeline is submitted the way a user submits it to any cluster (`ray job submit`, here through the Jobs
SDK the CLI uses), with two Ray Train workers that must land on different nodes."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_app.cluster import Cluster, add_link, down, free_octets, remove_link, up
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


def submit_pipeline(cluster: Cluster, model: Path, experiment: str, *overrides: str) -> tuple[str, str, str]:
    """`ray-app pipeline` on the smoke config as a Ray job with this repository as its working dir, logging to its
    own MLflow experiment; (status, logs, the driver's Ray job id)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

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
    job = client.submit_job(
        entrypoint="ray-app pipeline --config configs/smoke.yaml " + " ".join(f"--set {s}" for s in sets),
        runtime_env={"working_dir": str(ROOT)},
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job} still {status} after {JOB_TIMEOUT_S}s"
        time.sleep(2)
    info = client.get_job_info(job)
    return str(status), client.get_job_logs(job), info.driver_info.id if info.driver_info else ""


def train_worker_ips(cluster: Cluster, ray_job_id: str) -> list[str]:
    """The node IP of every Ray Train worker actor of one job, from Ray's state API (dead actors stay listed)."""
    from ray.util.state import list_actors, list_nodes

    # The dashboard's URL, not the GCS address: given a GCS address, Ray's state API re-points this process's global
    # GCS client at that cluster (ray.dashboard.utils.ray_address_to_api_server_url), and once the cluster is torn
    # down a test process still joined to its session head exits after 60 s of "GCS unavailable" (seen in a run).
    ips = {n.node_id: n.node_ip for n in list_nodes(address=cluster.dashboard_url)}
    actors = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    return sorted(ips[a.node_id] for a in actors if a.job_id == ray_job_id)


def test_the_pipeline_trains_on_two_nodes_with_checkpoints_on_s3_and_artifacts_in_mlflow(
    cluster: Cluster, tiny_model: Path
) -> None:
    import boto3
    import mlflow

    prefix = f"ray_results-{uuid.uuid4().hex[:6]}"
    before = _link_bytes(cluster.workers[0].link)
    started = time.monotonic()
    experiment_name = f"cluster-{uuid.uuid4().hex[:8]}"
    status, logs, job_id = submit_pipeline(
        cluster, tiny_model, experiment_name, f"train.storage_path=s3://{cluster.bucket}/{prefix}"
    )
    print(f"CLUSTER pipeline job: {time.monotonic() - started:.0f} s, {status}")
    assert status == "SUCCEEDED", logs[-4000:]
    # STRICT_SPREAD: one Train worker on the head, one on the worker node, each by its own node IP
    assert train_worker_ips(cluster, job_id) == sorted([cluster.head_ip, cluster.workers[0].ip])
    # and the traffic between them (DDP's all-reduce, data shards, the working dir) crossed the veth pair
    assert _link_bytes(cluster.workers[0].link) - before > 1_000_000

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
