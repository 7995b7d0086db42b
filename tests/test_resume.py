"""A worker failure mid-training resumes from the last checkpoint and repeats no finished epoch."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ray_app.data import prepare
from ray_app.pipeline import run_training, training_run
from ray_app.runtime import setup_mlflow

from .conftest import smoke_config

pytestmark = pytest.mark.slow


def test_worker_failure_resumes_from_last_checkpoint(
    mlflow_server, ray_cluster, tiny_model, storage, smoke_run
) -> None:
    """The smoke config's training with its worker failing after epoch 1: Ray Train restarts the worker, which resumes
    from that checkpoint (weights, optimizer, scheduler and the random stream), and the final metrics equal those of
    the session's uninterrupted smoke run with the same config and seed."""
    cfg = smoke_config(
        mlflow_server,
        ray_cluster["address"],
        tiny_model,
        storage,
        "train.epochs=2",  # the smoke run's own number, so its training is the uninterrupted twin
        "train.fail_after_epoch=1",
        "train.max_failures=1",
    )
    tracking = setup_mlflow(cfg)
    splits = prepare(cfg.data)
    with training_run(cfg, tracking, splits, "train") as (run_id, name):
        result = run_training(cfg, tracking, splits, run_id, name)
    assert [h["epoch"] for h in result.history] == [1, 2]
    client = MlflowClient()
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert steps == [1, 2], f"an epoch was repeated or lost: {steps}"
    resumed = client.get_metric_history(run_id, "resumed_from_epoch")
    assert [m.value for m in resumed] == [1.0]
    assert mlflow.get_run(run_id).info.status == "FINISHED"

    twin_cfg, twin = smoke_run
    assert twin_cfg.train.model_dump(
        exclude={"fail_after_epoch", "max_failures", "storage_path"}
    ) == cfg.train.model_dump(exclude={"fail_after_epoch", "max_failures", "storage_path"})
    final = result.history[-1]
    keys = ("train_loss", "val_loss", "val_f1_weighted")
    uninterrupted = {k: max(client.get_metric_history(twin["run_id"], k), key=lambda m: m.step).value for k in keys}
    print(
        f"DRILL train-worker-failure: resumed from epoch {resumed[0].value:.0f}; final "
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
