"""A multi-node Ray cluster on one machine (`make cluster-up`, tests/test_cluster.py): a head and N worker nodes,
each its own `ray start` with its own node IP, temp dir and CPUs, and the shared services a real cluster has: an S3
API endpoint (moto's server) for checkpoints and Tune experiments, and the MLflow server serving artifacts.

As root, each worker node runs in a network namespace of its own, joined to the root namespace by a veth pair, so
traffic between nodes really crosses an interface; the head stays in the root namespace, bound to the root side of
the first pair. Without root (`--no-netns`) the workers are loopback aliases (127.0.0.2, ...) beside a head on
127.0.0.1. One random tag names everything of one cluster (namespaces, links, temp dirs), so a test's cluster and a
user's never touch each other, and `down` removes exactly what its state file lists, even after a failed `up`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray_app.local import (
    BIN,
    pids_of,
    start_mlflow,
    start_ray_head,
    stop_mlflow,
    stop_pids,
    stop_ray_head,
    wait_http,
    with_descendants,
)
from ray_app.ports import free_port

SUBNET = "10.231"  # private; each worker link gets a free 10.231.X.0/24 (root side .1, worker side .2)
BUCKET = "ray-app"
REGION = "us-east-1"
WORKER_OBJECT_STORE_BYTES = 500 * 1024**2  # small: every node's store lives in this one machine's /dev/shm


@dataclass
class WorkerNode:
    ip: str
    temp_dir: str
    namespace: str = ""  # empty: a loopback alias in the root namespace
    link: str = ""  # the root side of its veth pair
    ifname: str = "lo"  # its interface (the namespace side of the pair): where its Gloo (torch DDP) listens


@dataclass
class Cluster:
    """What `up` started, written to the state file after each step so `down` can undo a half-made cluster."""

    tag: str
    root: str
    head_ip: str
    netns: bool
    workers: list[WorkerNode] = field(default_factory=list)
    ray_address: str = ""
    dashboard_url: str = ""
    head_temp_dir: str = ""
    head_pids: list[int] = field(default_factory=list)
    mlflow_url: str = ""
    mlflow_pid: int = 0
    s3_endpoint: str = ""
    s3_pid: int = 0
    bucket: str = BUCKET
    access_key: str = ""
    secret_key: str = ""

    def node_env(self, ifname: str) -> dict[str, str]:
        """What every node's `ray start` gets in its environment, so every Ray process on it (Train workers, Tune
        trials, the job driver) inherits it: where the S3 API is and how to sign for it (botocore and pyarrow's
        S3FileSystem both read AWS_ENDPOINT_URL), and where MLflow is. GLOO_SOCKET_IFNAME: torch's Gloo otherwise
        listens on the address the machine's host name resolves to, which no other namespace reaches (what a real
        cluster sets to its nodes' network interface too). Serve's own proxy on every node, not HAProxy (what
        `ray_app.local` turns on where its binary exists): in HAProxy mode Ray 2.60 binds each replica's HTTP server
        to `http_options.host`, which on a cluster is the head's address (no other node has it), and HAProxy
        reaches a replica on its own node at 127.0.0.1, which a replica bound to the head's address does not
        answer: every request was a 500. And no preference for replicas on the proxy's own node: with the proxy on
        the head only, Serve's default sent every request to the head's replica and left the others idle
        (docs/cluster.md, "Serving on the cluster")."""
        return {
            "RAY_SERVE_ENABLE_HA_PROXY": "0",
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
            "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
            "GLOO_SOCKET_IFNAME": ifname,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RAY_AUTH_MODE": "token",
        }


def _save(cluster: Cluster, state: Path) -> None:
    """Owner-only: it holds the S3 credentials."""
    state.parent.mkdir(parents=True, exist_ok=True)
    state.touch(mode=0o600)
    state.write_text(json.dumps(asdict(cluster), indent=2))


def load(state: Path) -> Cluster:
    raw = json.loads(state.read_text())
    return Cluster(**{**raw, "workers": [WorkerNode(**w) for w in raw["workers"]]})


def _ip(*args: str, netns: str = "") -> str:
    cmd = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


def free_octets(n: int) -> list[int]:
    """Third octets of 10.231.X.0/24 that no interface or route here uses (another cluster's links included)."""
    used = _ip("-4", "-o", "addr") + _ip("-4", "route")
    free = [o for o in range(1, 255) if f"{SUBNET}.{o}." not in used]
    return random.sample(free, n)


def add_link(tag: str, index: int, octet: int) -> WorkerNode:
    """Namespace `rayapp-TAG-wI` with loopback up, and a veth pair: root side 10.231.X.1, namespace side 10.231.X.2
    (its default route back through the root side, so it reaches the head's address on any link)."""
    ns, root_side, ns_side = f"rayapp-{tag}-w{index}", f"ra{tag}h{index}", f"ra{tag}w{index}"
    node = WorkerNode(f"{SUBNET}.{octet}.2", f"/tmp/rayapp-{tag}-w{index}", ns, root_side, ns_side)
    _ip("netns", "add", ns)
    _ip("link", "add", root_side, "type", "veth", "peer", "name", ns_side, "netns", ns)
    _ip("addr", "add", f"{SUBNET}.{octet}.1/24", "dev", root_side)
    _ip("link", "set", root_side, "up")
    _ip("link", "set", "lo", "up", netns=ns)
    _ip("addr", "add", f"{node.ip}/24", "dev", ns_side, netns=ns)
    _ip("link", "set", ns_side, "up", netns=ns)
    _ip("route", "add", "default", "via", f"{SUBNET}.{octet}.1", netns=ns)
    return node


def remove_link(node: WorkerNode) -> None:
    """The namespace's processes (found by the namespace, not by name), the namespace and its veth pair."""
    if not node.namespace:
        return
    with contextlib.suppress(subprocess.SubprocessError):
        stop_pids([int(p) for p in _ip("netns", "pids", node.namespace).split()], grace=5)
    for args in (("netns", "del", node.namespace), ("link", "del", node.link)):
        with contextlib.suppress(subprocess.SubprocessError):
            _ip(*args)


def start_s3(root: Path, host: str, port: int, cluster: Cluster) -> int:
    """moto's S3 API server on HOST:PORT, with the cluster's bucket made through the S3 API itself."""
    import boto3

    root.mkdir(parents=True, exist_ok=True)
    with (root / "s3-server.log").open("ab") as log:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", host, "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        wait_http(f"http://{host}:{port}/", 60)
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name=REGION,
                          aws_access_key_id=cluster.access_key, aws_secret_access_key=cluster.secret_key)  # fmt: skip
        s3.create_bucket(Bucket=cluster.bucket)
    except Exception:
        stop_pids([proc.pid])
        raise
    return proc.pid


