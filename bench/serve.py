"""Serving throughput and latency: the model in process on every backend (the ceiling), two baselines (a plain
FastAPI + uvicorn server, what users would otherwise write, and `mlflow models serve` of the same version, what
MLflow gives for free), and this project's Ray Serve app with batching off, on, and on with the fastest backend whose
F1 verdict accepts it, each with single-item and 32-item requests at several concurrencies; then open-loop sweeps
for the highest request rate that keeps p99 under 100 ms, and the multiplexing run.

    .venv/bin/python bench/serve.py --tracking-uri http://127.0.0.1:5000 --model projects-classifier@champion

Needs a registered model (what `make run` leaves behind); starts its own Ray head on free ports.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, _fmt

P99_TARGET_MS = 100.0
# The head this script starts keeps Ray's token authentication on; a driver naming its address must opt in to it
# (before ray reads its settings).
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Closed-loop cells measure throughput, not shedding: 32 clients x 32 items all fit in the app's queue (the shipped
# max_queued_items of 256 and max_queue_wait_s of 1 s would refuse most 32-item requests at concurrency 32, as they
# should in production; bench/edge.py measures that).
QUEUE_ALL = 2048
QUEUE_WAIT_ALL = 3600.0


def texts(n: int) -> list[dict[str, str]]:
    frame = pd.read_csv(ROOT / "data" / "projects" / "dataset.csv", keep_default_na=False)
    rows = frame[["title", "description"]].to_dict("records")
    return [rows[i % len(rows)] for i in range(n)]


def backends(model_dir: str) -> dict[str, Any]:
    """Every serving backend of the benchmarked version, built the way a replica builds it (ray_app/backends.py)."""
    import torch

    from ray_app.backends import export_onnx, onnx_classifier
    from ray_app.model import TextClassifier, quantize_int8

    torch.set_num_threads(2)
    fp32 = TextClassifier.load(model_dir)
    files = export_onnx(fp32, Path(tempfile.mkdtemp(prefix="bench-onnx-")))
    return {
        "fp32": fp32,
        "torch-int8": quantize_int8(fp32),
        "onnx-fp32": onnx_classifier(fp32, files["onnx-fp32"], threads=2),
        "onnx-int8": onnx_classifier(fp32, files["onnx-int8"], threads=2),
    }


def in_process(classifiers: dict[str, Any], items: list[dict[str, str]], seconds: float) -> list[dict[str, Any]]:
    """The ceiling: predict_proba called directly, one item at a time and 32 at a time, for every backend."""
    from ray_app.text import join_parts

    strings = [join_parts([i["title"], i["description"]]) for i in items]
    rows = []
    for backend, clf in classifiers.items():
        clf.predict_proba(strings[:64])  # warm up
        for size in (1, 32):
            lat, done, start = [], 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                chunk = [strings[(done + k) % len(strings)] for k in range(size)]
                t0 = time.perf_counter()
                clf.predict_proba(chunk, batch_size=min(size, 16))  # the pool's chunk_items
                lat.append((time.perf_counter() - t0) * 1000)
                done += size
            rows.append(cell(f"in-process {backend}", size, 1, lat, [200] * len(lat), time.perf_counter() - start))
    return rows


def backend_quality(tracking_uri: str, model: str, classifiers: dict[str, Any], max_drop: float) -> dict[str, Any]:
    """The verdict a replica makes before it serves a backend: weighted F1 on the version's frozen test rows."""
    from mlflow.tracking import MlflowClient

    from ray_app.backends import judge
    from ray_app.registry import frozen_test_rows

    client = MlflowClient(tracking_uri)
    name, _, alias = model.partition("@")
    version = client.get_model_version_by_alias(name, alias).version if alias else model.split("/")[1]
    rows = frozen_test_rows(client, name, str(version))
    fp32 = classifiers["fp32"]
    out = {}
    for backend, clf in classifiers.items():
        if backend != "fp32":
            v = judge(backend, clf, fp32, rows, ["title", "description"], max_drop)
            out[backend] = {"f1": v.f1, "fp32_f1": v.fp32_f1, "rows": v.rows, "accepted": v.accepted}
    return out


