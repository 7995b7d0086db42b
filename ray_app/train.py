"""Fine-tuning with Ray Train: one TorchTrainer whose workers read Ray Data shards and checkpoint every epoch."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ray_app.config import AppConfig, TrainConfig
from ray_app.data import Splits, tokenize
from ray_app.drills import FailureDrill
from ray_app.epoch_logger import EpochLogger
from ray_app.errors import AppError
from ray_app.metrics import scores
from ray_app.model import load_for_training, load_tokenizer, resolve_model_path
from ray_app.resources import (
    TrainingRequest,
    refuse_impossible,
    say_if_waiting,
    start_timeout_error,
    worker_threads,
)
from ray_app.storage import checkpoint_uri, own_copy
from ray_app.train_batches import TrimPadding, length_bucketed

log = logging.getLogger("ray_app")
SCORE = "val_f1_weighted"
MODEL_SUBDIR = "model"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
LATENCY_BATCH = 32  # rows per timed forward pass: the batch size serving reaches under load
LATENCY_REPEATS = 7
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@dataclass
class TrainResult:
    """Where the best model is and how the run went; `checkpoint_path` holds a `model/` directory in HF format."""

    run_name: str
    checkpoint_path: str
    best_metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoopConfig:
    """What each Train worker's loop needs, typed: Ray Train hands it over as it is (pickled), nothing is parsed
    again on the worker."""

    train: TrainConfig
    model_path: str
    labels: list[str]
    dropout: float | None
    num_layers: int | None
    n_train: int
    class_weights: list[float]
    tracking_uri: str | None
    run_id: str | None
    measure_latency: bool = False  # every epoch also reports latency_p50_ms (a search's cost objective)
    drill: FailureDrill | None = None


def class_weights(labels: list[str], train_labels: list[str]) -> list[float]:
    """Balanced weights, n / (k * count) (scikit-learn's): the rare `mlops` class counts as much as the others in
    the loss. A label with no training row gets 1.0: no target carries it, so its weight never enters the loss."""
    from sklearn.utils.class_weight import compute_class_weight

    seen = np.array(sorted(set(train_labels)))
    balanced = dict(zip(seen, compute_class_weight("balanced", classes=seen, y=np.array(train_labels)), strict=True))
    return [float(balanced.get(label, 1.0)) for label in labels]


def train_step(model, batch, loss_fn, optimizer, scheduler, device: torch.device, autocast) -> float:
    """One optimisation step, returning the batch loss; bench/train.py times this same function without Ray."""
    batch = {k: v.to(device) for k, v in batch.items()}
    with autocast:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = loss_fn(logits.float(), batch["labels"])
    if not torch.isfinite(loss):
        raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _evaluate(model: torch.nn.Module, batches, device: torch.device, loss_fn) -> dict[str, float]:
    model.eval()
    preds, golds, losses = [], [], []
    with torch.inference_mode():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            losses.append(loss_fn(logits, batch["labels"]).item() * len(batch["labels"]))
            preds.append(logits.argmax(-1).cpu().numpy())
            golds.append(batch["labels"].cpu().numpy())
    y_pred, y_true = np.concatenate(preds), np.concatenate(golds)
    return {"val_loss": float(sum(losses) / len(y_true))} | {f"val_{k}": v for k, v in scores(y_true, y_pred).items()}


def latency_p50_ms(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> float:
    """Median forward time of one batch of validation rows on CPU with this worker's threads: the cost objective of
    a multi-objective search, which fewer layers or a shorter max_length really lower. Concurrent trials on the
    same node share its cores and make it noisier."""
    import copy

    cpu_model = model if device.type == "cpu" else copy.deepcopy(model).cpu()
    cpu_model.eval()
    inputs = {k: batch[k].cpu() for k in ("input_ids", "attention_mask")}
    times = []
    with torch.inference_mode():
        cpu_model(**inputs)  # warm-up: first-call allocations
        for _ in range(LATENCY_REPEATS):
            started = time.perf_counter()
            cpu_model(**inputs)
            times.append(time.perf_counter() - started)
    return float(np.median(times) * 1000)


def _save_checkpoint(directory: Path, model, tokenizer, optimizer, scheduler, state: dict[str, Any]) -> None:
    model.save_pretrained(directory / MODEL_SUBDIR)
    tokenizer.save_pretrained(directory / MODEL_SUBDIR)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            # dropout's random stream where this epoch left it: a resumed run continues exactly as an uninterrupted one
            "torch_rng": torch.get_rng_state(),
            **state,
        },
        directory / STATE_FILE,
    )
    (directory / HISTORY_FILE).write_text(json.dumps(state["history"]))


def _quiet_report_lines() -> None:
    """Ray 2.60 logs every `ray.train.report` (the whole metrics dict and checkpoint path) at INFO on a logger named
    by its file path (`logging.getLogger(__file__)` in ray.train.v2's execution context), which RunConfig's
    LoggingConfig does not reach; the epoch line above says the same in one line."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, LoopConfig]) -> None:
    """Runs on every Ray Train worker; resumes from `ray.train.get_checkpoint()` when Ray hands one back."""
    import ray.train
    import ray.train.torch
    from transformers import AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    from ray_app.runtime import quiet_progress_bars

    quiet_progress_bars()
    _quiet_report_lines()
    loop = config["loop"]
    cfg = loop.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(worker_threads(cfg))
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()

    state: dict[str, Any] = {"epoch": 0, "best": -1.0, "bad_epochs": 0, "stopped": False, "history": []}
    checkpoint = ray.train.get_checkpoint()
    tokenizer = load_tokenizer(loop.model_path)
    if checkpoint:
        with own_copy(checkpoint) as ckpt_dir:  # every worker downloads its own: see own_copy
            model = AutoModelForSequenceClassification.from_pretrained(ckpt_dir / MODEL_SUBDIR)
            saved = torch.load(ckpt_dir / STATE_FILE, weights_only=False)
    else:
        model = load_for_training(loop.model_path, loop.labels, loop.dropout, loop.num_layers)
        saved = None
    resumed_from = state["epoch"] if saved is None else saved["epoch"]
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model

    steps_per_epoch = math.ceil(math.ceil(loop.n_train / world) / cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = steps_per_epoch * cfg.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * total), total)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {k: saved[k] for k in state}
        if rank == 0:
            log.warning("resuming from the checkpoint of epoch %d", state["epoch"])
    weights = torch.tensor(loop.class_weights, device=device) if cfg.class_weighted_loss else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    logger = EpochLogger(loop.tracking_uri, loop.run_id) if rank == 0 else None
    if logger and saved is not None:
        logger.log({"resumed_from_epoch": resumed_from}, step=resumed_from)
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val") if rank == 0 else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if logger:  # what rank 0 really trained on: train.use_gpu only asks Ray for a GPU
        cuda = device.type == "cuda"
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        logger.set_tags({"train.device": f"{device} ({name})", "train.autocast": "bf16" if cuda else "off"})

    param_count = sum(p.numel() for p in raw_model.parameters())
    first_epoch = cfg.epochs + 1 if state["stopped"] else state["epoch"] + 1  # an early-stopped run stays stopped
    if saved is not None and first_epoch > cfg.epochs and state["history"]:
        # A finished run started again (Tune restoring a trial that ended after its last experiment snapshot):
        # report its last epoch once more, so the caller still gets its metrics and a checkpoint.
        ray.train.report(state["history"][-1], checkpoint=checkpoint if rank == 0 else None)
    if saved is not None and "torch_rng" in saved:
        torch.set_rng_state(saved["torch_rng"])
    for epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        seen, loss_sum, started = 0, 0.0, time.perf_counter()
        seed = cfg.seed * 1000 + epoch
        blocks = train_shard.iter_batches(
            batch_size=cfg.batch_size * cfg.length_buckets,
            batch_format="numpy",
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=seed if cfg.shuffle_buffer else None,
        )
        batches = length_bucketed(blocks, cfg.batch_size, np.random.default_rng(seed))
        for batch in _progress(batches, rank, steps_per_epoch, f"epoch {epoch}/{cfg.epochs}"):
            loss = train_step(model, batch, loss_fn, optimizer, scheduler, device, autocast)
            seen += len(batch["labels"])
            loss_sum += loss * len(batch["labels"])
        elapsed = time.perf_counter() - started
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(seen, 1),
            "samples_per_s": seen * world / elapsed,
            "epoch_s": elapsed,
            "lr": scheduler.get_last_lr()[0],
        }
        stop = False
        if rank == 0:
            val_batches = val_data.iter_torch_batches(batch_size=cfg.eval_batch_size, collate_fn=TrimPadding())
            metrics.update(_evaluate(raw_model, val_batches, device, loss_fn))
            metrics["param_count"] = float(param_count)
            if loop.measure_latency:
                timed = val_data.iter_torch_batches(batch_size=LATENCY_BATCH, collate_fn=TrimPadding())
                metrics["latency_p50_ms"] = latency_p50_ms(raw_model, next(iter(timed)), device)
            improved = metrics[SCORE] > state["best"] + 1e-4
            state["best"] = max(state["best"], metrics[SCORE])
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
            state["epoch"] = epoch
            state["history"].append(metrics)
            stop = cfg.early_stopping_patience is not None and state["bad_epochs"] >= cfg.early_stopping_patience
            state["stopped"] = stop
            metrics["early_stopped"] = float(stop)
            logger.log(metrics, step=epoch)
            log.warning("epoch %d: %s", epoch, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "epoch"))
            with tempfile.TemporaryDirectory() as tmp:
                _save_checkpoint(Path(tmp), raw_model, tokenizer, optimizer, scheduler, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics, checkpoint=None)
        if loop.drill is not None and loop.drill.fires(epoch, resumed_from):
            if logger:
                logger.close()  # the drill is a crash after a complete epoch, its metrics sent
            raise RuntimeError(f"failure drill: worker {rank} fails after checkpointing epoch {epoch}")
        if _agree_to_stop(stop, world, device):
            break
    if logger:
        logger.close()