def start_worker(cluster: Cluster, node: WorkerNode, num_cpus: int) -> None:
    """`ray start --address HEAD:PORT` for one worker node, inside its namespace when it has one. Its own ports are
    named, so loopback-alias nodes in one namespace do not collide on Ray's fixed defaults."""
    ports = {f"--{name}": str(free_port()) for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")}  # fmt: skip
    cmd = [
        str(BIN / "ray"), "start", f"--address={cluster.ray_address}", f"--node-ip-address={node.ip}",
        f"--temp-dir={node.temp_dir}", f"--num-cpus={num_cpus}", f"--object-store-memory={WORKER_OBJECT_STORE_BYTES}",
        "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items()),
    ]  # fmt: skip
    if node.namespace:
        cmd = ["ip", "netns", "exec", node.namespace, *cmd]
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "RAY_ADDRESS": cluster.ray_address, **cluster.node_env(node.ifname)}
    Path(node.temp_dir).mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=120)


def node_pids(node: WorkerNode) -> list[int]:
    """Every process of one worker node: its namespace's, or (on a loopback alias) those naming its temp dir."""
    if node.namespace:
        return [int(p) for p in _ip("netns", "pids", node.namespace).split()]
    return with_descendants(pids_of(str(Path(node.temp_dir).resolve())))


@dataclass(frozen=True)
class Killed:
    """Processes SIGKILLed: how many, when the last signal left (monotonic) and when every one of them was dead. A
    request sent in between may still have reached a process that was about to die (a big process takes tens of ms
    to tear down, its listening socket open until the end); one sent after `gone_at` cannot have."""

    processes: int
    signalled_at: float
    gone_at: float


