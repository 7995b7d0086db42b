"""Start and stop a local Ray head and MLflow server the way users do (`ray start --head`, `mlflow server`).

`make run` and the tests share this. Each cluster lives in its own temp dir and is stopped by signalling only its
own processes (found by that dir in their command lines), never with `ray stop`, which stops every Ray on the
machine, and never by process group.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ray_app import RAY_DATA_LOGGING
from ray_app.ports import MAKE_RUN_PORTS, ServePorts, free_port, free_serve_ports, port_open, serve_fast_path
from ray_app.registry_auth import AUTH_APP, Credentials, server_env

BIN = Path(sys.executable).parent
RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where `ray start` with RAY_AUTH_MODE=token keeps it


@dataclass
class Services:
    ray_address: str
    dashboard_url: str
    mlflow_url: str
    ray_temp_dir: str
    mlflow_dir: str
    mlflow_pid: int
    ray_pids: list[int]
    metrics_url: str = ""
    prometheus_url: str = ""
    prometheus_pid: int = 0
    stream_url: str = ""  # the Kafka-protocol broker (broker.py); a state file from before it loads without it
    stream_pid: int = 0


def wait_http(url: str, timeout: float) -> None:
    """Until the server answers; 401 counts, since Ray's dashboard asks for its token (and is up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code == 401:
                return
            time.sleep(0.5)
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def _wait_port(port: int, timeout: float, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while not port_open(port, host):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port} after {timeout:.0f}s")
        time.sleep(0.5)


def pids_of(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (a cluster's temp dir), excluding this one."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def start_mlflow(root: Path, port: int, host: str = "127.0.0.1", admin: Credentials | None = None) -> int:
    """`mlflow server` over a SQLite file, serving artifacts itself so runs store mlflow-artifacts:/ URIs. With an
    admin, MLflow's own authentication (registry_auth.py): every request then needs a user."""
    root.mkdir(parents=True, exist_ok=True)
    auth = ["--app-name", AUTH_APP] if admin else []
    # Another address than loopback (a multi-node cluster's head): MLflow's DNS-rebinding guard accepts private
    # addresses but not a loopback alias (127.0.0.2); name exactly the one it is reached at.
    auth += ["--allowed-hosts", f"{host},{host}:{port}"] if host != "127.0.0.1" else []
    env = {**os.environ, **(server_env(root, admin) if admin else {})}
    log = open(root / "mlflow-server.log", "ab")  # noqa: SIM115 - handed to the child process
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            host,
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{(root / 'mlflow.db').resolve()}",
            "--artifacts-destination",
            str((root / "artifacts").resolve()),
            "--workers",
            "1",
            *auth,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_http(f"http://{host}:{port}/health", 240)  # a busy 2-core machine has needed more than 90 s
    except RuntimeError:
        stop_pids(with_descendants([proc.pid]))  # its uvicorn and job runner too, or they outlive it
        raise
    return proc.pid


def ensure_auth_token(env: dict[str, str]) -> None:
    """With RAY_AUTH_MODE=token set, `ray start` refuses to run without a token and, unlike with the mode unset,
    does not make one, so a fresh machine (CI) cannot start a head: make it with Ray's own `ray get-auth-token
    --generate`, readable by its owner only."""
    if env.get("RAY_AUTH_MODE", "token") != "token" or env.get("RAY_AUTH_TOKEN"):
        return
    path = Path(env.get("RAY_AUTH_TOKEN_PATH") or RAY_TOKEN_FILE).expanduser()
    if not path.exists():
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], check=True, capture_output=True, env=env,
                       timeout=60)  # fmt: skip
    path.chmod(0o600)


