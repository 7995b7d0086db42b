"""The app's edge under load it should refuse: overload at 3x its capacity, and a flood of unknown model ids beside
normal traffic, each against a baseline measured in the same run on a fresh head.

    .venv/bin/python bench/edge.py --tracking-uri http://127.0.0.1:5000 --model projects-classifier@champion

1. Capacity: a closed loop of 32 clients sending single items (req/s of 200s).
2. Open loop at that capacity (the baseline p99 of admitted requests), then at 3x it: how fast the 503s come back
   and what the admitted requests' p99 becomes.
3. Normal traffic at half the capacity alone (the baseline p50), then with a flood of requests for versions that do
   not exist, each a new id, at `--flood-rate` requests per second.

Needs a registered model (what `make run` leaves behind); the app runs with the shipped defaults (serve_config.yaml's
`max_queued_items`), since shedding is what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, _fmt
from serve import closed_loop, texts, wait_ready

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


async def open_loop(base: str, rate: float, seconds: float, body) -> dict[int, list[float]]:
    """Requests on a fixed schedule, not waiting for replies; latencies (ms) by status (599: no answer)."""
    by_status: dict[int, list[float]] = {}

    async def one(c: httpx.AsyncClient, i: int) -> None:
        t0 = time.perf_counter()
        try:
            status = (await c.post(f"{base}/predict", json=body(i))).status_code
        except httpx.HTTPError:
            status = 599
        by_status.setdefault(status, []).append((time.perf_counter() - t0) * 1000)

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=2000)) as c:
        tasks, start = [], time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(c, i)))
        await asyncio.gather(*tasks)
    return by_status


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(base: str, items, args) -> dict[str, Any]:
    def known(i: int) -> dict[str, str]:
        return dict(items[i % len(items)])

    asyncio.run(closed_loop(f"{base}/predict", items, 1, 4, 20, 10))  # warm
    _, codes, wall = asyncio.run(closed_loop(f"{base}/predict", items, 1, 32, 100_000, args.seconds))
    capacity = codes.count(200) / wall
    print(f"capacity: {capacity:.1f} req/s (closed loop, 32 clients)", flush=True)
    at_cap = asyncio.run(open_loop(base, capacity, args.seconds, known))
    over = asyncio.run(open_loop(base, 3 * capacity, args.seconds, known))
    alone = asyncio.run(open_loop(base, capacity / 2, args.seconds, known))

    async def with_flood() -> dict[int, list[float]]:
        offset = int(time.time()) % 1_000_000  # new ids every run: nothing cached from the last one

        def unknown(i: int) -> dict[str, str]:
            return {"title": "flood", "model": str(10_000_000 + offset * 1000 + i)}

        normal, flood = await asyncio.gather(
            open_loop(base, capacity / 2, args.seconds, known), open_loop(base, args.flood_rate, args.seconds, unknown)
        )
        return {"normal": normal, "flood": flood}

    flooded = asyncio.run(with_flood())
    return {"capacity_req_s": capacity, "at_capacity": at_cap, "over_3x": over, "alone": alone, **flooded}


def table(m: dict[str, Any], flood_rate: float) -> str:
    ok_cap, ok_over = m["at_capacity"].get(200, []), m["over_3x"].get(200, [])
    shed = m["over_3x"].get(503, [])
    rows = [
        ("admitted p99 ms (open loop at capacity vs at 3x)", pct(ok_cap, 99), pct(ok_over, 99)),
        (
            "503 answers at 3x: count / p50 ms / p99 ms",
            "-",
            f"{len(shed)} / {_fmt(pct(shed, 50))} / {_fmt(pct(shed, 99))}",
        ),
        ("other statuses at 3x", "-", json.dumps({k: len(v) for k, v in m["over_3x"].items() if k not in (200, 503)})),
        (
            f"normal p50 ms at half capacity: alone vs beside {flood_rate:g} req/s of unknown ids",
            pct(m["alone"].get(200, []), 50),
            pct(m["normal"].get(200, []), 50),
        ),
        ("normal p99 ms, same", pct(m["alone"].get(200, []), 99), pct(m["normal"].get(200, []), 99)),
        ("flood answers by status", "-", json.dumps({k: len(v) for k, v in m["flood"].items()})),
    ]
    out = ["| measure | baseline | under attack | ratio |", "|---|---|---|---|"]
    for name, base, other in rows:
        ratio = other / base if isinstance(base, float) and isinstance(other, float) and base else "-"
        out.append(f"| {name} | {_fmt(base)} | {_fmt(other)} | {_fmt(ratio)} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="http://127.0.0.1:5000")
    p.add_argument("--model", default="projects-classifier@champion", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--flood-rate", type=float, default=50, help="Requests per second naming unknown versions")
    p.add_argument("--backend", default="fp32", help="The app's backend (ray_app/backends.py)")
    args = p.parse_args()

    import ray
    from ray import serve

    from ray_app.local import free_port, start_ray_head, stop_ray_head
    from ray_app.serve.app import build_app
    from ray_app.serve.settings import ServeArgs

    items = texts(512)
    temp = Path(tempfile.mkdtemp(prefix="rb-edge-"))
    address, _, pids = start_ray_head(temp, free_port(), free_port(), num_cpus=2, metrics_port=free_port())
    try:
        ray.init(address=address, logging_level="WARNING")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        name, _, ref = args.model.partition("@")
        sargs = ServeArgs(
            tracking_uri=args.tracking_uri, model_name=name, default_model=f"@{ref}" if ref else args.model,
            api_key_env=None, backend=args.backend,
        )  # fmt: skip
        serve.run(build_app(sargs), name="bench", route_prefix="/", logging_config={"enable_access_log": False})
        base = f"http://127.0.0.1:{port}"
        wait_ready(f"{base}/ready")
        result = measure(base, items, args)
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_ray_head(temp, pids)
    print(table(result, args.flood_rate))
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        k: ({str(s): len(v) for s, v in val.items()} if isinstance(val, dict) else val) for k, val in result.items()
    }
    (RESULTS / "edge.json").write_text(json.dumps({"args": vars(args), "counts": summary}, indent=2))
    print(f"wrote {RESULTS / 'edge.json'}")


if __name__ == "__main__":
    main()