def _progress(iterable, rank: int, total: int, desc: str):
    from tqdm.auto import tqdm

    # Rank 0 only, and only on a terminal (None: tqdm's own check); a job's log gets the epoch lines instead.
    return tqdm(iterable, total=total, desc=desc, disable=True if rank != 0 else None, mininterval=5, leave=False)


def _agree_to_stop(stop: bool, world: int, device: torch.device) -> bool:
    """Rank 0 decides early stopping; every worker must leave the loop together or DDP hangs."""
    if world == 1:
        return stop
    flag = torch.tensor([1.0 if stop else 0.0], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def build_trainer(
    cfg: AppConfig,
    splits: Splits,
    run_name: str,
    tracking_uri: str | None,
    run_id: str | None,
    callbacks: list | None = None,
    measure_latency: bool = False,
    drill: FailureDrill | None = None,
):
    """A TorchTrainer sized from config: workers x CPUs (or GPUs), checkpoints kept by val F1, retries; with
    `measure_latency`, every epoch also reports `latency_p50_ms` (a search's cost objective)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    model_path = resolve_model_path(cfg.model.name_or_path)
    datasets = tokenize(splits, model_path, cfg.data.max_length, cpus=cfg.data.cpus_per_task)
    for ds in datasets.values():  # the loop shows its own per-epoch bar; Ray Data's would repeat it per worker
        ds.context.use_ray_tqdm = False  # a worker's progress then goes to Ray Data's log, not the job's console
    say_if_waiting(tc)
    # Ray Train's only knob for how long a worker group may wait for its resources; it passes it on to its
    # controller. One timeout and no controller retries: a busy cluster fails after start_timeout_s, not never.
    os.environ[WORKER_GROUP_START_TIMEOUT_ENV] = str(tc.start_timeout_s)
    loop = LoopConfig(
        train=tc,
        model_path=model_path,
        labels=splits.labels,
        dropout=cfg.model.dropout,
        num_layers=cfg.model.num_layers,
        n_train=len(splits.train),
        class_weights=class_weights(splits.labels, list(splits.train["label"])),
        tracking_uri=tracking_uri,
        run_id=run_id,
        measure_latency=measure_latency,
        drill=drill,
    )
    storage = tc.storage_path if "://" in tc.storage_path else str(Path(tc.storage_path).expanduser().resolve())
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker=TrainingRequest.of(tc).per_worker,
            placement_strategy=tc.placement_strategy,
            label_selector=tc.label_selector,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=tc.keep_checkpoints, checkpoint_score_attribute=SCORE, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=tc.max_failures, controller_failure_limit=0),
            callbacks=callbacks,
            # Ray Train's per-report INFO lines (checkpoint paths, report dicts) stay in its session log files;
            # the job's console keeps the loop's one line per epoch and Ray Train's warnings
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def train(
    cfg: AppConfig,
    splits: Splits,
    run_name: str,
    tracking_uri: str | None,
    run_id: str | None,
    keep: Literal["best", "last"] = "best",
    drill: FailureDrill | None = None,
) -> TrainResult:
    """Fit and return the best checkpoint by val F1 (or the last one, when the val rows were trained on and cannot
    rank epochs); a run name that exists on storage resumes that run."""
    from ray.train import ControllerError, TrainingFailedError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    started = time.perf_counter()
    refuse_impossible(cfg.train)
    trainer = build_trainer(cfg, splits, run_name, tracking_uri, run_id, drill=drill)
    try:
        result = trainer.fit()
    except ControllerError as exc:
        if isinstance(exc.controller_failure, WorkerGroupStartupTimeoutError):
            raise start_timeout_error(cfg.train) from None
        raise AppError(f"training failed to start: {str(exc).strip().splitlines()[-1]}") from exc
    except TrainingFailedError as exc:
        raise AppError(
            f"training failed after {cfg.train.max_failures} retries: {str(exc).strip().splitlines()[-1]}"
        ) from exc
    best = (result.get_best_checkpoint(metric=SCORE, mode="max") if keep == "best" else None) or result.checkpoint
    if best is None:
        raise AppError("training finished without a checkpoint; check the job log for the worker's error")
    best_metrics = next((m for c, m in result.best_checkpoints or [] if c.path == best.path), result.metrics)
    with (result.checkpoint or best).as_directory() as latest:
        history = json.loads((Path(latest) / HISTORY_FILE).read_text())
    return TrainResult(
        run_name=run_name,
        checkpoint_path=checkpoint_uri(best.path, cfg.train.storage_path),
        best_metrics={k: float(v) for k, v in best_metrics.items() if isinstance(v, (int, float))},
        history=history,
        duration_s=round(time.perf_counter() - started, 2),
    )
