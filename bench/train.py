"""Ray Train vs a plain PyTorch loop on the same model, rows, batch size, epochs, threads, optimizer, loss and padding.

Why: the plain loop is the floor Ray Train's throughput is judged against (goal: Ray / plain >= 0.9 in steady
state), and the difference in wall time shows Ray's fixed cost (workers, controller, data streaming, reporting).
Early stopping is switched off so both run exactly `train.epochs` epochs.

    .venv/bin/python bench/train.py [--config configs/default.yaml] [--set train.epochs=3] [--repeats 3]
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def main() -> None:
    args = parse(parser(__doc__.splitlines()[0]))
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
