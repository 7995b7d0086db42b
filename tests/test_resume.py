"""A Ray Train worker killed mid-epoch resumes from the last checkpoint and loses no finished epoch; a driver that
died leaves a run that the same command continues."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ray_app.data import prepare
from ray_app.pipeline import run_training, training_run
from ray_app.runtime import setup_mlflow

from .conftest import smoke_config

pytestmark = pytest.mark.slow


def _train_worker_pids(dashboard: str) -> list[int]:
    from ray.util.state import list_actors

    alive = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in alive]


def test_drill_train_worker_killed_mid_epoch_resumes_from_last_checkpoint(
    mlflow_server, ray_cluster, tiny_model, storage, smoke_run
) -> None:
    """SIGKILL the Ray Train worker process while it trains epoch 2 of the smoke config: Ray Train starts a new
    worker, which resumes from the epoch-1 checkpoint (weights, optimizer, scheduler and the random stream), and the
    final metrics equal those of the session's uninterrupted smoke run with the same config and seed."""
    cfg = smoke_config(
        mlflow_server, ray_cluster["address"], tiny_model, storage, "train.epochs=2", "train.max_failures=1"
    )  # train.epochs: the smoke run's own number, so its training is the uninterrupted twin
    tracking = setup_mlflow(cfg)
    splits = prepare(cfg.data)
    marks: dict[str, float] = {}

    def kill_in_epoch_2(name: str) -> None:
        deadline = time.monotonic() + 300
        while not list(Path(storage, name).glob("checkpoint_*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        marks["checkpoint_1"] = time.monotonic()
        time.sleep(1.0)  # into epoch 2: an epoch of the smoke config takes several seconds here
        pids = _train_worker_pids(ray_cluster["dashboard"])
        marks["killed"] = time.monotonic()
        marks["pids"] = len(pids)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)

    with training_run(cfg, tracking, splits, "train") as (run_id, name):
        killer = threading.Thread(target=kill_in_epoch_2, args=(name,), daemon=True)
        killer.start()
        result = run_training(cfg, tracking, splits, run_id, name)
        killer.join(60)
    assert marks.get("pids") == 1, f"expected the one training worker to kill: {marks}"
    assert [h["epoch"] for h in result.history] == [1, 2]
    client = MlflowClient()
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train_loss")})
    assert steps == [1, 2], f"an epoch was lost: {steps}"
    resumed = client.get_metric_history(run_id, "resumed_from_epoch")
    assert [m.value for m in resumed] == [1.0], "the new worker did not resume from the epoch-1 checkpoint"
    assert mlflow.get_run(run_id).info.status == "FINISHED"

    twin_cfg, twin = smoke_run
    exclude = {"fail_after_epoch", "max_failures", "storage_path"}
    assert twin_cfg.train.model_dump(exclude=exclude) == cfg.train.model_dump(exclude=exclude)
    final = result.history[-1]
    keys = ("train_loss", "val_loss", "val_f1_weighted")
    uninterrupted = {k: max(client.get_metric_history(twin["run_id"], k), key=lambda m: m.step).value for k in keys}
    print(
        f"DRILL train-worker-kill: SIGKILL {marks['killed'] - marks['checkpoint_1']:.1f} s after the epoch-1 "
        f"checkpoint; resumed from epoch {resumed[0].value:.0f}; final "
        + ", ".join(f"{k} {final[k]:.6f} vs uninterrupted {uninterrupted[k]:.6f}" for k in keys)
    )
    for k in keys:  # CPU, one thread, same seed and data order: the same arithmetic, so only rounding may differ
        assert final[k] == pytest.approx(uninterrupted[k], rel=1e-4, abs=1e-6), k


def test_rerun_of_an_unfinished_run_continues_it(mlflow_server, ray_cluster, tiny_model, storage) -> None:
    """A driver that dies leaves its MLflow run unfinished; the same command again continues that run."""
    cfg = smoke_config(
        mlflow_server,
        ray_cluster["address"],
        tiny_model,
        storage,
        "train.epochs=2",
        "train.fail_after_epoch=1",
        "train.max_failures=0",
    )
    tracking = setup_mlflow(cfg)
    splits = prepare(cfg.data)
    with (
        pytest.raises(Exception, match="failure drill"),
        training_run(cfg, tracking, splits, "train") as (run_id, name),
    ):
        run_training(cfg, tracking, splits, run_id, name)
    assert mlflow.get_run(run_id).info.status == "FAILED"
    again = cfg.model_copy(update={"train": cfg.train.model_copy(update={"fail_after_epoch": None})})
    with training_run(again, tracking, splits, "train") as (run_id2, name2):
        result = run_training(again, tracking, splits, run_id2, name2)
    assert (run_id2, name2) == (run_id, name)
    assert [h["epoch"] for h in result.history] == [1, 2]
    steps = [m.step for m in MlflowClient().get_metric_history(run_id, "train_loss")]
    assert steps == [1, 2]
