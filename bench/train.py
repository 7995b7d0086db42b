"""Ray Train vs a plain PyTorch loop on the same model, rows, batch size, epochs, threads, optimizer, loss and padding.

Why: the plain loop is the floor Ray Train's throughput is judged against (goal: Ray / plain >= 0.9 in steady
state), and the difference in wall time shows Ray's fixed cost (workers, controller, data streaming, reporting).
Early stopping is switched off so both run exactly `train.epochs` epochs.

`--cluster`: instead, one Ray Train worker on one node against two workers on two nodes (STRICT_SPREAD), same config,
rows and epochs, on a real multi-node cluster this script builds on this machine (ray_app/cluster.py: a 1-CPU head and
one 1-CPU worker node in its own network namespace behind a veth pair, `--no-netns` for loopback aliases without
root; checkpoints on its S3 API) and tears down however the run ends. This process joins the cluster as the driver
(`ray.init(address=...)`) and times `build_trainer(...).fit()` exactly as the plain mode does, rather than submitting
a Ray job: a job would add the job driver's start, the working-dir upload and the polling interval to every number,
none of which is Ray Train's. On one machine both "nodes" share its cores, so this measures what crossing nodes
costs (DDP all-reduce over the veth pair, shards and checkpoints over the network), not a multi-machine speed-up.

    .venv/bin/python bench/train.py [--config configs/default.yaml] [--set train.epochs=3] [--repeats 3]
    .venv/bin/python bench/train.py --cluster [--no-netns] --config configs/smoke.yaml [--set train.epochs=6]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Ray reads this once, when it loads: a driver joining --cluster's nodes (token authentication) must send the token
if "--cluster" in sys.argv:
    os.environ["RAY_AUTH_MODE"] = "token"
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config, connect, median, parse, parser, report

from ray_app.config import AppConfig
from ray_app.data import Splits, prepare, tokenize
from ray_app.model import load_for_training, load_tokenizer, resolve_model_path
from ray_app.resources import worker_threads
from ray_app.train import (
    HISTORY_FILE,
    _evaluate,
    _save_checkpoint,
    build_trainer,
    class_weights,
    train_step,
)
from ray_app.train_batches import length_bucketed

Rows = dict[str, np.ndarray]


def load_rows(cfg: AppConfig, splits: Splits) -> dict[str, Rows]:
    """The very rows Ray Train reads: the project's tokenize(), taken out of the materialized Datasets as numpy."""
    datasets = tokenize(splits, resolve_model_path(cfg.model.name_or_path), cfg.data.max_length)
    return {name: ds.take_batch(batch_size=ds.count(), batch_format="numpy") for name, ds in datasets.items()}


def batches(
    rows: Rows, batch_size: int, seed: int | None = None, buckets: int = 1
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled per epoch when a seed is given (as Ray's local shuffle buffer does for training), then the same
    length bucketing and per-batch trimming as Ray's loop (`length_bucketed`)."""
    n = len(rows["labels"])
    order = np.random.default_rng(seed).permutation(n) if seed is not None else np.arange(n)
    block = batch_size * buckets
    blocks = ({k: v[order[i : i + block]] for k, v in rows.items()} for i in range(0, n, block))
    yield from length_bucketed(blocks, batch_size, np.random.default_rng(seed))


def plain_run(cfg: AppConfig, splits: Splits, rows: dict[str, Rows]) -> dict[str, Any]:
    """The body of train_loop_per_worker without Ray: per epoch, train then validate then write a checkpoint."""
    from transformers import get_linear_schedule_with_warmup

    tc = cfg.train
    torch.set_num_threads(worker_threads(tc))
    torch.manual_seed(tc.seed)
    device = torch.device("cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    model = load_for_training(cfg.model.name_or_path, splits.labels, cfg.model.dropout, cfg.model.num_layers).to(device)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    n_train = len(rows["train"]["labels"])
    total = math.ceil(n_train / tc.batch_size) * tc.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total), total)
    weights = class_weights(splits.labels, list(splits.train["label"])) if tc.class_weighted_loss else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, device=device) if weights else None)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    epochs: list[dict[str, float]] = []
    for epoch in range(1, tc.epochs + 1):
        model.train()
        seen, loss_sum, t0 = 0, 0.0, time.perf_counter()
        seed = tc.seed * 1000 + epoch if tc.shuffle_buffer else None
        for batch in batches(rows["train"], tc.batch_size, seed, tc.length_buckets):
            loss = train_step(model, batch, loss_fn, optimizer, scheduler, device, autocast)
            seen += len(batch["labels"])
            loss_sum += loss * len(batch["labels"])
        t1 = time.perf_counter()
        metrics = _evaluate(model, batches(rows["val"], tc.eval_batch_size), device, loss_fn)
        t2 = time.perf_counter()
        history = [*epochs, {"epoch": epoch, "train_loss": loss_sum / max(seen, 1), **metrics}]
        with tempfile.TemporaryDirectory() as tmp:  # Ray's loop writes one each epoch too
            _save_checkpoint(Path(tmp), model, tokenizer, optimizer, scheduler, {"epoch": epoch, "history": history})
        t3 = time.perf_counter()
        epochs.append({"samples_per_s": seen / (t1 - t0), "epoch_s": t1 - t0, "val_s": t2 - t1, "ckpt_s": t3 - t2})
    return {"epochs": epochs, "wall_s": time.perf_counter() - started}


