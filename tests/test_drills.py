"""Failure drills that need their own services: the MLflow tracking server stopped for 20 s mid-training.

(The Serve drills use the deployed app in test_serve.py; the Train-worker and Tune-driver drills are in
test_resume.py and test_tune.py.)
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient, fluent

from ray_app.data import prepare
from ray_app.local import start_mlflow, stop_mlflow
from ray_app.pipeline import run_training, training_run
from ray_app.ports import free_port
from ray_app.runtime import setup_mlflow

from .conftest import smoke_config

pytestmark = pytest.mark.slow
OUTAGE_S = 20
EPOCHS = 16


def test_drill_mlflow_down_for_20s_mid_training_loses_no_metric(ray_cluster, tiny_model, storage) -> None:
    """The drill's own `mlflow server` is stopped once the first epoch's metrics arrived and started again on the same
    port and store 20 s later: training neither fails nor waits for it, and every epoch's metrics are there after."""
    root = Path(tempfile.mkdtemp(prefix="mlf-drill-"))
    port = free_port()
    server = {"pid": start_mlflow(root, port)}
    url = f"http://127.0.0.1:{port}"
    previous = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_EXPERIMENT_ID"), fluent._active_experiment_id)
    cfg = smoke_config(
        url, ray_cluster["address"], tiny_model, storage, f"train.epochs={EPOCHS}", "train.max_failures=0"
    )
    marks: dict[str, float] = {}
    try:
        tracking = setup_mlflow(cfg)
        splits = prepare(cfg.data)

        def outage(run_id: str) -> None:
            client = MlflowClient(url)
            deadline = time.monotonic() + 300
            while not client.get_metric_history(run_id, "train/loss") and time.monotonic() < deadline:
                time.sleep(0.2)
            marks["down"] = time.time()
            stop_mlflow(server["pid"], root)
            time.sleep(OUTAGE_S)
            server["pid"] = start_mlflow(root, port)  # same port, same SQLite store and artifact root
            marks["up"] = time.time()

        with training_run(cfg, tracking, splits, "train") as (run_id, name):
            chaos = threading.Thread(target=outage, args=(run_id,), daemon=True)
            chaos.start()
            started = time.time()
            result = run_training(cfg, tracking, splits, run_id, name)
            marks["trained"] = time.time()
        chaos.join(120)
        assert not chaos.is_alive()
        client = MlflowClient(url)
        assert [h["epoch"] for h in result.history] == list(range(1, EPOCHS + 1))
        assert mlflow.get_run(run_id).info.status == "FINISHED"
        for key in ("train/loss", "val/loss", "val/f1_weighted", "train/lr", "train/epoch_s"):
            steps = sorted(m.step for m in client.get_metric_history(run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), f"{key}: {steps}"
        # each epoch's metrics carry the time the epoch ended: no gap as long as the outage means training went on
        times = sorted(m.timestamp for m in client.get_metric_history(run_id, "train/loss"))
        gaps = [(b - a) / 1000 for a, b in itertools.pairwise(times)]
        down_s = marks["up"] - marks["down"]
        during = sum(marks["down"] <= t / 1000 <= marks["up"] for t in times)
        print(
            f"DRILL mlflow-outage: down {down_s:.1f} s (stop, {OUTAGE_S} s, restart) from "
            f"{marks['down'] - started:.1f} s into training; training took {marks['trained'] - started:.1f} s; "
            f"{EPOCHS} epochs, all {EPOCHS} in MLflow; longest gap between epochs {max(gaps):.1f} s; "
            f"about {during} epochs ended while it was down"
        )
        assert during >= 1, "no epoch ended while the server was down: the outage missed training"
        assert max(gaps) < down_s, "an epoch waited for the tracking server"
    finally:
        # later tests' fluent calls must not reach this stopped server, or an experiment id that is only its own
        mlflow.set_tracking_uri(previous[0])
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        if previous[1] is not None:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous[1]
        fluent._active_experiment_id = previous[2]
        stop_mlflow(server["pid"], root)
        shutil.rmtree(root, ignore_errors=True)
