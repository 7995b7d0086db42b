"""Drift monitoring and feedback on real components: a version registered through the pipeline's own registration path
(so it carries its reference), prediction logs written by the Serve app's own writer, real Evidently, Ray Data,
MLflow, the Ray metrics endpoint, and a real Ray job for the retrain policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ray_app.errors import AppError
from ray_app.feedback import read_labels
from ray_app.model import load_tokenizer
from ray_app.monitor import check  # at collection: Evidently imported before any thread (ray_app/monitor.py)
from ray_app.prediction_log import read_log
from ray_app.reference import wordpiece_share
from ray_app.registry import load_classifier
from tests.conftest import ROOT, smoke_config
from tests.serving import register_version, wait_until

RAY_APP = str(Path(sys.executable).parent / "ray-app")


# ---- quick: no cluster -----------------------------------------------------------------------------------------------


def test_wordpiece_share_counts_words_cut_into_pieces_or_unknown() -> None:
    tokenizer = load_tokenizer("bundled:all-MiniLM-L6-v2")
    shares = wordpiece_share(tokenizer, ["the cat sat on the mat", "zxqvbnmw qqxzv", "", "the zxqvbnmw"])
    assert shares.tolist() == [0.0, 1.0, 0.0, 0.5]


def test_labels_file_mistakes_get_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AppError, match=r"labels file .*nope.csv does not exist"):
        read_labels(tmp_path / "nope.csv")
    no_key = tmp_path / "no_key.csv"
    no_key.write_text("id,label\nabc,mlops\n")
    with pytest.raises(AppError, match=r"no_key.csv lacks the join key or label column\(s\) \['request_id'\]"):
        read_labels(no_key)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"request_id": "a", "label": \n')
    with pytest.raises(AppError, match=r"broken.jsonl cannot be read"):
        read_labels(broken)
    labels = tmp_path / "ok.jsonl"
    labels.write_text('{"request_id": "a", "label": "mlops"}\n{"request_id": "b", "item": 2, "label": "other"}\n')
    expected = {"request_id": ["a", "b"], "item": [0, 2], "label": ["mlops", "other"]}
    assert read_labels(labels).to_dict("list") == expected


def test_a_reused_request_id_is_ambiguous_not_joined_to_the_first_answer() -> None:
    """Two requests sent with the same X-Request-Id are two served ids in the log: their label names neither, so it
    is left out and counted; a request's shadow row (same served id) is not a second answer."""
    from ray_app.config import DataConfig
    from ray_app.feedback import join_labels, store_rows

    def served(request_id, served_id, route="primary", label="mlops"):
        return {"request_id": request_id, "served_id": served_id, "item": 0, "route": route, "status": 200,
                "label": label, "text": f"text of {served_id}", "model_name": "m", "model_version": "1"}  # fmt: skip

    log = pd.DataFrame(
        [served("once", "s1"), served("once", "s1", route="shadow", label="other"), served("twice", "s2"),
         served("twice", "s3", label="other")]
    )  # fmt: skip
    labels = pd.DataFrame({"request_id": ["once", "twice"], "item": [0, 0], "label": ["mlops", "mlops"]})
    joined = join_labels(labels, log)
    assert joined["matched"].tolist() == [True, False] and joined["ambiguous"].tolist() == [False, True]
    assert joined.loc[0, "predicted_label"] == "mlops"  # the primary answer, not the shadow's
    _, bad = store_rows(joined, DataConfig())
    assert bad == {"ambiguous_request_id": 1}


def test_missing_prediction_log_is_named(tmp_path: Path) -> None:
    with pytest.raises(AppError, match=rf"prediction log {tmp_path}/absent has no prediction files"):
        read_log(str(tmp_path / "absent"))


