"""`ray-app batch` (Ray Data, actors loading the model once) vs a plain loop calling the same model in batches in one
process: rows/s end to end over the bundled data repeated to N rows, with the same registered version, batch size
and torch threads, in the same run; then the effect of the actor count and the batch size.

Why: batch inference through Ray Data should cost little over the loop a user would write (goal: >= 0.8x on this
2-core machine) while reading many files, checking rows, and scaling out by config alone.

    .venv/bin/python bench/batch.py --tracking-uri http://127.0.0.1:5000 --model projects-classifier@champion \
        --rows 20000 --repeats 2
    .venv/bin/python bench/batch.py --model-dir DIR   # a saved TextClassifier, registered into a temp MLflow

Both sides are timed from start to finish: model load from the registry, reading the CSV, predicting, writing
Parquet. `ray-app batch` also checks every row and starts its actors (fresh processes) on each run. Reads the
registry only; with --model-dir it starts and stops its own MLflow server.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, config, median, parse, parser, report

from ray_app.config import AppConfig


def make_input(cfg: AppConfig, rows: int, out: Path) -> Path:
    """The bundled data repeated to `rows` rows with unique ids, as one CSV (the format users most often have)."""
    frame = pd.read_csv(ROOT / cfg.data.path, dtype=str, keep_default_na=False)
    frame = frame[[cfg.data.id_column, *cfg.data.text_columns]]
    reps = -(-rows // len(frame))
    big = pd.concat([frame.assign(id=frame["id"] + f"-{k}") for k in range(reps)], ignore_index=True).head(rows)
    big.to_csv(out, index=False)
    return out


def plain_loop(cfg: AppConfig, model_uri: str, path: Path, out: Path, batch_size: int, threads: int) -> float:
    """What a user would write without Ray: load the version, read the file, predict chunk by chunk, write Parquet."""
    import torch

    from ray_app.registry import load_classifier

    started = time.perf_counter()
    torch.set_num_threads(threads)
    clf = load_classifier(model_uri)
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    parts = []
    for i in range(0, len(frame), batch_size):
        chunk = frame.iloc[i : i + batch_size]
        pred = clf.predict_frame(chunk, cfg.data.text_columns, batch_size=batch_size)
        parts.append(pred.assign(id=chunk[cfg.data.id_column].to_numpy()))
    pd.concat(parts, ignore_index=True).to_parquet(out)
    return time.perf_counter() - started


def ray_batch(cfg: AppConfig, model_id: str, path: Path, out: Path, tracking_uri: str) -> tuple[float, Any]:
    """The real `ray-app batch` path: ray_app.batch.run_batch, exactly what the CLI command calls."""
    from ray_app.batch import run_batch

    started = time.perf_counter()
    result = run_batch(cfg, model_id, str(path), str(out), tracking_uri, overwrite=True)
    return time.perf_counter() - started, result


@contextlib.contextmanager
def registry(args) -> Iterator[tuple[str, str]]:
    """(tracking URI, model id): the given registry, or a temp MLflow server holding --model-dir as version 1."""
    if not args.model_dir:
        yield args.tracking_uri, args.model
        return
    import mlflow

    from ray_app.local import start_mlflow, stop_mlflow
    from ray_app.ports import free_port
    from ray_app.registry import log_model, register

    root = Path(tempfile.mkdtemp(prefix="bench-mlf-"))
    port = free_port()
    pid = start_mlflow(root, port)
    uri = f"http://127.0.0.1:{port}"
    try:
        mlflow.set_tracking_uri(uri)
        cfg = config(args, "registry.model_name=bench-batch")
        example = pd.DataFrame({"title": ["YOLO for video"], "description": ["real-time object detection"]})
        with mlflow.start_run(run_name="bench-batch") as run:
            version = register(cfg, log_model(cfg, args.model_dir, example), run.info.run_id, {}).version
        yield uri, f"bench-batch/{version}"
    finally:
        stop_mlflow(pid, root)
        shutil.rmtree(root, ignore_errors=True)


def connect() -> Path:
    """A fresh local 2-CPU Ray in its own temp dir, beside any `make run` cluster and never joining it."""
    import logging

    import ray
    from ray.data import DataContext

    temp = Path(tempfile.mkdtemp(prefix="rbb-"))
    ray.init(address="local", num_cpus=2, logging_level=logging.WARNING, _temp_dir=str(temp))
    DataContext.get_current().enable_progress_bars = False  # bars cost little but bury the table
    return temp


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="http://127.0.0.1:5000")
    p.add_argument("--model", default="projects-classifier@champion", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--model-dir", default=None, help="A saved TextClassifier to register into a temp MLflow instead")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="Actor counts; threads split the 2 cores")
    p.set_defaults(repeats=2)
    args = parse(p)

    import mlflow
    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    temp = connect()
    try:
        with registry(args) as (tracking_uri, model_id):
            mlflow.set_tracking_uri(tracking_uri)
            base = config(args, f"mlflow.tracking_uri={tracking_uri}")
            rows, extra = measure(args, base, tracking_uri, model_id, work)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)
    report("batch", "plain loop", "ray-app batch", rows, args, extra)


def measure(args, base: AppConfig, tracking_uri: str, model_id: str, work: Path) -> tuple[list[dict], dict]:
    from ray_app.model_ids import resolve_once

    name, version = resolve_once(model_id, base.registry.model_name)
    uri = f"models:/{name}/{version}"
    path = make_input(base, args.rows, work / "input.csv")
    small = make_input(base, 256, work / "warmup.csv")
    cores = 2
    variants = [(bs, n) for bs in args.batch_sizes for n in args.actors]

    def cfg_for(bs: int, actors: int) -> AppConfig:
        threads = max(1, cores // actors)  # the actors split the cores, as Ray's CPU reservation says
        sets = [f"batch.batch_size={bs}", f"batch.concurrency={actors}", f"batch.torch_threads={threads}"]
        return config(args, f"mlflow.tracking_uri={tracking_uri}", f"batch.num_cpus={threads}", *sets)

    plain_loop(base, uri, small, work / "warm.parquet", 32, cores)  # warm: imports, file cache, first download
    ray_batch(cfg_for(32, 1), model_id, small, work / "warm-out", tracking_uri)
    plain_s: dict[int, list[float]] = {bs: [] for bs in args.batch_sizes}
    ray_s: dict[tuple[int, int], list[float]] = {v: [] for v in variants}
    runs = []
    for rep in range(args.repeats):
        for bs in args.batch_sizes:
            plain_s[bs].append(plain_loop(base, uri, path, work / "plain.parquet", bs, cores))
            print(f"  repeat {rep + 1}: plain loop, batch {bs}: {args.rows / plain_s[bs][-1]:.1f} rows/s", flush=True)
            for actors in args.actors:
                seconds, result = ray_batch(cfg_for(bs, actors), model_id, path, work / "out", tracking_uri)
                assert result.rows_predicted == args.rows, result  # every row predicted, none lost
                ray_s[(bs, actors)].append(seconds)
                runs.append({"batch_size": bs, "actors": actors, "seconds": seconds, **result.durations_s})
                print(
                    f"  repeat {rep + 1}: ray-app batch, batch {bs}, {actors} actor(s): "
                    f"{args.rows / seconds:.1f} rows/s ({result.durations_s})",
                    flush=True,
                )
    rows = []
    for bs, actors in variants:
        threads = max(1, cores // actors)
        rows.append(
            {
                "metric": f"rows/s, batch {bs}, {actors} actor(s) x {threads} thread(s) vs loop with {cores} threads",
                "plain loop": args.rows / median(plain_s[bs]),
                "ray-app batch": args.rows / median(ray_s[(bs, actors)]),
            }
        )
    extra = {
        "model": uri,
        "rows_per_run": args.rows,
        "plain_seconds": {str(k): v for k, v in plain_s.items()},
        "ray_runs": runs,
    }
    return rows, extra


if __name__ == "__main__":
    main()