def ray_run(cfg: AppConfig, splits: Splits) -> dict[str, Any]:
    """build_trainer(...).fit() with MLflow off; per-epoch numbers come from the history.json Ray's loop saved."""
    t0 = time.perf_counter()
    trainer = build_trainer(cfg, splits, f"bench-{uuid.uuid4().hex[:10]}", None, None)
    t1 = time.perf_counter()
    result = trainer.fit()
    t2 = time.perf_counter()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train returned no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as latest:
        history = json.loads((Path(latest) / HISTORY_FILE).read_text())
    epochs = [{"samples_per_s": h["samples_per_s"], "epoch_s": h["epoch_s"]} for h in history]
    return {"epochs": epochs, "wall_s": t2 - t1, "build_s": t1 - t0}


def steady(epochs: list[dict[str, float]]) -> float:
    """Median samples/s over epochs >= 2: epoch 1 carries warm-up (allocator, data pipeline start)."""
    return median([e["samples_per_s"] for e in (epochs[1:] if len(epochs) > 1 else epochs)])


def fixed_cost(run: dict[str, Any]) -> float:
    """fit() wall time not spent in training epochs: worker group start, validation, checkpoint uploads, teardown."""
    return run["wall_s"] - sum(e["epoch_s"] for e in run["epochs"])


def train_worker_ips(dashboard: str) -> dict[str, str]:
    """Actor id -> node IP of every Ray Train worker the cluster has had (dead ones stay listed). Asked through the
    dashboard's URL, not the GCS address, which would re-point this driver's own GCS client (tests/test_cluster.py)."""
    from ray.util.state import list_actors, list_nodes

    ips = {n.node_id: n.node_ip for n in list_nodes(address=dashboard)}
    actors = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=10000)
    return {a.actor_id: ips.get(a.node_id, "?") for a in actors}


def _exit_on_sigterm(*_: Any) -> None:
    """A `kill` ends the run through the `finally` that tears the cluster down, as Ctrl-C does."""
    sys.exit(143)


def cluster_main(args: argparse.Namespace) -> None:
    """One worker on one node (the baseline) against two workers on two nodes, on a cluster built for this run."""
    from ray_app.cluster import down, up

    netns = not args.no_netns
    if netns and (os.geteuid() != 0 or shutil.which("ip") is None):
        raise SystemExit("network namespaces need root and iproute2's `ip`; add --no-netns for loopback aliases")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    state = root / "cluster.json"
    try:
        started = time.perf_counter()
        cluster = up(state, root, workers=1, netns=netns, head_cpus=1, worker_cpus=1)
        up_s = time.perf_counter() - started
        # what every node has in its environment: S3 endpoint and credentials (the driver reads checkpoints back)
        os.environ.update({k: v for k, v in cluster.node_env("lo").items() if k != "GLOO_SOCKET_IFNAME"})
        os.environ["RAY_ADDRESS"] = cluster.ray_address
        storage = f"s3://{cluster.bucket}/bench-{uuid.uuid4().hex[:6]}"
        base = [f"train.storage_path={storage}", "train.early_stopping_patience=null", "train.cpus_per_worker=1"]
        sides = {
            "one_node": config(args, *base, "train.num_workers=1", "train.placement_strategy=PACK"),
            "two_nodes": config(args, *base, "train.num_workers=2", "train.placement_strategy=STRICT_SPREAD"),
        }
        _cluster_runs(args, cluster, sides, up_s)
    finally:
        import ray

        ray.shutdown()
        down(state)
        shutil.rmtree(root, ignore_errors=True)


