"""Shared plumbing for the bench scripts: the same CLI, Ray connection, table and JSON format in both."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ray_app.config import AppConfig
from ray_app.config_loader import load_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
Row = dict[str, Any]


def parser(description: str) -> argparse.ArgumentParser:
    """The options every bench script shares, so a full-size run is spelt the same way for both."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--address", default=None, help="Ray cluster to join; default: a fresh local 2-CPU instance")
    return p


def parse(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if args.repeats < 1:
        p.error("--repeats must be at least 1: the table reports medians over repeats")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores:  # timings on a 2-core box shared with other work are noise, not a result
        print(f"WARNING: load average {load:.1f} > {cores} cores; other work will distort these timings")
    return args


def config(args: argparse.Namespace, *extra: str) -> AppConfig:
    return load_config(args.config, [*args.overrides, *extra])


def connect(address: str | None) -> float:
    """A fresh local instance (address='local' ignores any cluster a `ray start` left behind); returns its seconds."""
    import ray
    from ray.data import DataContext

    started = time.perf_counter()
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=2, logging_level=logging.WARNING)
    DataContext.get_current().enable_progress_bars = False  # bars cost little but bury the table
    return time.perf_counter() - started


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(value: float, baseline: float) -> float:
    return value / baseline if baseline else float("nan")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if value.is_integer() and abs(value) >= 100:
            return str(int(value))
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.1f}"
    return "-" if value is None else str(value)


def report(name: str, baseline: str, other: str, rows: list[Row], args: argparse.Namespace, extra: Row) -> str:
    """Print the markdown table (columns: metric, baseline, other, other/baseline) and write bench/results/NAME.json.

    Each row is {"metric", baseline: value, other: value}; the ratio is computed here, the same way for every script.
    """
    for row in rows:  # a row where one side has no number (None) has no ratio either
        both = row[baseline] is not None and row[other] is not None
        row["ratio"] = ratio(row[other], row[baseline]) if both else None
    header = ["metric", baseline, other, f"{other}/{baseline}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [f"| {r['metric']} | {_fmt(r[baseline])} | {_fmt(r[other])} | {_fmt(r['ratio'])} |" for r in rows]
    table = "\n".join(lines)
    print(f"\n{name}: medians over {args.repeats} repeat(s); baseline = {baseline}\n{table}\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "baseline": baseline,
        "config": args.config,
        "overrides": args.overrides,
        "repeats": args.repeats,
        "load_average_at_end": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
        "rows": rows,
        **extra,
    }
    out = RESULTS / f"{name}.json"
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {out}")
    return table


def serving_args(tracking_uri: str, model: str, **extra: Any):
    """The app's ServeArgs for a registered model (NAME@ALIAS or NAME/VERSION), no API key, and queues that hold
    everything: the serving benches measure their path, not shedding (bench/edge.py measures that)."""
    from ray_app.serve.settings import ServeArgs

    name, _, alias = model.partition("@")
    return ServeArgs(
        tracking_uri=tracking_uri,
        model_name=name,
        default_model=f"@{alias}" if alias else model,
        max_queued_items=2048,
        max_queue_wait_s=3600.0,
        api_key_env=None,
        **extra,
    )


def cluster_parser(description: str) -> argparse.ArgumentParser:
    """The shared options for the two-node cluster benches: one repeat and the smoke config unless told otherwise."""
    p = parser(description)
    p.set_defaults(repeats=1, config=str(ROOT / "configs" / "smoke.yaml"))
    return p


@contextlib.contextmanager
def fresh_cluster(prefix: str) -> Iterator[tuple[Any, Path]]:
    """ray_app/cluster.py's two-node cluster (head 2 CPUs, one worker node with 1 CPU in a network namespace, moto's
    S3, MLflow) in a temp dir: (cluster, dir). Removed however the bench ends; its MLflow store and models with it."""
    from ray_app.cluster import down, up

    if os.geteuid() != 0:
        raise SystemExit("the cluster's worker node is a network namespace: run as root (sudo)")
    root = Path(tempfile.mkdtemp(prefix=prefix))
    state = root / "cluster.json"
    try:
        yield up(state, root, workers=1, netns=True, head_cpus=2, worker_cpus=1), root
    finally:
        down(state)
        shutil.rmtree(root, ignore_errors=True)