@pytest.mark.slow
def test_log_files_from_before_served_id_read_beside_newer_ones(ray_cluster, tmp_path: Path) -> None:
    """A prediction log kept across upgrades holds files without the served_id column: monitoring reads them with
    the log's schema, and feedback keys them by their request id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ray_app.feedback import join_labels
    from ray_app.prediction_log import SCHEMA
    from ray_app.serve.predlog import PredictionLog
    from ray_app.serve.settings import PredictionLogSettings

    def row(request_id: str, served_id: str | None) -> dict:
        return {"request_id": request_id, "served_id": served_id, "item": 0, "timestamp": 1_700_000_000_000,
                "route": "primary", "model_name": "m", "model_version": "1", "status": 200, "text": "t",
                "label": "mlops"}  # fmt: skip

    old_schema = pa.schema([f for f in SCHEMA if f.name != "served_id"])
    old = pa.Table.from_pylist([{k: v for k, v in row("old-1", None).items() if k != "served_id"}], schema=old_schema)
    pq.write_table(old, tmp_path / "predictions-00000000T000000-old-000000.parquet")
    PredictionLog(PredictionLogSettings(uri=str(tmp_path), max_bytes=None)).write([row("new-1", "s-new")])
    from ray.data import DataContext
    from ray.util.state import list_actors

    def footer_readers() -> int:  # other tests' Parquet reads (batch inputs) on this shared cluster make some
        found = list_actors(address=ray_cluster["address"], filters=[("class_name", "=", "FooterReader")], limit=10_000)
        return len(found)

    before = footer_readers()
    frame = read_log(str(tmp_path))
    assert sorted(frame["request_id"]) == ["new-1", "old-1"] and "served_id" in frame.columns
    # read with Ray Data's V1 Parquet reader: no FooterReader actors killed after listing (red in the dashboard),
    # and the caller's DataContext as it was
    assert footer_readers() == before and DataContext.get_current().use_datasource_v2 is True
    labels = pd.DataFrame({"request_id": ["old-1", "new-1"], "item": [0, 0], "label": ["mlops", "mlops"]})
    assert join_labels(labels, frame)["matched"].tolist() == [True, True]


# ---- a registered version with its reference, and logs of its traffic ------------------------------------------------


@pytest.fixture(scope="module")
def monitored(smoke_run, mlflow_server, ray_cluster, tiny_model, storage, tmp_path_factory):
    """The smoke checkpoint registered again under a model name of its own, through `register_checkpoint`, with the
    full data set's splits, so its reference holds ~285 val/test rows; traffic comes from training rows the smoke
    model never saw (same source, same distribution)."""
    from ray_app.data import prepare
    from ray_app.pipeline import register_checkpoint

    smoke_cfg, results = smoke_run
    work = tmp_path_factory.mktemp("monitor")
    cfg = smoke_config(
        mlflow_server, ray_cluster["address"], tiny_model, storage,
        "data.max_rows=null", f"registry.model_name=monitor-{uuid.uuid4().hex[:6]}",
        f"mlflow.experiment={smoke_cfg.mlflow.experiment}", f"monitor.experiment=monitoring-{uuid.uuid4().hex[:6]}",
        f"data.feedback_uri={work / 'feedback'}", "monitor.min_rows=20",
    )  # fmt: skip
    splits = prepare(cfg.data)
    with mlflow.start_run(run_name="monitor-version") as run:
        version = register_checkpoint(cfg, splits, results["train"]["checkpoint_path"], run.info.run_id).version
    seen = set(prepare(smoke_cfg.data).train["id"])
    pool = splits.train[~splits.train["id"].isin(seen)].sample(80, random_state=0).reset_index(drop=True)
    return {"cfg": cfg, "version": version, "splits": splits, "pool": pool, "work": work}


def write_log(directory: Path, m: dict, rows: pd.DataFrame, store_text: bool = True) -> list[str]:
    """Rows served by the version, as the ingress logs them (real writer), plus rows a check must leave out: a
    shadow duplicate, a failed request and another version's answer. Returns the request ids, in order."""
    from ray_app.prediction_log import text_fields
    from ray_app.serve.predlog import PredictionLog
    from ray_app.serve.settings import PredictionLogSettings
    from ray_app.text import join_text

    name, version = m["cfg"].registry.model_name, m["version"]
    clf = load_classifier(f"models:/{name}/{version}")
    texts = join_text(rows, m["cfg"].data.text_columns)
    probs = clf.predict_proba(texts)
    now = int(time.time() * 1000)
    ids = [uuid.uuid4().hex for _ in texts]

    def row(i: int, **changes) -> dict:
        base = {
            "request_id": ids[i], "served_id": ids[i], "item": 0, "timestamp": now - 1000 + i, "route": "primary",
            "model_name": name, "model_version": version, "status": 200, "error": None, "latency_ms": 12.0,
            **text_fields(texts[i], store_text), "label": clf.labels[int(probs[i].argmax())],
            "confidence": float(probs[i].max()),
            "probabilities": json.dumps(dict(zip(clf.labels, probs[i].tolist(), strict=True))),
        }  # fmt: skip
        return {**base, **changes}

    log = PredictionLog(PredictionLogSettings(uri=str(directory), store_text=store_text, max_bytes=None))
    log.write([row(i) for i in range(len(texts))])
    log.write([row(0, route="shadow"), row(1, status=500, label=None), row(2, model_version="999")])
    return ids


