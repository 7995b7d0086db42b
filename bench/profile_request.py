"""Where one request's time and CPU go: the app deployed on a fresh head, a fixed number of requests sent, and the CPU
time of every process that touched them read from /proc before and after (proxy, the app's replica, Ray's own
daemons, this client), beside the model's own forward pass measured in process.

    .venv/bin/python bench/profile_request.py --tracking-uri http://127.0.0.1:5000 --model projects-classifier@champion

With --py-spy (py-spy on PATH or in the venv) it also samples the app's replica and Serve's proxy during the concurrent
run and prints each one's functions with the most self time. Needs a registered model (what `make run` leaves).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, _fmt
from serve import closed_loop, texts, wait_ready

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # here and in the replicas it starts

from ray_app.serve.app import DEPLOYMENT

TICK = os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """utime + stime of one process and its reaped children, in ms."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) * 1000 / TICK


def machine_cpu_ms() -> float:
    """All CPU time the machine spent (user, nice, system, irq, softirq), in ms."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    return sum(int(fields[i]) for i in (0, 1, 2, 5, 6)) * 1000 / TICK


def serve_processes(dashboard: str, head_pids: list[int]) -> dict[str, int]:
    """The Serve actors' pids by role, and Ray's daemons on the head."""
    from ray.util.state import list_actors

    roles: dict[str, int] = {}
    for actor in list_actors(address=dashboard, filters=[("state", "=", "ALIVE")], limit=1000):
        name = actor.class_name
        if "ProxyActor" in name:
            roles["serve proxy"] = actor.pid
        elif name.endswith(f":{DEPLOYMENT}"):
            roles.setdefault("app replica", actor.pid)
        elif "ServeController" in name:
            roles["serve controller"] = actor.pid
    for pid in head_pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm in ("raylet", "gcs_server"):
            roles[comm] = pid
    return roles


def forward_cost(model_dir: str, items: list[dict[str, str]], threads: int) -> dict[str, float]:
    """The model alone: wall and CPU ms of one forward pass at batch 1 and batch 16 (per item), in this process."""
    import torch

    from ray_app.model import TextClassifier
    from ray_app.text import join_parts

    torch.set_num_threads(threads)
    clf = TextClassifier.load(model_dir)
    strings = [join_parts([i["title"], i["description"]]) for i in items]
    clf.predict_proba(strings[:32])
    out = {}
    for size in (1, 16):
        walls, cpus = [], []
        for k in range(0, 40 * size, size):
            chunk = strings[k : k + size]
            w, c = time.perf_counter(), time.process_time()
            clf.predict_proba(chunk, batch_size=size)
            walls.append((time.perf_counter() - w) * 1000 / size)
            cpus.append((time.process_time() - c) * 1000 / size)
        out[f"batch {size}: wall ms/item"] = float(np.median(walls))
        out[f"batch {size}: cpu ms/item"] = float(np.median(cpus))
    return out


def measure(url: str, items, roles: dict[str, int], conc: int, n: int) -> dict[str, Any]:
    before = {role: cpu_ms(pid) for role, pid in roles.items()}
    me, machine = cpu_ms(os.getpid()), machine_cpu_ms()
    lat, codes, wall = asyncio.run(closed_loop(url, items, 1, conc, n, 600))
    per_role = {role: (cpu_ms(pid) - before[role]) / len(lat) for role, pid in roles.items()}
    per_role["client (this process)"] = (cpu_ms(os.getpid()) - me) / len(lat)
    per_role["machine, all processes"] = (machine_cpu_ms() - machine) / len(lat)
    return {
        "concurrency": conc,
        "requests": len(lat),
        "status": dict(Counter(codes)),
        "req_s": len(lat) / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "cpu_ms_per_request": per_role,
    }


def py_spy_top(pid: int, seconds: float, top: int = 12) -> list[tuple[str, float]]:
    """py-spy's raw samples of one process, folded to the functions with the most self time (share of samples)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(tempfile.mkdtemp()) / "samples.txt"
    subprocess.run(
        [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-f", "raw", "-o", str(out), "--nonblocking"],
        capture_output=True,
        check=False,
    )
    counts: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        stack, _, n = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        counts[leaf] += int(n)
        total += int(n)
    return [(fn, c / max(total, 1)) for fn, c in counts.most_common(top)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="http://127.0.0.1:5000")
    p.add_argument("--model", default="projects-classifier@champion")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--batch", choices=["on", "off"], default="on")
    p.add_argument("--backend", default="fp32", help="The pool's backend (ray_app/backends.py)")
    p.add_argument("--py-spy", action="store_true")
    p.add_argument("--head-env", nargs="*", default=[], metavar="KEY=VALUE", help="Env of `ray start` (Serve flags)")
    args = p.parse_args()

    import mlflow
    import ray
    from ray import serve

    from ray_app.local import start_ray_head, stop_ray_head
    from ray_app.ports import free_port
    from ray_app.serve.app import build_app
    from ray_app.serve.settings import ServeArgs

    mlflow.set_tracking_uri(args.tracking_uri)
    local = mlflow.artifacts.download_artifacts(f"models:/{args.model}", dst_path=tempfile.mkdtemp(prefix="prof-"))
    model_dir = str(next(Path(local).rglob("config.json")).parent)
    items = texts(2048)
    forward = forward_cost(model_dir, items, threads=2)
    env = dict(kv.split("=", 1) for kv in args.head_env)
    temp = Path(tempfile.mkdtemp(prefix="rp-"))
    address, dashboard, head_pids = start_ray_head(temp, free_port(), free_port(), num_cpus=2, env=env)
    runs, spy = [], {}
    try:
        ray.init(address=address, logging_level="WARNING")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        name, _, alias = args.model.partition("@")
        sargs = ServeArgs(
            tracking_uri=args.tracking_uri,
            model_name=name,
            default_model=f"@{alias}" if alias else args.model,
            batch={"max_batch_size": 32 if args.batch == "on" else 1},
            api_key_env=None,
            backend=args.backend,
        )
        serve.run(build_app(sargs), name="bench", route_prefix="/", logging_config={"enable_access_log": False})
        wait_ready(f"http://127.0.0.1:{port}/ready")
        url = f"http://127.0.0.1:{port}/predict"
        asyncio.run(closed_loop(url, items, 1, 4, 40, 30))  # warm
        roles = serve_processes(dashboard, head_pids)
        for conc in args.concurrency:
            runs.append(measure(url, items, roles, conc, args.requests))
            print(f"concurrency {conc}: {runs[-1]['req_s']:.1f} req/s p50 {runs[-1]['p50_ms']:.1f} ms", flush=True)
        if args.py_spy:
            for role in ("app replica", "serve proxy"):
                if role in roles:  # sampled while 32 clients keep it busy
                    with ThreadPoolExecutor(1) as sampler:
                        sampled = sampler.submit(py_spy_top, roles[role], 8)
                        asyncio.run(closed_loop(url, items, 1, 32, 10_000, 9))
                        spy[role] = sampled.result()
        serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_ray_head(temp, head_pids)

    print("\nthe model alone (this process, 2 torch threads):")
    for k, v in forward.items():
        print(f"  {k}: {v:.2f}")
    print("\n| process | " + " | ".join(f"CPU ms/request, c={r['concurrency']}" for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for role in runs[0]["cpu_ms_per_request"]:
        print(f"| {role} | " + " | ".join(_fmt(r["cpu_ms_per_request"][role]) for r in runs) + " |")
    print("| req/s | " + " | ".join(_fmt(r["req_s"]) for r in runs) + " |")
    print("| p50 ms | " + " | ".join(_fmt(r["p50_ms"]) for r in runs) + " |")
    for role, top in spy.items():
        print(f"\npy-spy, {role}, self time at concurrency 32:")
        for fn, share in top:
            print(f"  {share:6.1%}  {fn}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "profile_request.json"
    out.write_text(json.dumps({"args": vars(args), "forward": forward, "runs": runs, "py_spy": spy}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
