"""The CLI as users run it: one clear error line and a non-zero exit for each kind of mistake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ray_app.ports import free_port

from .conftest import ROOT

RAY_APP = str(Path(sys.executable).parent / "ray-app")


def ray_app(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    return subprocess.run([RAY_APP, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: " in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr[-2000:]


def test_version_and_help_name_what_to_type() -> None:
    from importlib.metadata import version

    assert ray_app("--version").stdout.strip() == f"ray-app {version('ray_app')}"
    helped = ray_app("train", "--help").stdout
    assert "KEY=VALUE" in helped and "list[str]" not in helped


def test_unknown_config_key() -> None:
    assert_clean_error(ray_app("pipeline", "--set", "train.bogus=1"), "train.bogus: unknown key")


def test_missing_config_file() -> None:
    assert_clean_error(ray_app("train", "--config", "configs/nope.yaml"), "configs/nope.yaml does not exist")


def test_register_from_a_train_results_file_that_is_missing_or_is_not_one(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    assert_clean_error(ray_app("register", "--train-results", str(missing)), f"train results {missing} cannot be read")
    other = tmp_path / "evaluate.json"
    other.write_text(json.dumps({"run_id": "abc", "metrics": {"f1_weighted": 0.5}}))
    assert_clean_error(ray_app("register", "--train-results", str(other)), "is not a `ray-app train` results JSON")


def test_tracking_server_down() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert_clean_error(ray_app("promote", "--set", f"mlflow.tracking_uri={url}"), url, "not reachable")


def test_model_path_that_does_not_exist(mlflow_server) -> None:
    proc = ray_app(
        "pipeline",
        "-c",
        "configs/smoke.yaml",
        "--set",
        "model.name_or_path=./no/such/model",
        "--set",
        f"mlflow.tracking_uri={mlflow_server}",
    )
    assert_clean_error(proc, "model path ./no/such/model does not exist")


@pytest.mark.slow
def test_missing_data_file(mlflow_server, ray_cluster) -> None:
    proc = ray_app(
        "data",
        "--set",
        "data.path=/no/such.csv",
        "--set",
        f"mlflow.tracking_uri={mlflow_server}",
        "--set",
        f"ray.address={ray_cluster['address']}",
    )
    assert_clean_error(proc, "data file /no/such.csv does not exist")


@pytest.mark.slow
def test_evaluate_a_registered_model_on_any_labelled_csv(smoke_run, tmp_path) -> None:
    cfg, results = smoke_run
    proc = ray_app(
        "evaluate", "-c", "configs/smoke.yaml", "--results-dir", str(tmp_path),
        "--model", f"models:/{cfg.registry.model_name}@champion", "--data", "data/projects/dataset.csv",
        "--set", f"mlflow.tracking_uri={results['tracking_uri']}",
        "--set", f"mlflow.experiment={cfg.mlflow.experiment}",
        "--set", f"ray.address={cfg.ray.address}", "--set", f"model.name_or_path={cfg.model.name_or_path}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("evaluate-*.json")
    payload = json.loads(path.read_text())
    assert payload["n"] > 700 and set(payload["per_class"]) == set(cfg.data.labels)
    assert {"f1_weighted", "accuracy"} <= set(payload["baseline"])