def start_ray_head(
    temp_dir: Path,
    port: int,
    dashboard_port: int,
    num_cpus: int = 2,
    env: dict[str, str] | None = None,
    metrics_port: int | None = None,
    serve_ports: ServePorts | None = None,
    host: str = "127.0.0.1",
) -> tuple[str, str, list[int]]:
    """`ray start --head` bound to loopback in its own temp dir; returns (GCS address, dashboard URL, pids).

    `metrics_port` fixes where Prometheus scrapes this node's metrics (Serve's included): http://HOST:PORT/metrics.
    `serve_ports`: where Serve's fast path listens (a free block when not given). `host`: the address the head is
    reached at and names itself by (`--node-ip-address`); another one than loopback for a multi-node cluster
    (cluster.py), where worker nodes must reach the GCS and the dashboard.
    """
    temp_dir.mkdir(parents=True, exist_ok=True)
    agent_port, client_port = free_port(), free_port()
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={port}",
        f"--dashboard-host={host}",
        *([f"--node-ip-address={host}"] if host != "127.0.0.1" else []),
        f"--dashboard-port={dashboard_port}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp_dir.resolve()}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        "--disable-usage-stats",
        *([f"--metrics-export-port={metrics_port}"] if metrics_port else []),
    ]
    # The venv's bin first on PATH, so a `ray job submit -- ray-app ...` entrypoint finds this install's console script.
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    # RAY_ADDRESS for every process of this cluster: Ray internals that call the state API without an address (Train
    # V2's PlacementGroupCleaner) otherwise fail with "Found multiple active Ray instances" when another cluster runs
    # on the machine, and a Tune trial stopped by ASHA then leaks its workers' placement group (the next trial hangs).
    own = {"PATH": path, "RAY_ADDRESS": f"{host}:{port}"}
    defaults = {**serve_fast_path(serve_ports or free_serve_ports()), "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING)}
    full_env = {**defaults, **os.environ, **own, **(env or {})}
    ensure_auth_token(full_env)
    try:
        subprocess.run(cmd, check=True, capture_output=True, env=full_env, timeout=120)
    except subprocess.SubprocessError:  # a start that failed half-way (a busy machine) leaves a GCS and dashboard
        stop_ray_head(temp_dir)
        raise
    dashboard = f"http://{host}:{dashboard_port}"
    try:
        wait_http(f"{dashboard}/api/version", 180)
        # `ray job submit` needs the head's dashboard agent too, and the dashboard waits only 10 s for it: on a busy
        # machine the agent comes up later than the dashboard, so wait for its port as well.
        _wait_port(agent_port, 120, host)
    except RuntimeError:
        stop_ray_head(temp_dir)
        raise
    # Ray Client's proxy names no temp dir on its command line, and `ray start` (its parent) has exited: find it by
    # its port, or it outlives the cluster
    pids = pids_of(str(temp_dir.resolve())) + pids_of(f"ray.util.client.server .*--port={client_port} ")
    return f"{host}:{port}", dashboard, sorted(set(pids))


def with_descendants(pids: list[int]) -> list[int]:
    """The pids and every process below them: Ray renames its workers and agents (`ray::IDLE`), so only their
    parentage says which cluster they belong to."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(found)


def stop_pids(pids: list[int], grace: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def stop_mlflow(pid: int, root: Path) -> None:
    stop_pids(with_descendants([pid, *pids_of(str(root.resolve()))]))


def stop_ray_head(temp_dir: Path, known: list[int] | None = None) -> None:
    """Every process of this cluster: those naming its temp dir, and everything they started."""
    marker = str(temp_dir.resolve())
    stop_pids(with_descendants(sorted(set(pids_of(marker)) | set(known or []))))


def up(
    state_file: Path,
    root: Path,
    ray_port: int,
    dashboard_port: int,
    mlflow_port: int,
    num_cpus: int,
    metrics_port: int = 8080,
    prometheus_port: int = 9090,
) -> Services:
    """Start what is not already running; a second `make run` reuses the first one's services. The head's dashboard
    is told where `make prometheus` will listen (RAY_PROMETHEUS_HOST), for its own Prometheus-backed views."""
    if state_file.exists():
        state = Services(**json.loads(state_file.read_text()))
        if port_open(int(state.ray_address.rsplit(":", 1)[1])) and port_open(int(state.mlflow_url.rsplit(":", 1)[1])):
            print(f"reusing running services from {state_file}")
            return state
        down(state_file)
    for port in (ray_port, dashboard_port, mlflow_port, metrics_port):
        if port_open(port):
            raise SystemExit(f"port {port} is already in use by something else; stop it or choose other ports")
    mlflow_pid = start_mlflow(root / "mlflow", mlflow_port)
    temp_dir = Path(os.environ.get("RAY_APP_RAY_TMP", f"/tmp/ray_app-{os.getuid()}-{ray_port}"))
    address, dashboard, pids = start_ray_head(
        temp_dir,
        ray_port,
        dashboard_port,
        num_cpus,
        env={"RAY_PROMETHEUS_HOST": os.environ.get("RAY_PROMETHEUS_HOST", f"http://127.0.0.1:{prometheus_port}")},
        metrics_port=metrics_port,
        serve_ports=MAKE_RUN_PORTS,
    )
    services = Services(
        address,
        dashboard,
        f"http://127.0.0.1:{mlflow_port}",
        str(temp_dir),
        str((root / "mlflow").resolve()),
        mlflow_pid,
        pids,
        f"http://127.0.0.1:{metrics_port}/metrics",
    )
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(asdict(services), indent=2))
    return services


def prometheus_config(shipped: Path, ray_temp_dir: str) -> dict:
    """The shipped prometheus.yml for this head: its service-discovery file is in the head's own temp dir (not Ray's
    default /tmp/ray), and the rules are named by absolute path."""
    import yaml

    config = yaml.safe_load(shipped.read_text())
    config["rule_files"] = [str((shipped.parent / f).resolve()) for f in config["rule_files"]]
    sd = f"{ray_temp_dir}/session_latest/prom_metrics_service_discovery.json"
    config["scrape_configs"][0]["file_sd_configs"][0]["files"] = [sd]
    return config


def start_prometheus(state_file: Path, root: Path, port: int, shipped: Path) -> str:
    """Prometheus against the running head (`make prometheus`), on 127.0.0.1:PORT with its data under ROOT;
    recorded in the services state so `make stop` stops it too."""
    import yaml

    state = Services(**json.loads(state_file.read_text()))
    if state.prometheus_pid and _alive(state.prometheus_pid):
        return state.prometheus_url
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("`prometheus` is not installed: `apt-get install -y prometheus` (Debian) ships it")
    if port_open(port):
        raise SystemExit(f"port {port} is already in use; choose another with PROMETHEUS_PORT")
    workdir = (root / "prometheus").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(shipped, state.ray_temp_dir)))
    with (workdir / "prometheus.log").open("ab") as log:
        process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    state.prometheus_url, state.prometheus_pid = f"http://127.0.0.1:{port}", process.pid
    wait_http(f"{state.prometheus_url}/-/ready", 60)
    state_file.write_text(json.dumps(asdict(state), indent=2))
    return state.prometheus_url


def down(state_file: Path) -> None:
    if not state_file.exists():
        print("nothing to stop")
        return
    state = Services(**json.loads(state_file.read_text()))
    subprocess.run(
        [str(BIN / "serve"), "shutdown", "-y", "--address", state.dashboard_url],
        capture_output=True,
        timeout=60,
        check=False,
    )
    for pid in (state.prometheus_pid, state.stream_pid):
        if pid:
            stop_pids([pid])
    stop_ray_head(Path(state.ray_temp_dir), state.ray_pids)
    stop_mlflow(state.mlflow_pid, Path(state.mlflow_dir))
    state_file.unlink()
    print("stopped Ray head and MLflow server" + (" and the broker" if state.stream_pid else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down", "wait", "prometheus"])
    parser.add_argument("--prometheus-port", type=int, default=9090)
    parser.add_argument("--prometheus-config", type=Path, default=Path("monitoring/prometheus/prometheus.yml"))
    parser.add_argument("--url", help="wait: the URL that must answer 200")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--state", type=Path, default=Path(".run/services.json"))
    parser.add_argument("--root", type=Path, default=Path(".run"))
    parser.add_argument("--ray-port", type=int, default=6380)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--metrics-port", type=int, default=8080)
    args = parser.parse_args()
    if args.action == "up":
        s = up(
            args.state,
            args.root,
            args.ray_port,
            args.dashboard_port,
            args.mlflow_port,
            args.num_cpus,
            args.metrics_port,
            args.prometheus_port,
        )
        print(f"Ray head {s.ray_address}, dashboard {s.dashboard_url}, MLflow {s.mlflow_url}, metrics {s.metrics_url}")
    elif args.action == "prometheus":
        url = start_prometheus(args.state, args.root, args.prometheus_port, args.prometheus_config)
        print(f"Prometheus {url} (targets: {url}/targets, alerts: {url}/alerts); `make stop` stops it")
    elif args.action == "wait":
        wait_http(args.url, args.timeout)
        print(f"{args.url} is up")
    else:
        down(args.state)


if __name__ == "__main__":
    main()