def _cluster_runs(args: argparse.Namespace, cluster, sides: dict[str, AppConfig], up_s: float) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    init_s = connect(cluster.ray_address)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # again: ray.init put its own handler in place of ours
    cfg = sides["one_node"]
    splits = prepare(cfg.data)
    workers = f"{cluster.workers[0].ip} ({'netns ' + cluster.workers[0].namespace if cluster.netns else 'loopback'})"
    print(
        f"cluster up in {up_s:.0f}s: head {cluster.head_ip} (1 CPU), worker node {workers} (1 CPU); "
        f"train rows {len(splits.train)}, val rows {len(splits.val)}, epochs {cfg.train.epochs}, "
        f"batch {cfg.train.batch_size}, threads per worker {worker_threads(cfg.train)}, ray.init {init_s:.1f}s",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    for i in range(args.repeats):  # alternate who goes first, as the plain comparison does
        order = ("one_node", "two_nodes") if i % 2 == 0 else ("two_nodes", "one_node")
        run: dict[str, Any] = {}
        for side in order:
            before = train_worker_ips(cluster.dashboard_url)
            run[side] = ray_run(sides[side], splits)
            after = train_worker_ips(cluster.dashboard_url)
            run[side]["nodes"] = sorted(ip for actor, ip in after.items() if actor not in before)
        if len(set(run["two_nodes"]["nodes"])) != 2:
            raise RuntimeError(f"STRICT_SPREAD did not put the two workers on two nodes: {run['two_nodes']['nodes']}")
        runs.append(run)
        print(
            f"repeat {i + 1}: one node {steady(run['one_node']['epochs']):.1f}/s on {run['one_node']['nodes']}, "
            f"two nodes {steady(run['two_nodes']['epochs']):.1f}/s on {run['two_nodes']['nodes']}",
            flush=True,
        )

    def per_repeat(side: str, fn: Callable[[dict[str, Any]], float]) -> float:
        return median([fn(run[side]) for run in runs])

    def row(metric: str, fn: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
        return {"metric": metric, "one_node": per_repeat("one_node", fn), "two_nodes": per_repeat("two_nodes", fn)}

    epochs = cfg.train.epochs
    rows_out = [
        row("train samples/s, steady (median of epochs >= 2; all workers)", lambda s: steady(s["epochs"])),
        row("train samples/s, epoch 1", lambda s: s["epochs"][0]["samples_per_s"]),
        row(f"sum of epoch_s over {epochs} epochs (training only)", lambda s: sum(e["epoch_s"] for e in s["epochs"])),
        row("fit() s", lambda s: s["wall_s"]),
        row("fixed cost s: fit() - sum(epoch_s) (start, val, ckpt to S3, end)", fixed_cost),
        row("build_trainer s (tokenize with Ray Data; before fit)", lambda s: s["build_s"]),
    ]
    extra = {"ray_init_s": init_s, "cluster_up_s": up_s, "netns": cluster.netns, "train_rows": len(splits.train),
             "runs": runs}  # fmt: skip
    report("train-cluster", "one_node", "two_nodes", rows_out, args, extra)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--cluster", action="store_true", help="1 worker on 1 node vs 2 workers on 2 nodes (see above)")
    p.add_argument("--no-netns", action="store_true", help="with --cluster: worker node on a loopback alias")
    args = parse(p)
    if args.cluster:
        if args.address:
            p.error("--cluster builds its own cluster; --address joins an existing one: choose one")
        cluster_main(args)
        return
    storage = tempfile.mkdtemp(prefix="bench-ray-train-")
    cfg = config(args, f"train.storage_path={storage}", "train.early_stopping_patience=null")
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialized classifier" once per run is noise here
    init_s = connect(args.address)
    splits = prepare(cfg.data)
    rows = load_rows(cfg, splits)
    print(
        f"train rows {len(splits.train)}, val rows {len(splits.val)}, epochs {cfg.train.epochs}, "
        f"batch {cfg.train.batch_size}, threads {worker_threads(cfg.train)}, ray.init {init_s:.1f}s",
        flush=True,
    )
    runs: list[dict[str, Any]] = []
    try:
        for i in range(args.repeats):  # alternate who goes first so drift in machine load hits both alike
            order = ("plain", "ray") if i % 2 == 0 else ("ray", "plain")
            run = {name: plain_run(cfg, splits, rows) if name == "plain" else ray_run(cfg, splits) for name in order}
            runs.append(run)
            print(
                f"repeat {i + 1}: plain {steady(run['plain']['epochs']):.1f}/s, "
                f"ray {steady(run['ray']['epochs']):.1f}/s",
                flush=True,
            )
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    def per_repeat(side: str, fn: Callable[[dict[str, Any], dict[str, Any]], float]) -> float:
        """fn(this side's run, the whole repeat) per repeat, then the median over repeats."""
        return median([fn(run[side], run) for run in runs])

    def plain_extra(run: dict[str, Any]) -> float:
        return sum(e["val_s"] + e["ckpt_s"] for e in run["plain"]["epochs"])

    epochs = cfg.train.epochs
    rows_out = [
        {
            "metric": "train samples/s, steady (median of epochs >= 2)",
            "plain": per_repeat("plain", lambda s, r: steady(s["epochs"])),
            "ray": per_repeat("ray", lambda s, r: steady(s["epochs"])),
        },
        {
            "metric": "train samples/s, epoch 1",
            "plain": per_repeat("plain", lambda s, r: s["epochs"][0]["samples_per_s"]),
            "ray": per_repeat("ray", lambda s, r: s["epochs"][0]["samples_per_s"]),
        },
        {
            "metric": f"sum of epoch_s over {epochs} epochs (training only)",
            "plain": per_repeat("plain", lambda s, r: sum(e["epoch_s"] for e in s["epochs"])),
            "ray": per_repeat("ray", lambda s, r: sum(e["epoch_s"] for e in s["epochs"])),
        },
        {
            "metric": "validation s per epoch (Ray: inside its loop, not reported)",
            "plain": per_repeat("plain", lambda s, r: median([e["val_s"] for e in s["epochs"]])),
            "ray": None,
        },
        {
            "metric": "checkpoint write s per epoch (Ray: inside its loop, not reported)",
            "plain": per_repeat("plain", lambda s, r: median([e["ckpt_s"] for e in s["epochs"]])),
            "ray": None,
        },
        {
            "metric": "total s: plain model load + epochs + val + ckpt / Ray fit()",
            "plain": per_repeat("plain", lambda s, r: s["wall_s"]),
            "ray": per_repeat("ray", lambda s, r: s["wall_s"]),
        },
        {
            "metric": "Ray fixed cost s: fit() - sum(epoch_s) - plain's (val + ckpt) s",
            "plain": None,
            "ray": per_repeat(
                "ray", lambda s, r: s["wall_s"] - sum(e["epoch_s"] for e in s["epochs"]) - plain_extra(r)
            ),
        },
        {
            "metric": "Ray build_trainer s (tokenize with Ray Data; before fit)",
            "plain": None,
            "ray": per_repeat("ray", lambda s, r: s["build_s"]),
        },
    ]
    extra = {"ray_init_s": init_s, "train_rows": len(splits.train), "runs": runs}
    report("train", "plain", "ray", rows_out, args, extra)
    goal = rows_out[0]["ratio"]
    print(f"steady-state Ray / plain = {goal:.3f} (goal >= 0.9: {'met' if goal >= 0.9 else 'NOT met'})")


if __name__ == "__main__":
    main()
