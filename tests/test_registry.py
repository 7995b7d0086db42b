"""Promotion gate both ways and rollback, on real registered versions in a real MLflow server."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from ray_app.config import RegistryConfig
from ray_app.data import log_to_mlflow, prepare
from ray_app.errors import AppError
from ray_app.pipeline import register_checkpoint
from ray_app.registry import aliases, decide, promote, rollback


def test_gate_rules() -> None:
    cfg = RegistryConfig(min_score=0.8, margin=0.01)
    assert decide(0.79, None, cfg)[0] is False
    assert decide(0.81, None, cfg) == (True, "first champion: f1_weighted 0.8100 clears registry.min_score 0.8")
    assert decide(0.905, 0.9, cfg)[0] is False
    assert decide(0.91, 0.9, cfg)[0] is True
    assert decide(0.95, 0.9, RegistryConfig(min_score=0.96))[0] is False


@pytest.mark.slow
def test_promotion_gate_both_ways_and_rollback(smoke_run) -> None:
    cfg, results = smoke_run
    name = cfg.registry.model_name
    v1 = results["model"]["version"]
    splits = prepare(cfg.data)
    with mlflow.start_run(run_name="second-version") as run:
        log_to_mlflow(splits, cfg.data)
        v2 = register_checkpoint(cfg, splits, results["train"]["checkpoint_path"], run.info.run_id).version
    assert aliases(cfg.registry) == {"challenger": v2, "champion": v1}

    held = promote(cfg.registry.model_copy(update={"margin": 0.5}))
    assert not held.promoted and "margin 0.5" in held.reason
    assert held.champion_score == pytest.approx(held.challenger_score)  # same weights, same frozen rows
    assert aliases(cfg.registry)["champion"] == v1
    tag = MlflowClient().get_model_version(name, v2).tags["gate"]
    assert tag.startswith("held")

    passed = promote(cfg.registry.model_copy(update={"margin": 0.0}))
    assert passed.promoted and passed.champion_before == v1 and passed.champion_after == v2
    assert aliases(cfg.registry) == {"challenger": v2, "champion": v2, "previous": v1}

    back = rollback(cfg.registry)
    assert back == {"model": name, "champion_before": v2, "champion_after": v1}
    assert aliases(cfg.registry) == {"challenger": v2, "champion": v1}
    with pytest.raises(AppError, match="no 'previous' version"):
        rollback(cfg.registry)


def test_experiments_open_in_mlflows_training_view(mlflow_server) -> None:
    """MLflow 3's UI opens an experiment without `mlflow.experimentKind` on its GenAI traces page."""
    import uuid

    from ray_app.runtime import EXPERIMENT_KIND, experiment_id

    mlflow.set_tracking_uri(mlflow_server)
    key, kind = EXPERIMENT_KIND
    new = experiment_id(f"kind-{uuid.uuid4().hex[:6]}")
    old = mlflow.create_experiment(f"kind-old-{uuid.uuid4().hex[:6]}")  # made before the app, untagged
    assert experiment_id(mlflow.get_experiment(old).name) == old
    for exp in (new, old):
        assert mlflow.get_experiment(exp).tags.get(key) == kind