def _dead(pid: int) -> bool:
    """Gone, or every thread a zombie: a SIGKILLed process's parent (after `ray start` exits, often PID 1) may never
    reap it. Every thread, not the main one: it turns zombie at once while the others still tear down the process,
    whose sockets stay open (and accept) until the last one has exited (16-23 ms for 2-6 GB measured here)."""
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except (FileNotFoundError, ProcessLookupError):
        return True
    for thread in threads:
        try:
            state = (thread / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # exited between the listing and the read
        if state not in ("Z", "X"):
            return False
    return True


def sigkill(pids: list[int], timeout_s: float = 30) -> Killed:
    """SIGKILL every process at once and return once all are dead (polled every 5 ms), with both times, so a drill
    can tell a request in flight at the death from one sent after it."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    signalled_at = time.monotonic()
    while not all(_dead(pid) for pid in pids) and time.monotonic() < signalled_at + timeout_s:
        time.sleep(0.005)
    return Killed(len(pids), signalled_at, time.monotonic())


def kill_node(node: WorkerNode) -> Killed:
    """A machine lost, as Ray sees it: every process of the node (raylet, workers, agents) SIGKILLed at once, nothing
    told to shut down; a straggler the raylet forked meanwhile gets the same. The namespace and its link stay, ready
    for `restart_node`."""
    killed = sigkill(node_pids(node))
    deadline = killed.gone_at + 30
    while (left := node_pids(node)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    return killed


def restart_node(cluster: Cluster, node: WorkerNode, num_cpus: int) -> None:
    """The lost machine back: a fresh `ray start` at the same address (a new node id to Ray), its old temp dir
    (sockets and logs of the dead raylet) cleared first."""
    shutil.rmtree(node.temp_dir, ignore_errors=True)
    start_worker(cluster, node, num_cpus)


ALIVE_NODES = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
deadline = time.monotonic() + float(sys.argv[3])
while True:
    ips = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    if len(ips) >= int(sys.argv[2]) or time.monotonic() > deadline:
        break
    time.sleep(1)
print(json.dumps(ips))
"""


def alive_node_ips(address: str, expect: int = 1, timeout: float = 0) -> list[str]:
    """The alive nodes' IPs as the GCS knows them, waiting up to `timeout` for `expect` of them. A separate driver
    process, so the caller's own Ray connection (a test session's) is left alone."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    out = subprocess.run([str(BIN / "python"), "-c", ALIVE_NODES, address, str(expect), str(timeout)], env=env,
                         check=True, capture_output=True, text=True, timeout=timeout + 120).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def up(
    state: Path, root: Path, workers: int = 1, netns: bool = True, head_cpus: int = 1, worker_cpus: int = 1
) -> Cluster:
    """Links, S3 API, MLflow, head, workers, in that order (each service must be reachable before a node that needs
    it starts); on any failure everything made so far is removed again before the error is raised."""
    tag = secrets.token_hex(3)
    cluster = Cluster(tag=tag, root=str(root.resolve()), head_ip="127.0.0.1", netns=netns)
    cluster.access_key, cluster.secret_key = f"rayapp-{tag}", secrets.token_urlsafe(24)
    try:
        if netns:
            for index, octet in enumerate(free_octets(workers), start=1):
                cluster.workers.append(add_link(tag, index, octet))
                _save(cluster, state)
            cluster.head_ip = cluster.workers[0].ip.rsplit(".", 1)[0] + ".1"
        else:
            # the head on an alias too (not 127.0.0.1), so it is named by --node-ip-address like the workers
            cluster.head_ip = "127.0.0.2"
            cluster.workers = [WorkerNode(f"127.0.0.{i + 2}", f"/tmp/rayapp-{tag}-w{i}") for i in range(1, workers + 1)]
        head_ifname = cluster.workers[0].link if netns else "lo"
        s3_port, mlflow_port = free_port(), free_port()
        cluster.s3_endpoint = f"http://{cluster.head_ip}:{s3_port}"
        cluster.s3_pid = start_s3(root / "s3", cluster.head_ip, s3_port, cluster)
        _save(cluster, state)
        cluster.mlflow_url = f"http://{cluster.head_ip}:{mlflow_port}"
        cluster.mlflow_pid = start_mlflow(root / "mlflow", mlflow_port, host=cluster.head_ip)
        _save(cluster, state)
        cluster.head_temp_dir = f"/tmp/rayapp-{tag}-h"
        _save(cluster, state)
        cluster.ray_address, cluster.dashboard_url, cluster.head_pids = start_ray_head(
            Path(cluster.head_temp_dir),
            free_port(),
            free_port(),
            head_cpus,
            env=cluster.node_env(head_ifname),
            host=cluster.head_ip,
        )
        _save(cluster, state)
        for node in cluster.workers:
            start_worker(cluster, node, worker_cpus)
        ips = alive_node_ips(cluster.ray_address, 1 + workers, timeout=120)
        if len(ips) < 1 + workers:
            raise RuntimeError(f"only {len(ips)} of {1 + workers} nodes joined the head: {ips}")
    except BaseException:
        down(state)
        raise
    return cluster


def down(state: Path) -> None:
    """Everything the state file lists: worker nodes, head, MLflow, S3 API, namespaces and links; each step runs even
    when an earlier one failed."""
    if not state.exists():
        print("nothing to stop")
        return
    cluster = load(state)
    for node in cluster.workers:
        stop_ray_head(Path(node.temp_dir))  # every process naming that node's temp dir, and their children
        remove_link(node)
    if cluster.head_temp_dir:
        stop_ray_head(Path(cluster.head_temp_dir), cluster.head_pids)
    if cluster.mlflow_pid:
        stop_mlflow(cluster.mlflow_pid, Path(cluster.root) / "mlflow")
    if cluster.s3_pid:
        stop_pids(with_descendants([cluster.s3_pid]))
    for temp_dir in [cluster.head_temp_dir, *(n.temp_dir for n in cluster.workers)]:
        if temp_dir.startswith(f"/tmp/rayapp-{cluster.tag}-"):  # named by this cluster's tag: nobody else's
            shutil.rmtree(temp_dir, ignore_errors=True)
    state.unlink()
    print(f"stopped cluster {cluster.tag} ({1 + len(cluster.workers)} nodes)")


def describe(cluster: Cluster) -> str:
    """Where everything is, and the command that runs the smoke pipeline on every node (`make tiny-model` first)."""
    workers = ", ".join(n.ip + (f" (netns {n.namespace})" if n.namespace else "") for n in cluster.workers)
    return (
        f"Ray head {cluster.ray_address} (dashboard {cluster.dashboard_url}), workers {workers}\n"
        f"MLflow {cluster.mlflow_url}; S3 API {cluster.s3_endpoint}, bucket s3://{cluster.bucket}\n"
        f"RAY_AUTH_MODE=token ray job submit --address {cluster.dashboard_url} --working-dir . -- ray-app pipeline "
        f"--config configs/smoke.yaml --set model.name_or_path={Path('artifacts/tiny-bert').resolve()} "
        f"--set train.num_workers={1 + len(cluster.workers)} --set train.cpus_per_worker=1 "
        f"--set train.placement_strategy=STRICT_SPREAD --set train.storage_path=s3://{cluster.bucket}/ray_results "
        f"--set mlflow.tracking_uri={cluster.mlflow_url}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--state", type=Path, default=Path(".run/cluster.json"))
    parser.add_argument("--root", type=Path, default=None, help="MLflow and S3 server data (default: a temp dir)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--head-cpus", type=int, default=1)
    parser.add_argument("--worker-cpus", type=int, default=1)
    parser.add_argument("--no-netns", action="store_true", help="workers on loopback aliases (no root needed)")
    args = parser.parse_args()
    if args.action == "status" and not args.state.exists():
        raise SystemExit(f"no cluster is up ({args.state} does not exist)")
    if args.action == "up":
        if not args.no_netns and (os.geteuid() != 0 or shutil.which("ip") is None):
            raise SystemExit("network namespaces need root and iproute2's `ip`; without root, the same cluster on "
                             "loopback aliases: `make cluster-up CLUSTER_NETNS=--no-netns`")  # fmt: skip
        if args.state.exists():
            raise SystemExit(f"{args.state} exists: a cluster is up (`make cluster-down` first)")
        root = args.root or Path(tempfile.mkdtemp(prefix="rayapp-cluster-"))
        print(describe(up(args.state, root, args.workers, not args.no_netns, args.head_cpus, args.worker_cpus)))
    elif args.action == "status":
        cluster = load(args.state)
        print(describe(cluster))
        print("alive nodes:", ", ".join(alive_node_ips(cluster.ray_address)))
    else:
        down(args.state)


if __name__ == "__main__":
    main()
