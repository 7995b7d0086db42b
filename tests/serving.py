"""Helpers for the Serve tests: register real model versions and deploy serve_config.yaml with the real CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pandas as pd
import torch
import yaml

from ray_app.config import AppConfig
from ray_app.errors import AppError
from ray_app.local import BIN

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = pd.DataFrame(
    {
        "title": ["Transformers for text classification", "YOLO object detection", "Feature store for MLOps"],
        "description": ["Fine-tune BERT on reviews.", "Detect objects in video.", "Serve features in production."],
    }
)


def register_version(cfg: AppConfig, base_model: Path, seed: int, work: Path) -> str:
    """A real classifier (the tiny encoder with a head initialised from `seed`), evaluated on its test rows, logged
    and registered with the lineage tags the pipeline writes; the test split travels with it, as registry.promote
    expects, and serving (require_lineage) takes it."""
    from sklearn.metrics import f1_score

    from ray_app.model import TextClassifier, load_for_training, load_tokenizer
    from ray_app.registry import TEST_SPLIT_ARTIFACT, log_model, register
    from ray_app.registry_auth import EVALUATION_METRIC
    from ray_app.runtime import git_commit
    from ray_app.text import join_text

    torch.manual_seed(seed)
    model_dir = work / f"clf-{seed}"
    clf = TextClassifier(load_for_training(str(base_model), cfg.data.labels), load_tokenizer(str(base_model)))
    clf.save(model_dir)
    test_rows = EXAMPLE.assign(id=["a", "b", "c"], label=["natural-language-processing", "computer-vision", "mlops"])
    predicted = [clf.labels[i] for i in clf.predict_proba(join_text(test_rows, cfg.data.text_columns)).argmax(1)]
    with mlflow.start_run(run_name=f"serve-test-{seed}") as run:
        split = work / f"split-{seed}" / Path(TEST_SPLIT_ARTIFACT).name  # the name frozen_test_rows reads back
        split.parent.mkdir(parents=True, exist_ok=True)
        test_rows.to_csv(split, index=False)
        mlflow.log_artifact(str(split), artifact_path=str(Path(TEST_SPLIT_ARTIFACT).parent))
        mlflow.log_metric(EVALUATION_METRIC, f1_score(test_rows["label"], predicted, average="weighted"))
        uri = log_model(cfg, str(model_dir), EXAMPLE)
        lineage = {
            "data_digest": hashlib.sha256(split.read_bytes()).hexdigest()[:16],
            "config_hash": cfg.fingerprint(),
            "git_commit": git_commit(),
            "seed": str(seed),
        }
        return register(cfg, uri, run.info.run_id, lineage).version


def deploy_config(
    path: Path,
    port: int,
    tracking_uri: str,
    model_name: str,
    log_dir: Path | str,
    api_key: str,
    traffic: dict | None = None,
    stream: dict | None = None,
    host: str | None = None,
    classifier: dict | None = None,
    **args: Any,
) -> Path:
    """serve_config.yaml as shipped, pointed at this session's services and sized for a test. The stream consumer is
    off unless `stream` names a test's own broker (the shipped one points at `make run`'s), the prediction cache
    unless `args` turns it on (the tests of batching and shedding send one text again and again); `args`: more app
    args. On a cluster: `host` is the proxy's address (the head's, not loopback), `classifier` replaces the Classifier
    deployment's settings after the test sizing (num_replicas, max_replicas_per_node) and `log_dir` may be a URI."""
    conf = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    conf["http_options"]["port"] = port
    if host is not None:
        conf["http_options"]["host"] = host
    app = conf["applications"][0]
    app["args"].update(
        tracking_uri=tracking_uri,
        model_name=model_name,
        alias_ttl_s=1,
        body_timeout_s=3,
        max_items=8,
        torch_threads=1,
        batch={"max_batch_size": 8, "batch_wait_timeout_s": 0.0},
        prediction_log={"uri": str(log_dir), "flush_rows": 50, "flush_interval_s": 0.5},
        cache={"enabled": False},
        stream=stream,
    )
    app["args"].update(args)
    app["runtime_env"] = {"env_vars": {"RAY_APP_API_KEY": api_key}}
    (deployment,) = app["deployments"]
    if traffic is not None:
        deployment["user_config"]["traffic"].update(traffic)
    deployment.pop("autoscaling_config")
    deployment["num_replicas"] = 1
    deployment.update(classifier or {})
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def serve_deploy(config: Path, dashboard: str) -> None:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(
        [str(BIN / "serve"), "deploy", str(config), "--address", dashboard],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def wait_until(check, timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (httpx.HTTPError, AssertionError, AppError) as exc:  # AppError: e.g. no log file written yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
