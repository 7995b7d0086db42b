"""The app's edge under load it should refuse: overload at 3x its capacity, and a flood of unknown model ids beside
normal traffic, each against a baseline measured in the same run on a fresh head.

    .venv/bin/python bench/edge.py --tracking-uri http://127.0.0.1:5000 --model projects-classifier@champion

The load comes from bench/loadgen.py (raw HTTP/1.1 on uvloop), which leaves the 2 cores to the server: an httpx
client took a whole core at 3x and measured its own delays. Each repeat (`--repeats`, default 3) measures its own
capacity and baselines; the table holds their medians.

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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, _fmt
from loadgen import closed_loop, open_loop, run
from serve import texts, wait_ready

os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def measure(host: str, port: int, items, args) -> dict[str, Any]:
    """Each cell's latencies by status, and how late the generator's sends were (`lag_ms`, p99)."""

    def known(i: int) -> bytes:
        return json.dumps(items[i % len(items)]).encode()

    def cell(rate: float, body=known) -> dict[str, Any]:
        by_status, lag = run(open_loop(host, port, "/predict", rate, args.seconds, body))
        return {**by_status, "lag_ms": lag}

    run(closed_loop(host, port, "/predict", 4, 10, known))  # warm
    statuses, wall = run(closed_loop(host, port, "/predict", 32, args.seconds, known))
    capacity = len(statuses.get(200, [])) / wall
    print(f"capacity: {capacity:.1f} req/s (closed loop, 32 clients)", flush=True)
    at_cap, over, alone = cell(capacity), cell(3 * capacity), cell(capacity / 2)
    offset = int(time.time()) % 1_000_000  # new ids every run: nothing cached from the last one

    def unknown(i: int) -> bytes:
        return json.dumps({"title": "flood", "model": str(10_000_000 + offset * 1000 + i)}).encode()

    async def with_flood() -> tuple[Any, Any]:
        return await asyncio.gather(
            open_loop(host, port, "/predict", capacity / 2, args.seconds, known),
            open_loop(host, port, "/predict", args.flood_rate, args.seconds, unknown),
        )

    (normal, normal_lag), (flood, flood_lag) = run(with_flood())
    return {
        "capacity_req_s": capacity,
        "at_capacity": at_cap,
        "over_3x": over,
        "alone": alone,
        "normal": {**normal, "lag_ms": normal_lag},
        "flood": {**flood, "lag_ms": flood_lag},
    }


def _counts(runs: list[dict[str, Any]], cell: str, skip=("lag_ms",)) -> str:
    """Statuses of one cell summed over the repeats."""
    total: dict[str, int] = {}
    for m in runs:
        for status, values in m[cell].items():
            if status not in skip:
                total[str(status)] = total.get(str(status), 0) + len(values)
    return json.dumps(total)


def table(runs: list[dict[str, Any]], flood_rate: float) -> str:
    """Each figure is the median over the repeats (each repeat measures its own capacity and baselines)."""

    def med(figure) -> float:
        return float(np.median([figure(m) for m in runs]))

    def p(cell: str, status: int, q: float):
        return lambda m: pct(m[cell].get(status, []), q)

    numbers = [
        ("capacity req/s (closed loop, 32 clients)", None, med(lambda m: m["capacity_req_s"])),
        (
            "admitted p99 ms (open loop at capacity vs at 3x)",
            med(p("at_capacity", 200, 99)),
            med(p("over_3x", 200, 99)),
        ),
        ("503 p50 ms at 3x", None, med(p("over_3x", 503, 50))),
        ("503 p99 ms at 3x", None, med(p("over_3x", 503, 99))),
        (
            f"normal p50 ms at half capacity: alone vs beside {flood_rate:g} req/s of unknown ids",
            med(p("alone", 200, 50)),
            med(p("normal", 200, 50)),
        ),
        ("normal p99 ms, same", med(p("alone", 200, 99)), med(p("normal", 200, 99))),
        (
            "load generator's send lag p99 ms (capacity / 3x)",
            med(lambda m: m["at_capacity"]["lag_ms"]),
            med(lambda m: m["over_3x"]["lag_ms"]),
        ),
    ]
    out = [f"medians over {len(runs)} repeat(s)", "", "| measure | baseline | under attack | ratio |"]
    out.append("|---|---|---|---|")
    for name, base, other in numbers:
        ratio = other / base if base else None
        out.append(f"| {name} | {_fmt(base)} | {_fmt(other)} | {_fmt(ratio)} |")
    out.append(f"| statuses at 3x (all repeats) | - | {_counts(runs, 'over_3x')} | - |")
    out.append(f"| flood answers (all repeats) | - | {_counts(runs, 'flood')} | - |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="http://127.0.0.1:5000")
    p.add_argument("--model", default="projects-classifier@champion", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--flood-rate", type=float, default=50, help="Requests per second naming unknown versions")
    p.add_argument("--backend", default="fp32", help="The app's backend (ray_app/backends.py)")
    p.add_argument("--repeats", type=int, default=3, help="Whole measurements (capacity, baselines, attacks)")
    args = p.parse_args()

    import ray
    from ray import serve

    from ray_app.local import start_ray_head, stop_ray_head
    from ray_app.ports import free_port
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
        wait_ready(f"http://127.0.0.1:{port}/ready")
        runs = [measure("127.0.0.1", port, items, args) for _ in range(args.repeats)]
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_ray_head(temp, pids)
    print(table(runs, args.flood_rate))
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = [
        {
            k: ({str(s): (v if s == "lag_ms" else len(v)) for s, v in val.items()} if isinstance(val, dict) else val)
            for k, val in result.items()
        }
        for result in runs
    ]
    (RESULTS / "edge.json").write_text(json.dumps({"args": vars(args), "counts": summary}, indent=2))
    print(f"wrote {RESULTS / 'edge.json'}")


if __name__ == "__main__":
    main()
