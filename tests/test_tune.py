"""Hyperparameter search: config checks at load time, and a real smoke search (Ray Tune + Optuna on a temp SQLite
study + ASHA) with nested MLflow runs and the best trial registered as challenger."""

from __future__ import annotations

import re
import uuid

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ray_app.config import TuneConfig, load_config
from ray_app.errors import AppError
from ray_app.tune import apply_params, default_point, open_storage

from .conftest import smoke_config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.space={lr: {kind: loguniform, low: 0.01, high: 0.001}}", "needs low < high"),
        ("tune.space={lr: {kind: loguniform, low: 0, high: 0.001}}", "needs low > 0"),
        ("tune.space={lr: {kind: choice, values: []}}", "non-empty 'values'"),
        ("tune.space={learning_rate: {kind: uniform, low: 0, high: 1}}", "unknown parameter(s) ['learning_rate']"),
        ("tune.sampler=cmaes", "tune.sampler"),
        ("tune.scheduler=hyperband", "tune.scheduler"),
    ],
)
def test_bad_search_config_fails_at_load(override: str, message: str) -> None:
    with pytest.raises(AppError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_params_land_on_their_config_keys() -> None:
    cfg = apply_params(load_config(None), {"lr": 3e-4, "dropout": 0.2, "max_length": 64, "batch_size": 16})
    assert (cfg.train.lr, cfg.model.dropout, cfg.data.max_length, cfg.train.batch_size) == (3e-4, 0.2, 64, 16)
    assert default_point(load_config(None)) == {"lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.1}
    assert default_point(load_config(None, ["train.lr=0.5"])) is None  # outside the space: no first point


def test_unreachable_storage_is_named() -> None:
    with pytest.raises(AppError, match=re.escape("postgresql://nobody@127.0.0.1:1/none")):
        open_storage(TuneConfig(storage="postgresql://nobody@127.0.0.1:1/none"))


@pytest.mark.slow
def test_smoke_search_end_to_end(mlflow_server, ray_cluster, tiny_model, storage, tmp_path) -> None:
    from ray_app.pipeline import run_tune
    from ray_app.runtime import setup_mlflow

    name = f"smoke-tune-{uuid.uuid4().hex[:6]}"
    cfg = smoke_config(
        mlflow_server, ray_cluster["address"], tiny_model, storage,
        "tune.num_samples=3", f"tune.storage=sqlite:///{tmp_path}/optuna.db", f"tune.study_name={name}",
        "tune.space={lr: {kind: loguniform, low: 1.0e-4, high: 1.0e-2}, "
        "warmup_ratio: {kind: uniform, low: 0, high: 0.2}}",
        f"registry.model_name={name}",
    )  # fmt: skip
    results = run_tune(cfg, setup_mlflow(cfg))
    search = results["search"]
    assert len(search["trials"]) == 3
    assert {t["status"] for t in search["trials"]} <= {"completed", "stopped_early"}
    parent = results["run_id"]
    client = MlflowClient()
    children = client.search_runs([mlflow.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 3 and all(c.data.tags["trial_status"] in {"completed", "stopped_early"} for c in children)
    assert all(c.data.metrics.get("val_f1_weighted") is not None for c in children)
    files = {f.path for f in client.list_artifacts(parent, "tune")}
    assert {"tune/trials.csv", "tune/optimization_history.png"} <= files
    version = client.get_model_version_by_alias(name, "challenger")
    assert version.run_id == parent
    assert search["best_checkpoint_path"].startswith(str(storage))