def fastest_accepted(rows: list[dict[str, Any]], quality: dict[str, Any]) -> str:
    """By in-process items/s at batch 32 among the backends whose F1 verdict accepts them (fp32 always qualifies)."""
    speed = {r["server"].removeprefix("in-process "): r["items_s"] for r in rows if r["items_per_request"] == 32}
    allowed = ["fp32"] + [b for b, q in quality.items() if q["accepted"]]
    return max(allowed, key=lambda b: speed.get(b, 0.0))


def cell(server: str, size: int, conc: int, lat: list[float], codes: list[int], wall: float) -> dict[str, Any]:
    ok = [ms for ms, c in zip(lat, codes, strict=True) if c == 200]
    return {
        "server": server,
        "items_per_request": size,
        "concurrency": conc,
        "requests": len(lat),
        "errors": sum(1 for c in codes if c != 200),
        "req_s": len(ok) / wall,
        "items_s": len(ok) * size / wall,
        "p50_ms": float(np.percentile(ok, 50)) if ok else float("nan"),
        "p99_ms": float(np.percentile(ok, 99)) if ok else float("nan"),
    }


def app_body(chunk: list[dict[str, str]]) -> dict[str, Any]:
    return {"items": chunk}


def mlflow_body(chunk: list[dict[str, str]]) -> dict[str, Any]:
    """MLflow's scoring protocol (`/invocations`): the model's input frame as records."""
    return {"dataframe_records": chunk}


async def closed_loop(
    url: str, items: list[dict[str, str]], size: int, conc: int, n: int, seconds: float, body=app_body
):
    """`conc` clients, each sending its next request when the last one returns, until n requests or the time is up."""
    lat: list[float] = []
    codes: list[int] = []
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < n and time.perf_counter() < deadline:
            payload = body([items[(sent * size + k) % len(items)] for k in range(size)])
            sent += 1
            t0 = time.perf_counter()
            r = await c.post(url, json=payload)
            lat.append((time.perf_counter() - t0) * 1000)
            codes.append(r.status_code)

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        start = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(conc)])
        return lat, codes, time.perf_counter() - start


async def open_loop(url: str, items: list[dict[str, str]], rate: float, seconds: float, body=app_body):
    """Requests sent on a fixed schedule, not waiting for replies: latency includes queueing, as real traffic sees."""
    lat: list[float] = []
    codes: list[int] = []

    async def one(c: httpx.AsyncClient, i: int) -> None:
        t0 = time.perf_counter()
        try:
            r = await c.post(url, json=body([items[i % len(items)]]))
            codes.append(r.status_code)
        except httpx.HTTPError:
            codes.append(599)
        lat.append((time.perf_counter() - t0) * 1000)

    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=1000)) as c:
        tasks, start = [], time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(c, i)))
        await asyncio.gather(*tasks)
    ok = [ms for ms, code in zip(lat, codes, strict=True) if code == 200]
    return (float(np.percentile(ok, 99)) if ok else float("inf")), len(codes) - len(ok)


def max_rate(url: str, items, rates: list[float], seconds: float, body=app_body) -> tuple[float, list[dict[str, Any]]]:
    """Up the coarse `rates` until p99 reaches the target, then from the last good rate in 5 req/s steps."""
    best, sweep = 0.0, []

    def held(rate: float) -> bool:
        p99, errors = asyncio.run(open_loop(url, items, rate, seconds, body))
        sweep.append({"rate": rate, "p99_ms": p99, "errors": errors})
        print(f"  open loop {rate:>5.0f} req/s: p99 {p99:7.1f} ms, errors {errors}", flush=True)
        return p99 < P99_TARGET_MS and not errors

    failed = None
    for rate in rates:
        if not held(rate):
            failed = rate
            break
        best = rate
    while failed is not None and best + 5 < failed and held(best + 5):
        best += 5
    return best, sweep


def wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url} not ready after {timeout}s")


def run_cells(server: str, url: str, items, args, body=app_body) -> list[dict[str, Any]]:
    rows = []
    for size in (1, 32):
        for conc in args.concurrency:
            asyncio.run(closed_loop(url, items, size, min(conc, 4), 8, 10, body))  # warm connections and caches
            lat, codes, wall = asyncio.run(closed_loop(url, items, size, conc, args.requests, args.seconds, body))
            rows.append(cell(server, size, conc, lat, codes, wall))
            r = rows[-1]
            print(
                f"  {server:<14} {size:>2} items x{conc:<3} {r['req_s']:7.1f} req/s {r['items_s']:7.1f} items/s "
                f"p50 {r['p50_ms']:7.1f} p99 {r['p99_ms']:7.1f} errors {r['errors']}",
                flush=True,
            )
    return rows


def plain_server(model_dir: str, port: int, items, args) -> tuple[list[dict[str, Any]], float, list]:
    env = {**os.environ, "MODEL_DIR": model_dir, "TORCH_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.plain_server:app", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/ready")
        url = f"http://127.0.0.1:{port}/predict"
        rows = run_cells("fastapi", url, items, args)
        best, sweep = max_rate(url, items, args.rates, args.open_seconds)
        return rows, best, sweep
    finally:
        proc.terminate()
        proc.wait(30)


def mlflow_serve(args, items, port: int) -> tuple[list[dict[str, Any]], float, list]:
    """What an MLflow user gets for free: `mlflow models serve` of the same registered version, one worker, the
    venv's own environment (its `bin` on PATH, where uvicorn is)."""
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    cmd = [f"{bin_dir}/mlflow", "models", "serve", "-m", f"models:/{args.model}", "--env-manager", "local"]
    cmd += ["-w", "1", "-h", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/ping")
        url = f"http://127.0.0.1:{port}/invocations"
        rows = run_cells("mlflow serve", url, items, args, body=mlflow_body)
        best, sweep = max_rate(url, items, args.rates, args.open_seconds, body=mlflow_body)
        return rows, best, sweep
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the uvicorn it starts goes too
        proc.wait(30)


def cache_counts(metrics_url: str) -> dict[str, float]:
    """Hits and misses of the pool's model cache, summed over versions, from the node's Prometheus endpoint."""
    counts = {"hit": 0.0, "miss": 0.0}
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_app_model_cache_total{"):
            for result in counts:
                if f'result="{result}"' in line:
                    counts[result] += float(line.rsplit(" ", 1)[1])
    return counts


def register_copies(tracking_uri: str, model: str, n: int) -> tuple[str, list[str]]:
    """n versions of a separate model name, all pointing at the benchmarked version's artifacts (nothing copied), so
    the user's own registered model is left alone."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    name, _, alias = model.partition("@")
    source = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(*model.split("/"))
    bench_name = f"{source.name}-bench-multiplex"
    with contextlib.suppress(Exception):  # exists from an earlier run: new versions are added
        client.create_registered_model(bench_name, description="bench/serve.py: copies for the multiplexing run")
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    # its lineage tags go with each copy (the run, with its evaluation, is the same), so serving takes them
    versions = [mlflow.register_model(source.source, bench_name, tags=source.tags) for _ in range(n)]
    deadline = time.monotonic() + 120
    while any(client.get_model_version(bench_name, v.version).status != "READY" for v in versions):
        if time.monotonic() > deadline:
            raise SystemExit("registered copies did not become READY")
        time.sleep(1)
    return bench_name, [v.version for v in versions]


def multiplexing(args, items, port: int, metrics_url: str) -> dict[str, Any]:
    """Warm requests on a multiplexed pool vs the single-model numbers; a version's cold load; Zipf traffic over 5
    versions with room for 2 per replica."""
    from ray import serve

    from ray_app.serve.app import build_app
    from ray_app.serve.settings import ServeArgs

    name, versions = register_copies(args.tracking_uri, args.model, 5)
    sargs = ServeArgs(
        tracking_uri=args.tracking_uri,
        model_name=name,
        default_model=versions[0],
        max_models_per_replica=2,
        batch={"max_batch_size": 32, "batch_wait_timeout_s": args.batch_wait},
        max_queued_items=QUEUE_ALL,
        max_queue_wait_s=QUEUE_WAIT_ALL,
        api_key_env=None,
    )
    serve.run(build_app(sargs), name="bench", route_prefix="/", logging_config={"enable_access_log": False})
    wait_ready(f"http://127.0.0.1:{port}/ready")
    base = f"http://127.0.0.1:{port}"
    asyncio.run(closed_loop(f"{base}/predict", items, 1, 4, 8, 10))
    lat, codes, wall = asyncio.run(closed_loop(f"{base}/predict", items, 1, 8, args.requests, args.seconds))
    warm = cell("multiplexed", 1, 8, lat, codes, wall)
    t0 = time.perf_counter()
    httpx.post(f"{base}/predict", json={"title": "cold", "model": versions[2]}, timeout=120).raise_for_status()
    cold_ms = (time.perf_counter() - t0) * 1000
    rng = np.random.default_rng(0)
    weights = 1 / np.arange(1, 6) ** 1.1
    picks = rng.choice(5, size=args.requests, p=weights / weights.sum())
    before = cache_counts(metrics_url)

    async def zipf() -> tuple[list[float], list[int], float]:
        sem, lat, codes = asyncio.Semaphore(8), [], []

        async def one(c: httpx.AsyncClient, i: int) -> None:
            async with sem:
                t = time.perf_counter()
                r = await c.post(f"{base}/predict", json={**items[i % len(items)], "model": versions[picks[i]]})
                lat.append((time.perf_counter() - t) * 1000)
                codes.append(r.status_code)

        async with httpx.AsyncClient(timeout=120) as c:
            start = time.perf_counter()
            await asyncio.gather(*[one(c, i) for i in range(len(picks))])
            return lat, codes, time.perf_counter() - start

    zlat, zcodes, zwall = asyncio.run(zipf())
    time.sleep(12)  # Ray exports metrics every few seconds
    after = cache_counts(metrics_url)
    hits, misses = after["hit"] - before["hit"], after["miss"] - before["miss"]
    serve.delete("bench")
    return {
        "batch_wait": args.batch_wait,
        "warm": warm,
        "cold_load_ms": cold_ms,
        "zipf": {**cell("zipf-5-versions", 1, 8, zlat, zcodes, zwall), "hit_rate": hits / max(hits + misses, 1)},
    }


def serve_variants(args, items, fastest: str) -> tuple[list[dict[str, Any]], float, list, dict[str, Any]]:
    """This project's app on a fresh head: batching off, then on at each wait; then the multiplexing run."""
    import ray
    from ray import serve

    from ray_app.local import start_ray_head, stop_ray_head
    from ray_app.ports import free_port
    from ray_app.serve.app import build_app
    from ray_app.serve.settings import ServeArgs

    temp = Path(tempfile.mkdtemp(prefix="rb-"))
    metrics_port = free_port()
    address, _, pids = start_ray_head(temp, free_port(), free_port(), num_cpus=2, metrics_port=metrics_port)
    rows, best, sweep, mux = [], 0.0, [], {}
    try:
        ray.init(address=address, logging_level="WARNING")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        name, _, ref = args.model.partition("@")
        variants = [("serve", False, 0.0, "fp32", "drain")]
        variants += [(f"serve+batch {w * 1000:g}ms", True, w, "fp32", "drain") for w in args.batch_waits]
        for w in args.serve_batch_waits:
            variants.append((f"serve+@serve.batch {w * 1000:g}ms", True, w, "fp32", "serve_batch"))
        if fastest != "fp32":
            variants.append((f"serve+batch {fastest}", True, args.batch_wait, fastest, "drain"))
        for label, enabled, wait, backend, mode in variants:
            sargs = ServeArgs(
                tracking_uri=args.tracking_uri,
                model_name=name,
                default_model=f"@{ref}" if ref else args.model,
                batch={"max_batch_size": 32 if enabled else 1, "batch_wait_timeout_s": wait, "mode": mode},
                max_queued_items=QUEUE_ALL,
                max_queue_wait_s=QUEUE_WAIT_ALL,
                api_key_env=None,
                backend=backend,
                backend_max_f1_drop=args.max_f1_drop,
            )
            serve.run(build_app(sargs), name="bench", route_prefix="/", logging_config={"enable_access_log": False})
            wait_ready(f"http://127.0.0.1:{port}/ready")
            url = f"http://127.0.0.1:{port}/predict"
            rows += run_cells(label, url, items, args)
            if enabled and wait == args.batch_wait and backend == "fp32" and mode == "drain":
                best, sweep = max_rate(url, items, args.rates, args.open_seconds)
            serve.delete("bench")
        if not args.skip_multiplex:
            mux = multiplexing(args, items, port, f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_ray_head(temp, pids)
    return rows, best, sweep, mux


def table(rows: list[dict[str, Any]]) -> str:
    """Every cell, with ratios against both baselines measured in the same run: plain FastAPI and MLflow's server."""
    plain = {(r["items_per_request"], r["concurrency"]): r for r in rows if r["server"] == "fastapi"}
    mlf = {(r["items_per_request"], r["concurrency"]): r for r in rows if r["server"] == "mlflow serve"}
    names = ["server", "items/request", "concurrency", "req/s", "items/s", "p50 ms", "p99 ms", "errors"]
    names += ["req/s ÷ fastapi", "p99 ÷ fastapi", "req/s ÷ mlflow serve", "p99 ÷ mlflow serve"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]

    def ratios(r: dict[str, Any], baseline: dict | None) -> list[float]:
        if not baseline or r["server"].startswith("in-process"):
            return [float("nan"), float("nan")]
        return [r["req_s"] / baseline["req_s"], r["p99_ms"] / baseline["p99_ms"]]

    for r in rows:
        key = (r["items_per_request"], r["concurrency"])
        cols = [r["server"], r["items_per_request"], r["concurrency"], r["req_s"], r["items_s"], r["p50_ms"]]
        cols += [r["p99_ms"], r["errors"], *ratios(r, plain.get(key)), *ratios(r, mlf.get(key))]
        lines.append("| " + " | ".join(_fmt(float(c) if isinstance(c, float) else c) for c in cols) + " |")
    return "\n".join(lines)


def multiplex_table(mux: dict[str, Any], serve_rows: list[dict[str, Any]]) -> str:
    label = f"serve+batch {mux['batch_wait'] * 1000:g}ms"
    batched = [r for r in serve_rows if r["server"] == label and r["items_per_request"] == 1]
    single = min(batched, key=lambda r: abs(r["concurrency"] - 8))  # the multiplexed runs use concurrency 8
    runs = [("single-model deployment", single), ("multiplexed, warm version", mux["warm"])]
    runs.append(("Zipf over 5 versions, room for 2", mux["zipf"]))
    lines = [
        "| run (1 item, concurrency 8) | req/s | p50 ms | p99 ms | req/s ÷ single-model |",
        "|---|---|---|---|---|",
    ]
    for label, r in runs:
        cols = [r["req_s"], r["p50_ms"], r["p99_ms"], r["req_s"] / single["req_s"]]
        lines.append(f"| {label} | " + " | ".join(_fmt(float(c)) for c in cols) + " |")
    lines.append(
        f"\ncold first request to an unloaded version: {mux['cold_load_ms']:.0f} ms; "
        f"Zipf cache hit rate {mux['zipf']['hit_rate']:.3f}"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="http://127.0.0.1:5000")
    p.add_argument("--model", default="projects-classifier@champion", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=400, help="Most requests per cell")
    p.add_argument("--seconds", type=float, default=15, help="Most seconds per cell")
    p.add_argument("--rates", type=float, nargs="+", default=[20, 40, 60, 80, 100, 120, 140, 160])
    p.add_argument("--open-seconds", type=float, default=8)
    p.add_argument("--batch-wait", type=float, default=0.0, help="serve_config.yaml's wait: open loop, multiplexing")
    p.add_argument("--batch-waits", type=float, nargs="+", default=[0.0], help="Closed-loop cells per wait")
    p.add_argument(
        "--serve-batch-waits", type=float, nargs="*", default=[0.02], help="Cells with Ray's @serve.batch per wait"
    )
    p.add_argument("--skip-multiplex", action="store_true")
    p.add_argument("--skip-mlflow", action="store_true", help="Leave out the `mlflow models serve` baseline")
    p.add_argument("--max-f1-drop", type=float, default=0.005, help="A backend's largest weighted-F1 drop")
    args = p.parse_args()

    import mlflow

    from ray_app.ports import free_port

    mlflow.set_tracking_uri(args.tracking_uri)
    uri = f"models:/{args.model}"
    local = mlflow.artifacts.download_artifacts(uri, dst_path=tempfile.mkdtemp(prefix="bench-model-"))
    model_dir = str(next(Path(local).rglob("config.json")).parent)
    items = texts(2048)
    load = os.getloadavg()[0]
    print(f"model {uri} -> {model_dir}; load average {load:.1f}", flush=True)

    classifiers = backends(model_dir)
    rows = in_process(classifiers, items, args.seconds)
    quality = backend_quality(args.tracking_uri, args.model, classifiers, args.max_f1_drop)
    fastest = fastest_accepted(rows, quality)
    del classifiers  # the servers below have the cores and the memory to themselves
    print(f"backends vs fp32 on the version's test rows: {quality}; fastest accepted: {fastest}", flush=True)
    plain_rows, plain_best, plain_sweep = plain_server(model_dir, free_port(), items, args)
    mlf_rows, mlf_best, mlf_sweep = mlflow_serve(args, items, free_port()) if not args.skip_mlflow else ([], 0, [])
    serve_rows, serve_best, serve_sweep, mux = serve_variants(args, items, fastest)
    rows += plain_rows + mlf_rows + serve_rows
    out = table(rows)
    print("\n" + out)
    print(f"\nopen loop, highest rate with p99 < {P99_TARGET_MS:.0f} ms (single-item requests): ", end="")
    print(f"fastapi {plain_best:.0f} req/s, mlflow serve {mlf_best:.0f} req/s, serve+batch {serve_best:.0f} req/s")
    print(f"\nbackends, weighted F1 on the version's test rows (max drop {args.max_f1_drop}):")
    for backend, q in quality.items():
        verdict = "accepted" if q["accepted"] else "refused"
        print(f"  {backend}: {q['f1']:.4f} vs fp32 {q['fp32_f1']:.4f} on {q['rows']} rows ({verdict})")
    if mux:
        print("\n" + multiplex_table(mux, serve_rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "args": vars(args),
        "rows": rows,
        "open_loop": {"fastapi": plain_sweep, "mlflow serve": mlf_sweep, "serve+batch": serve_sweep},
        "max_rate_p99_under_100ms": {"fastapi": plain_best, "mlflow serve": mlf_best, "serve+batch": serve_best},
        "multiplexing": mux,
        "backend_quality": quality,
        "fastest_accepted_backend": fastest,
        "load_average_at_start": load,
    }
    (RESULTS / "serve.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'serve.json'}")


if __name__ == "__main__":
    main()
