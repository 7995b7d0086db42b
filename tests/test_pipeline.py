"""The whole pipeline on the smoke config against a real `ray start --head` and a real `mlflow server`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def test_pipeline_end_to_end(smoke_run) -> None:
    cfg, results = smoke_run
    model = results["model"]
    assert model["aliases"] == {"challenger": model["version"], "champion": model["version"]}
    assert results["promotion"]["promoted"] and "first champion" in results["promotion"]["reason"]
    assert set(results["durations_s"]) == {"data", "train", "evaluate", "register", "promote"}
    assert set(results["test_metrics"]) == {"accuracy", "f1_weighted", "f1_macro"}
    assert set(results["test_per_class"]) == set(cfg.data.labels) and results["test_slices"]
    assert (
        results["vs_baseline"]["ci_low"]
        <= results["vs_baseline"]["f1_weighted_diff"]
        <= results["vs_baseline"]["ci_high"]
    )
    assert results["data"]["split_sizes"]["train"] > 0 and results["train"]["best_metrics"]["epoch"] >= 1
    json.dumps(results)  # the results JSON must serialise


def test_run_holds_config_data_metrics_and_pictures(smoke_run) -> None:
    cfg, results = smoke_run
    run = mlflow.get_run(results["run_id"])
    assert run.data.params["train.epochs"] == str(cfg.train.epochs)
    assert run.data.tags["data_digest"] == results["data"]["digest"]
    sections = {"test/f1_weighted", "test/baseline/f1_weighted", "val/f1_weighted", "data/rows_train", "best/epoch"}
    assert sections <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if "/" not in k], "every metric in a section of the run page"
    best = results["train"]["best_metrics"]
    assert run.data.metrics["best/val_f1_weighted"] == best["val_f1_weighted"]
    assert run.data.tags["best_epoch"] == str(int(best["epoch"])) and run.data.tags["early_stopped"] in {
        "true",
        "false",
    }
    assert int(run.data.params["model.param_count"]) > 0
    assert (run.data.tags["train.device"], run.data.tags["train.autocast"]) == ("cpu (cpu)", "off")  # use_gpu: false
    assert "Test: weighted F1" in run.data.tags["mlflow.note.content"]
    version = MlflowClient().get_model_version(cfg.registry.model_name, results["model"]["version"])
    assert f"Trained in MLflow run {run.info.run_id}" in version.description
    assert run.data.tags["mlflow.source.git.commit"] == version.tags["git_commit"]
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert contexts == {"training", "validation", "test"}
    client = MlflowClient()
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    files |= {
        f.path for d in ("data", "training", "evaluation/test") for f in client.list_artifacts(run.info.run_id, d)
    }
    for expected in (
        "config.yaml",
        "data/report.json",
        "data/test_split.csv",
        "training/learning_curves.png",
        "evaluation/test/confusion_matrix.png",
        "evaluation/test/worst_errors.html",
    ):
        assert expected in files, f"{expected} missing from {sorted(files)}"
    for page in ("evaluation/test/worst_errors.html", "data/report.html"):
        text = Path(client.download_artifacts(run.info.run_id, page)).read_text(encoding="utf-8")
        assert '<meta charset="utf-8">' in text and "<title>" in text and "<h1>" in text, page
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "val/f1_weighted")]
    assert epochs == list(range(1, cfg.train.epochs + 1))


def test_registered_model_loads_in_a_fresh_process(smoke_run) -> None:
    cfg, results = smoke_run
    code = textwrap.dedent(
        f"""
        import mlflow, pandas as pd
        mlflow.set_tracking_uri({results["tracking_uri"]!r})
        model = mlflow.pyfunc.load_model("models:/{cfg.registry.model_name}@champion")
        out = model.predict(pd.DataFrame({{"title": ["YOLO for video", "BERT summaries"],
                                          "description": ["real-time object detection", "text"]}}))
        probs = out.filter(like="prob_")
        assert list(out.columns)[0] == "label" and probs.shape == (2, 4), out
        assert ((probs.sum(axis=1) - 1).abs() < 1e-4).all()
        print("OK", out["label"].tolist())
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


def test_loading_a_version_leaves_no_files_and_no_path_entries(smoke_run, tmp_path, monkeypatch) -> None:
    """A replica loads and evicts versions all day: each load must not leave its ~90 MB download or a sys.path entry."""
    import tempfile

    from ray_app.registry import load_classifier

    cfg, _ = smoke_run
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path_before = list(sys.path)
    for _ in range(2):
        clf = load_classifier(f"models:/{cfg.registry.model_name}@champion")
        assert clf.predict_proba(["YOLO for video"]).shape == (1, 4)
    assert sys.path == path_before
    assert list(tmp_path.iterdir()) == []