def series(metrics_url: str, name: str, model: str, version: str) -> float | None:
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith(name + "{") and f'model="{model}"' in line and f'version="{version}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def with_monitor(cfg, **changes):
    return cfg.model_copy(update={"monitor": cfg.monitor.model_copy(update=changes)})


# ---- drift both ways -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_traffic_like_the_reference_is_not_flagged_and_is_reported(monitored, ray_cluster, tmp_path) -> None:
    m, pool = monitored, monitored["pool"]
    ids = write_log(tmp_path / "log", m, pool)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"request_id": ids[:40], "item": 0, "label": pool["label"][:40]}).to_csv(labels, index=False)
    cfg = with_monitor(m["cfg"], log_uri=str(tmp_path / "log"))
    name, version = cfg.registry.model_name, m["version"]

    results = check(cfg, mlflow.get_tracking_uri(), f"{name}/{version}", labels)

    assert results["window"]["rows"] == len(pool)  # shadow, failed and other-version rows left out
    assert results["compared"] == ["text_chars", "text_words", "wordpiece_share", "confidence", "label", "embedding"]
    assert not results["drift"]["detected"] and results["drift"]["share"] <= cfg.monitor.drift_share, results["drift"]
    # The tiny random model is far below 0.85 accuracy: a breach by feedback only, not by drift.
    assert [r.split(" ")[0] for r in results["breach_reasons"]] == ["feedback"], results["breach_reasons"]
    assert results["reference"]["rows"] == len(m["splits"].val) + len(m["splits"].test)
    feedback = results["feedback"]
    assert feedback["matched"] == 40 and 0 <= feedback["accuracy"] <= 1 and results["retrain_job_id"] is None

    run = mlflow.get_run(results["run_id"])
    assert run.data.tags["model_version"] == version and run.data.tags["breach"] == "true"
    assert run.data.tags["window_rows"] == str(len(pool))
    expected = {"drift/share", "drift/text_chars/detected", "drift/embedding/score", "feedback/accuracy"}
    assert expected <= set(run.data.metrics), sorted(run.data.metrics)
    assert {"drift/text_chars/p_value", "drift/text_chars/score"} & set(run.data.metrics)
    page = Path(MlflowClient().download_artifacts(results["run_id"], "monitoring/drift_report.html")).read_text()
    assert f"Drift of {name} version {version}: {len(pool)} served rows" in page
    files = {f.path for f in MlflowClient().list_artifacts(results["run_id"], "monitoring")}
    assert {"monitoring/drift_report.html", "monitoring/drift_report.json", "monitoring/feedback_report.html"} <= files
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{results['run_id']}/monitoring/drift_report.json"))
    assert any(metric["metric_name"].startswith("EmbeddingsDrift") for metric in report["metrics"])

    def gauges() -> bool:
        share = series(ray_cluster["metrics"], "ray_app_drift_share", name, version)
        accuracy = series(ray_cluster["metrics"], "ray_app_feedback_accuracy", name, version)
        return share == pytest.approx(results["drift"]["share"]) and accuracy == pytest.approx(feedback["accuracy"])

    wait_until(gauges, 90, "ray_app_drift_share and ray_app_feedback_accuracy for the version", interval=2)


