"""A Ray Train worker killed mid-epoch resumes from the last checkpoint and loses no finished epoch; a driver that
died leaves a run that the same command continues."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ray_app.data import prepare
from ray_app.drills import FailureDrill
from ray_app.pipeline import run_training, training_run
from ray_app.runtime import setup_mlflow

from .conftest import smoke_config

pytestmark = pytest.mark.slow


def _train_worker_pids(dashboard: str) -> list[int]:
    from ray.util.state import list_actors

    alive = list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in alive]


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints Ray Train's controller holds for a run, from the snapshot it writes when it registers one."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME  # private: fails loudly if moved

    try:
        return len(json.loads((run_dir / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return 0


def test_drill_train_worker_killed_mid_epoch_resumes_from_last_checkpoint(
    mlflow_server, ray_cluster, tiny_model, storage, monkeypatch
) -> None:
    """SIGKILL the Ray Train worker process in epoch 2, as soon as the controller holds the epoch-1 checkpoint: Ray
    Train starts a new worker, which resumes from it (weights, optimizer, scheduler and the random stream), and the
    final metrics equal those of an uninterrupted run with the same config and seed.

    A worker killed before its report reached the controller starts over from nothing (Ray Train V2 takes a
    checkpoint only when it polls the worker, every 2 s by default), so the controller polls every 0.1 s here
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, which the driver passes on to it) and the kill waits for its snapshot to list
    the checkpoint; 300 rows at batch 2 make epoch 2 long enough to be killed in."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    cfg = smoke_config(
        mlflow_server, ray_cluster["address"], tiny_model, storage,
        "data.max_rows=300", "train.batch_size=2", "train.epochs=2", "train.max_failures=1",
    )  # fmt: skip
    tracking = setup_mlflow(cfg)
    splits = prepare(cfg.data)
    with training_run(cfg, tracking, splits, "twin") as (twin_id, twin_name):
        twin = run_training(cfg, tracking, splits, twin_id, twin_name)
    before = set(_train_worker_pids(ray_cluster["dashboard"]))
    marks: dict[str, float] = {}

    def kill_in_epoch_2(name: str) -> None:
        deadline, pids = time.monotonic() + 300, []
        while not pids and time.monotonic() < deadline:  # found before the kill: the state API takes a while
            pids = [p for p in _train_worker_pids(ray_cluster["dashboard"]) if p not in before]
            time.sleep(0.2)
        while _registered_checkpoints(Path(storage, name)) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        marks["registered_at_kill"] = _registered_checkpoints(Path(storage, name))
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        marks["killed"], marks["pids"] = time.monotonic(), len(pids)

    with training_run(cfg, tracking, splits, "train") as (run_id, name):
        killer = threading.Thread(target=kill_in_epoch_2, args=(name,), daemon=True)
        killer.start()
        started = time.monotonic()
        result = run_training(cfg, tracking, splits, run_id, name)
        killer.join(60)
    assert marks.get("pids") == 1, f"expected the one training worker to kill: {marks}"
    assert marks["registered_at_kill"] == 1, f"the kill came after epoch 2's checkpoint: {marks}"
    assert [h["epoch"] for h in result.history] == [1, 2]
    client = MlflowClient()
    steps = sorted({m.step for m in client.get_metric_history(run_id, "train/loss")})
    assert steps == [1, 2], f"an epoch was lost: {steps}"
    resumed = client.get_metric_history(run_id, "train/resumed_from_epoch")
    assert [m.value for m in resumed] == [1.0], "the new worker did not resume from the epoch-1 checkpoint"
    assert mlflow.get_run(run_id).info.status == "FINISHED"

    keys = ("train_loss", "val_loss", "val_f1_weighted")
    final, uninterrupted = result.history[-1], twin.history[-1]
    print(
        f"DRILL train-worker-kill: SIGKILL {marks['killed'] - started:.1f} s into the run, once the controller held "
        f"the epoch-1 checkpoint; resumed from epoch {resumed[0].value:.0f}; final "
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
        "train.max_failures=0",
    )
    tracking = setup_mlflow(cfg)
    splits = prepare(cfg.data)
    with (
        pytest.raises(Exception, match="failure drill"),
        training_run(cfg, tracking, splits, "train") as (run_id, name),
    ):
        run_training(cfg, tracking, splits, run_id, name, drill=FailureDrill(after_epoch=1))
    assert mlflow.get_run(run_id).info.status == "FAILED"
    with training_run(cfg, tracking, splits, "train") as (run_id2, name2):
        result = run_training(cfg, tracking, splits, run_id2, name2)
    assert (run_id2, name2) == (run_id, name)
    assert [h["epoch"] for h in result.history] == [1, 2]
    steps = [m.step for m in MlflowClient().get_metric_history(run_id, "train/loss")]
    assert steps == [1, 2]
