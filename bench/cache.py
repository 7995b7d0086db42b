"""The prediction cache: throughput and latency of the Serve app with the cache off (the baseline), on with the
replica's LRU, and on with a shared Redis, for traffic that repeats texts the way real traffic does (a Zipf draw over
the data set's rows), with the hit rate each run had (read back from the prediction log's `cached` column).

    .venv/bin/python bench/cache.py --tracking-uri http://127.0.0.1:5000 --model projects-classifier@champion

Needs a registered model (what `make run` leaves behind); starts its own Ray head on free ports, and its own
`redis-server` when Debian's package is installed. Each repeat redeploys the app, so every run starts cold.
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
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, _fmt, median, ratio, serving_args

os.environ.setdefault("RAY_AUTH_MODE", "token")


def zipf_items(n: int, s: float, seed: int) -> list[dict[str, str]]:
    """`n` requests over the data set's rows, row k (in a shuffled order) drawn with probability ~ 1/k^s."""
    frame = pd.read_csv(ROOT / "data" / "projects" / "dataset.csv", keep_default_na=False)
    rows = frame[["title", "description"]].sample(frac=1, random_state=0).to_dict("records")
    weights = 1.0 / np.arange(1, len(rows) + 1) ** s
    picks = np.random.default_rng(seed).choice(len(rows), size=n, p=weights / weights.sum())
    return [rows[i] for i in picks]


async def closed_loop(url: str, items: list[dict[str, str]], conc: int, tag: str):
    """`conc` clients, each sending its next single-item request when the last returns; request ids `tag-i`."""
    lat: list[float] = []
    codes: list[int] = []
    queue = list(enumerate(items))

    async def client(c: httpx.AsyncClient) -> None:
        while queue:
            i, item = queue.pop(0)
            t0 = time.perf_counter()
            r = await c.post(url, json=item, headers={"X-Request-Id": f"{tag}-{i}"})
            lat.append((time.perf_counter() - t0) * 1000)
            codes.append(r.status_code)

    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        start = time.perf_counter()
        await asyncio.gather(*[client(c) for _ in range(conc)])
        return lat, codes, time.perf_counter() - start


def hit_rate(log_dir: Path, tag: str, n: int) -> float:
    """Share of this run's rows the app answered from the cache, once every row is in the log."""
    from ray_app.prediction_log import read_recent

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        frame = read_recent(str(log_dir))
        mine = frame[frame["request_id"].str.startswith(f"{tag}-")]
        if len(mine) >= n:
            return float(mine["cached"].fillna(False).astype(bool).mean())
        time.sleep(0.5)
    raise SystemExit(f"the prediction log never held the {n} rows of {tag}")


def start_redis(port: int, workdir: Path) -> subprocess.Popen | None:
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed (apt-get install -y redis-server): the redis row is left out")
        return None
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return proc


def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    import ray
    import redis
    from ray import serve
    from serve import wait_ready

    from ray_app.local import start_ray_head, stop_ray_head
    from ray_app.ports import free_port
    from ray_app.serve.app import build_app

    temp = Path(tempfile.mkdtemp(prefix="rc-"))
    log_dir, redis_port = temp / "predlog", free_port()
    redis_proc = start_redis(redis_port, temp)
    address, _, pids = start_ray_head(temp / "ray", free_port(), free_port(), num_cpus=2)
    variants = {"off": {"enabled": False}, "local": {"enabled": True, "backend": "local", "max_items": 10_000}}
    if redis_proc is not None:
        variants["redis"] = {"enabled": True, "backend": "redis", "url": f"redis://127.0.0.1:{redis_port}/0"}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    try:
        ray.init(address=address, logging_level="WARNING")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for repeat in range(args.repeats):
            items = zipf_items(args.requests, args.zipf_s, seed=repeat)
            for variant, cache in variants.items():
                if variant == "redis":
                    redis.Redis(port=redis_port).flushdb()  # cold, like the replica's own LRU after a redeploy
                sargs = serving_args(
                    args.tracking_uri,
                    args.model,
                    prediction_log={"uri": str(log_dir), "flush_interval_s": 0.5},
                    cache=cache,
                )
                serve.run(build_app(sargs), name="bench", route_prefix="/", logging_config={"enable_access_log": False})
                wait_ready(f"http://127.0.0.1:{port}/ready")
                url = f"http://127.0.0.1:{port}/predict"
                warm = [{"title": f"warm-up {repeat} {i}"} for i in range(8)]  # loads the model; never repeated
                asyncio.run(closed_loop(url, warm, 2, f"warm{repeat}{variant}"))
                tag = f"r{repeat}{variant}"
                lat, codes, wall = asyncio.run(closed_loop(url, items, args.concurrency, tag))
                ok = [ms for ms, c in zip(lat, codes, strict=True) if c == 200]
                row = {
                    "req_s": len(ok) / wall,
                    "p50_ms": float(np.percentile(ok, 50)),
                    "p99_ms": float(np.percentile(ok, 99)),
                    "errors": len(codes) - len(ok),
                    "hit_rate": hit_rate(log_dir, tag, len(items)),
                    "distinct_share": len({json.dumps(i, sort_keys=True) for i in items}) / len(items),
                }
                runs[variant].append(row)
                print(
                    f"  repeat {repeat} cache {variant:<5} {row['req_s']:7.1f} req/s p50 {row['p50_ms']:6.1f} "
                    f"p99 {row['p99_ms']:6.1f} ms hit rate {row['hit_rate']:.2f} errors {row['errors']}",
                    flush=True,
                )
                serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_ray_head(temp / "ray", pids)
        if redis_proc is not None:
            redis_proc.terminate()
    return runs


def table(runs: dict[str, list[dict[str, Any]]]) -> str:
    base = {k: median([r[k] for r in runs["off"]]) for k in ("req_s", "p50_ms", "p99_ms")}
    lines = [
        "| cache | req/s | p50 ms | p99 ms | hit rate | req/s vs off | p99 vs off | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, rows in runs.items():
        med = {k: median([r[k] for r in rows]) for k in ("req_s", "p50_ms", "p99_ms", "hit_rate")}
        cells = [
            variant,
            med["req_s"],
            med["p50_ms"],
            med["p99_ms"],
            med["hit_rate"],
            ratio(med["req_s"], base["req_s"]),
            ratio(med["p99_ms"], base["p99_ms"]),
            sum(r["errors"] for r in rows),
        ]
        lines.append("| " + " | ".join(_fmt(c) if not isinstance(c, int) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="http://127.0.0.1:5000")
    p.add_argument("--model", default="projects-classifier@champion", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--requests", type=int, default=600, help="Single-item requests per run")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent of the draw over the data set's rows")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    runs = run(args)
    md = table(runs)
    distinct = median([r["distinct_share"] for rows in runs.values() for r in rows])
    print(
        f"\ncache: medians over {args.repeats} repeat(s), {args.requests} single-item requests at concurrency "
        f"{args.concurrency}, Zipf s={args.zipf_s} (distinct texts: {distinct:.0%}); baseline = cache off\n{md}\n"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cache.json"
    out.write_text(json.dumps({"name": "cache", "baseline": "off", "args": vars(args), "runs": runs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