@pytest.mark.slow
def test_titles_without_descriptions_are_a_breach_and_the_cli_exits_1(monitored, ray_cluster, tmp_path) -> None:
    """The drift demo's shift (`make drift-demo`: `ray-app replay --shift titles-only`), seen by the real check."""
    from ray_app.replay import apply_shift

    m = monitored
    short = apply_shift(m["pool"], m["cfg"].data.text_columns, "titles-only")
    write_log(tmp_path / "log", m, short)
    cfg = m["cfg"]
    proc = subprocess.run(
        [RAY_APP, "monitor", "-c", "configs/smoke.yaml", "--results-dir", str(tmp_path), "--model",
         f"{cfg.registry.model_name}/{m['version']}", "--last-n", "500",
         *[a for key in ("mlflow.tracking_uri", "ray.address", "monitor.experiment", "monitor.min_rows")
           for a in ("--set", f"{key}={_get(cfg, key)}")],
         "--set", f"monitor.log_uri={tmp_path / 'log'}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "token"},
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "BREACH: drift share" in proc.stdout
    (path,) = tmp_path.glob("monitor-*.json")
    results = json.loads(path.read_text())
    assert {"text_chars", "text_words"} <= set(results["drift"]["drifted_columns"]), results["drift"]
    assert results["breach"] and results["retrain_job_id"] is None and results["window"]["last_n"] == 500
    run = mlflow.get_run(results["run_id"])
    assert run.data.tags["breach"] == "true" and run.data.metrics["drift/text_words/detected"] == 1.0
    # The check's process has exited; its verdict is still exported, by the detached gauge actor.
    name, version = cfg.registry.model_name, m["version"]
    detected = lambda: series(ray_cluster["metrics"], "ray_app_drift_detected", name, version) == 1.0  # noqa: E731
    wait_until(detected, 90, "ray_app_drift_detected == 1 after the check's process exited", interval=2)


def _get(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.slow
def test_log_without_text_compares_lengths_labels_and_confidence(monitored, tmp_path) -> None:
    m = monitored
    write_log(tmp_path / "log", m, m["pool"], store_text=False)
    cfg = with_monitor(m["cfg"], log_uri=str(tmp_path / "log"))
    results = check(cfg, mlflow.get_tracking_uri(), f"{cfg.registry.model_name}/{m['version']}")
    assert results["window"]["text_stored"] is False
    assert results["compared"] == ["text_chars", "text_words", "confidence", "label"]


@pytest.mark.slow
def test_bad_input_gets_one_clear_error(monitored, tiny_model, tmp_path) -> None:
    m = monitored
    cfg, name, version = m["cfg"], m["cfg"].registry.model_name, m["version"]
    write_log(tmp_path / "log", m, m["pool"].head(10))
    small = with_monitor(cfg, log_uri=str(tmp_path / "log"))
    with pytest.raises(AppError, match=rf"has 10 served rows of {name} version {version} in the window"):
        check(small, mlflow.get_tracking_uri(), f"{name}/{version}")
    with pytest.raises(AppError, match="has no prediction files"):
        check(with_monitor(cfg, log_uri=str(tmp_path / "empty")), mlflow.get_tracking_uri(), f"{name}/{version}")
    with pytest.raises(AppError, match=f"model {name}/77 is not in the registry"):
        check(small, mlflow.get_tracking_uri(), f"{name}/77")
    old = register_version(cfg, tiny_model, 3, tmp_path)  # registered as before this change: no reference
    with pytest.raises(AppError, match=rf"version {old} has no drift reference") as err:
        check(small, mlflow.get_tracking_uri(), f"{name}/{old}")
    assert "Register its checkpoint again" in str(err.value)


# ---- feedback into training, and the retrain policy ------------------------------------------------------------------


@pytest.fixture(scope="module")
def feedback_added(monitored, tmp_path_factory):
    """Labelled feedback on logged traffic stored with `add_feedback`, as `ray-app feedback FILE` does."""
    from ray_app.feedback import add_feedback
    from ray_app.text import join_text

    m, work = monitored, tmp_path_factory.mktemp("fb")
    test_row = m["splits"].test.head(1)  # served text that is also a test row: must never reach training
    fresh = m["pool"].head(12).assign(description=lambda f: f["description"] + " Seen in production.")
    fresh["text"] = join_text(fresh, m["cfg"].data.text_columns)  # texts no bundled row has
    traffic = pd.concat([fresh, test_row], ignore_index=True)
    ids = write_log(work / "log", m, traffic)
    labels = pd.DataFrame({"request_id": [*ids, "never-served"], "label": [*traffic["label"], "mlops"]})
    labels.loc[3, "label"] = ""  # a missing label: the training row check refuses it
    labels.to_csv(work / "labels.csv", index=False)
    cfg = with_monitor(m["cfg"], log_uri=str(work / "log"))
    return cfg, add_feedback(cfg, work / "labels.csv"), fresh


@pytest.mark.slow
def test_feedback_is_checked_stored_and_joins_the_next_training_split(feedback_added, monitored) -> None:
    from ray_app.data import prepare

    cfg, stored, fresh = feedback_added
    assert stored["rows"] == 14 and stored["bad"] == {"missing_label": 1, "unknown_request": 1}
    assert stored["stored"] == 12 and Path(stored["file"]).name.endswith(".parquet")
    splits = prepare(cfg.data)
    assert splits.report.feedback_rows == 11 and splits.report.feedback_bad == {"feedback_leakage": 1}
    added = splits.train[splits.train["id"].str.startswith("fb-")]
    assert len(added) == 11 and len(splits.train) == len(monitored["splits"].train) + 11
    assert not splits.val["id"].str.startswith("fb-").any() and not splits.test["id"].str.startswith("fb-").any()
    assert splits.report.digest != monitored["splits"].report.digest
    assert set(added["text"]) == set(fresh["text"]) - {fresh["text"][3]}  # the row whose label was missing


@pytest.mark.slow
def test_retrain_policy_submits_the_pipeline_as_a_ray_job(feedback_added, monitored, tiny_model, storage, tmp_path):
    """A breach with `on_breach: retrain` submits `ray-app pipeline` (smoke config, this session's MLflow) as a real
    Ray job; the job trains with the feedback store and registers a new challenger."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ray_app.registry import aliases

    cfg, m = feedback_added[0], monitored
    short = m["pool"].assign(title=m["pool"]["title"].map(lambda t: " ".join(t.split()[:2])), description="")
    write_log(tmp_path / "log", m, short)
    retrain = cfg.monitor.retrain.model_copy(
        update={
            "config": "configs/smoke.yaml",
            "working_dir": str(ROOT),
            "overrides": [f"model.name_or_path={tiny_model}", f"train.storage_path={storage}", "train.epochs=1"],
        }
    )
    cfg = with_monitor(cfg, log_uri=str(tmp_path / "log"), on_breach="retrain", retrain=retrain)
    before = {mv.version for mv in MlflowClient().search_model_versions(f"name='{cfg.registry.model_name}'")}

    results = check(cfg, mlflow.get_tracking_uri(), f"{cfg.registry.model_name}/{m['version']}")

    job_id = results["retrain_job_id"]
    assert results["breach"] and job_id
    assert mlflow.get_run(results["run_id"]).data.tags["retrain_job_id"] == job_id
    client = JobSubmissionClient(cfg.ray.address)
    status = wait_until(
        lambda: (s := client.get_job_status(job_id)).is_terminal() and s, 600, "the retrain job", interval=5
    )
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    after = {mv.version: mv for mv in MlflowClient().search_model_versions(f"name='{cfg.registry.model_name}'")}
    (new,) = set(after) - before
    assert aliases(cfg.registry)["challenger"] == new and aliases(cfg.registry).get("champion") != new
    trained = mlflow.get_run(after[new].run_id)
    assert trained.data.metrics["data/rows_feedback"] >= 11  # smoke's own val/test decide whether the 12th leaks
    assert "monitoring.reference" in after[new].tags  # the new version carries its own reference too
    assert np.isfinite(trained.data.metrics["test/f1_weighted"])
