"""`ray-app monitor`: has served traffic drifted away from what a model version was validated on?

Every registered version carries a reference: its own predictions on the validation and test rows (never the training
rows, where the model is over-confident, so fresh traffic would always look drifted), with the same descriptors the
check computes on traffic. A check reads a window of the prediction log for that version with Ray Data, compares it
with Evidently (text length in characters and words, the share of words the tokenizer has to cut into pieces, the
predicted label, its confidence, and the encoder's sentence embeddings as one embedding set), logs the HTML and JSON
report and the scores to MLflow, and publishes gauges per version that outlive the check. With labelled feedback it
also measures accuracy. The policy in `monitor:` says what a breach does: report it, or also retrain.

Evidently is imported inside the functions that use it: importing it takes seconds, and the registration path and the
gauge actor import this module too.
"""

from __future__ import annotations

import logging
import re
import shlex
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ray_app.config import AppConfig, MonitorConfig
from ray_app.drift import EMBEDDING, Drift, run_drift
from ray_app.errors import AppError
from ray_app.gauges import GAUGES_ACTOR, NAMESPACE, publish
from ray_app.model_ids import resolve_once
from ray_app.prediction_log import read_log
from ray_app.registry import load_classifier
from ray_app.runtime import experiment_id
from ray_app.text import join_text

log = logging.getLogger("ray_app")
REFERENCE_TAG = "monitoring.reference"
REFERENCE_FILE = "reference.parquet"
_WORD = re.compile(r"\w+")


# ---- descriptors: the same code for the reference and for traffic ----------------------------------------------------


def wordpiece_share(tokenizer, texts: Sequence[str]) -> np.ndarray:
    """Per text, the share of its words that the tokenizer cannot keep whole (cut into several pieces, or unknown).

    A rise means words the model never learned: new jargon, another language, garbled input. Computed here rather
    than with Evidently's out-of-vocabulary descriptor, which downloads word lists at run time."""
    words = [_WORD.findall(t) for t in texts]
    out = np.zeros(len(texts), dtype=np.float32)
    rows = [i for i, w in enumerate(words) if w]
    if not rows:
        return out
    enc = tokenizer([words[i] for i in rows], is_split_into_words=True, add_special_tokens=False)
    for j, i in enumerate(rows):
        pieces: Counter[int] = Counter()
        unknown = set()
        for token, word in zip(enc["input_ids"][j], enc.word_ids(j), strict=True):
            if word is not None:
                pieces[word] += 1
                if token == tokenizer.unk_token_id:
                    unknown.add(word)
        out[i] = sum(1 for w in range(len(words[i])) if pieces[w] > 1 or w in unknown) / len(words[i])
    return out


def describe(clf, texts: list[str]) -> pd.DataFrame:
    """Length (as the prediction log counts it), word-piece share and the sentence embedding of each text."""
    return pd.DataFrame(
        {
            "text_chars": [len(t) for t in texts],
            "text_words": [len(t.split()) for t in texts],
            "wordpiece_share": wordpiece_share(clf.tokenizer, texts),
            EMBEDDING: list(clf.embed(texts)),
        }
    )


def build_reference(clf, rows: pd.DataFrame, text_columns: Sequence[str], id_column: str) -> pd.DataFrame:
    """The version's own answers on held-out rows (`split`, `label` columns), described as traffic will be."""
    texts = join_text(rows, text_columns)  # what the Serve ingress builds from title and description
    probs = clf.predict_proba(texts)
    frame = pd.DataFrame(
        {
            "id": rows[id_column].astype(str).to_numpy(),
            "split": rows["split"].to_numpy(),
            "true_label": rows["label"].to_numpy(),
            "text": texts,
            "label": [clf.labels[i] for i in probs.argmax(axis=1)],
            "confidence": probs.max(axis=1),
        }
    )
    return pd.concat([frame, describe(clf, texts)], axis=1)


def log_reference(
    cfg: AppConfig, model_dir: str, splits, model_uri: str, held_out: tuple[str, ...] = ("val", "test")
) -> str:
    """Build the reference of a model being registered and log it into the active run, in a folder named after the
    logged model so two versions from one run never share one; returns its artifact path (the version's tag).
    `held_out` names the splits the model never trained on (a refit on train+val leaves only test)."""
    from ray_app.model import TextClassifier

    clf = TextClassifier.load(model_dir, cfg.data.max_length)
    rows = pd.concat([splits.frame(name).assign(split=name) for name in held_out], ignore_index=True)
    reference = build_reference(clf, rows, cfg.data.text_columns, cfg.data.id_column)
    folder = f"monitoring/{model_uri.rstrip('/').rsplit('/', 1)[-1]}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / REFERENCE_FILE
        reference.to_parquet(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=folder)
    return f"{folder}/{REFERENCE_FILE}"


# ---- what is checked: a version, its reference and a window of its traffic -------------------------------------------


def load_reference(name: str, version: str) -> tuple[pd.DataFrame, str]:
    mv = MlflowClient().get_model_version(name, version)
    path = mv.tags.get(REFERENCE_TAG)
    if not path:
        raise AppError(
            f"model {name} version {version} has no drift reference (no '{REFERENCE_TAG}' tag): it was registered "
            "before monitoring existed or without `ray-app register`/`pipeline`. Register its checkpoint again "
            "(`ray-app register --checkpoint ... --run-id ...`) or retrain, and check the new version"
        )
    try:
        local = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=path)
        return pd.read_parquet(local), path
    except (MlflowException, OSError) as exc:
        raise AppError(
            f"the drift reference {path} of {name} version {version} (run {mv.run_id}) cannot be read: "
            f"{str(exc).splitlines()[0]}"
        ) from None


@dataclass
class Window:
    rows: pd.DataFrame
    info: dict[str, Any]


def read_window(mcfg: MonitorConfig, name: str, version: str) -> Window:
    """The newest served rows of one version: status 200, the configured routes, `minutes` and `last_n`."""
    from ray.data.expressions import col

    served = (col("model_name") == name) & (col("model_version") == version) & (col("status") == 200)
    frame = read_log(mcfg.log_uri, served & col("route").is_in(list(mcfg.routes)))
    if len(frame):  # an empty result may come back without columns
        if mcfg.minutes is not None:
            frame = frame[frame["timestamp"] >= pd.Timestamp(time.time() - mcfg.minutes * 60, unit="s", tz="UTC")]
        frame = frame.sort_values("timestamp", kind="stable")
        if mcfg.last_n is not None:
            frame = frame.tail(mcfg.last_n)
    described = f"routes {mcfg.routes}, last_n={mcfg.last_n}, minutes={mcfg.minutes}"
    if len(frame) < mcfg.min_rows:
        raise AppError(
            f"the prediction log {mcfg.log_uri} has {len(frame)} served rows of {name} version {version} in the "
            f"window ({described}); a check needs monitor.min_rows={mcfg.min_rows}. Widen the window (--last-n, "
            "--minutes) or wait for traffic"
        )
    info = {
        "rows": len(frame),
        "start": frame["timestamp"].min().isoformat(),
        "end": frame["timestamp"].max().isoformat(),
        "last_n": mcfg.last_n,
        "minutes": mcfg.minutes,
        "routes": list(mcfg.routes),
        "text_stored": bool(frame["text"].notna().all()),
    }
    return Window(frame.reset_index(drop=True), info)


def current_frame(clf, window: Window) -> pd.DataFrame:
    """The window with the reference's columns; the word-piece share and embeddings are computed now, by the same
    version, and only when the log kept the text (`store_text: true`)."""
    rows = window.rows
    frame = rows[["text", "text_chars", "text_words", "label", "confidence"]].copy()
    if window.info["text_stored"]:
        described = describe(clf, list(rows["text"]))
        frame["wordpiece_share"] = described["wordpiece_share"].to_numpy()
        frame[EMBEDDING] = described[EMBEDDING].to_numpy()
    return frame


# ---- labelled feedback -----------------------------------------------------------------------------------------------


def feedback_quality(cfg: AppConfig, labels_path: Path, window: Window, reference: pd.DataFrame) -> dict[str, Any]:
    """Accuracy and F1 of the served answers on the labelled ones, with Evidently's classification report (the
    reference's own held-out quality beside it)."""
    from ray_app.feedback import join_labels, read_labels
    from ray_app.metrics import scores
    from ray_app.rows import map_label

    joined = join_labels(read_labels(labels_path), window.rows)
    joined["target"] = joined["label"].map(lambda raw: map_label(raw, cfg.data))
    usable = joined[joined["matched"] & joined["target"].notna()]
    if usable.empty:
        raise AppError(
            f"labels file {labels_path}: none of its {len(joined)} rows matches a served row of this version in the "
            "window (joined on request_id and item); check the file, --model and the window"
        )
    quality = scores(list(usable["target"]), list(usable["predicted_label"]))
    snapshot = _classification_report(usable, reference)
    return {
        "labels_file": str(labels_path),
        "rows": len(joined),
        "matched": len(usable),
        "unmatched": int((~joined["matched"]).sum()),
        "bad_label": int((joined["matched"] & joined["target"].isna()).sum()),
        "accuracy": quality["accuracy"],
        "f1_weighted": quality["f1_weighted"],
        "f1_macro": quality["f1_macro"],
        "_snapshot": snapshot,
    }


def _classification_report(labelled: pd.DataFrame, reference: pd.DataFrame):
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(
        classification=[MulticlassClassification(target="target", prediction_labels="prediction")],
        categorical_columns=["target", "prediction"],
    )
    cur = pd.DataFrame({"target": labelled["target"].to_numpy(), "prediction": labelled["predicted_label"].to_numpy()})
    ref = pd.DataFrame({"target": reference["true_label"].to_numpy(), "prediction": reference["label"].to_numpy()})
    return Report([ClassificationPreset()]).run(
        Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition)
    )


# ---- the policy ------------------------------------------------------------------------------------------------------


def breaches(drift: Drift, feedback: dict[str, Any] | None, mcfg: MonitorConfig) -> list[str]:
    reasons = []
    if drift.detected:
        reasons.append(f"drift share {drift.share:.3f} > monitor.drift_share {mcfg.drift_share}")
    if feedback is not None and feedback["accuracy"] < mcfg.min_feedback_accuracy:
        reasons.append(
            f"feedback accuracy {feedback['accuracy']:.3f} < monitor.min_feedback_accuracy {mcfg.min_feedback_accuracy}"
        )
    return reasons


def retrain_command(cfg: AppConfig, tracking_uri: str, name: str) -> list[str]:
    """`ray-app pipeline` on `monitor.retrain.config`, pointed at this check's tracking server, experiment, model
    name and feedback store, plus `monitor.retrain.overrides`."""
    retrain = cfg.monitor.retrain
    sets = [
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment={cfg.mlflow.experiment}",
        f"registry.model_name={name}",
        f"pipeline.promote={str(retrain.promote).lower()}",
    ]
    if cfg.data.feedback_uri:
        uri = cfg.data.feedback_uri
        sets.append(f"data.feedback_uri={uri if '://' in uri else Path(uri).expanduser().resolve()}")
    sets += retrain.overrides
    return ["ray-app", "pipeline", "--config", retrain.config, *[a for s in sets for a in ("--set", s)]]


def submit_retrain(cfg: AppConfig, tracking_uri: str, name: str, version: str) -> str:
    """Submit the training pipeline as a Ray job (as `make run` does); its pipeline registers a new challenger."""
    from ray.job_submission import JobSubmissionClient

    from ray_app.runtime import git_commit

    retrain = cfg.monitor.retrain
    address = retrain.dashboard_address or cfg.ray.address
    runtime_env: dict[str, Any] = {"env_vars": {"RAY_APP_GIT_COMMIT": git_commit()}}
    if retrain.working_dir:
        runtime_env["working_dir"] = str(Path(retrain.working_dir).expanduser().resolve())
    entrypoint = shlex.join(retrain_command(cfg, tracking_uri, name))
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            metadata={"ray_app": "retrain", "model": name, "drifted_version": version},
        )
    except (OSError, RuntimeError, ValueError) as exc:  # requests' ConnectionError is an OSError
        raise AppError(
            f"the retrain job could not be submitted to the Ray cluster at {address or 'RAY_ADDRESS'}: "
            f"{str(exc).splitlines()[0]}; set monitor.retrain.dashboard_address or ray.address"
        ) from None
    log.warning("breach: submitted retrain job %s: %s", job_id, entrypoint)
    return job_id


# ---- one check -------------------------------------------------------------------------------------------------------


def _metrics(drift: Drift, feedback: dict[str, Any] | None, window: Window) -> dict[str, float]:
    metrics = {"drift_share": drift.share, "drift_detected": float(drift.detected), "window_rows": window.info["rows"]}
    for column, result in drift.columns.items():
        metrics[f"drift_score.{column}"] = result["score"]
        metrics[f"drift_detected.{column}"] = float(result["detected"])
    if feedback is not None:
        metrics.update({f"feedback_{k}": feedback[k] for k in ("accuracy", "f1_weighted", "f1_macro", "matched")})
    return metrics


def check(cfg: AppConfig, tracking_uri: str, model_id: str, labels: Path | None = None) -> dict[str, Any]:
    """One check of one version; returns the results JSON (`breach` says whether the policy was breached)."""
    mcfg = cfg.monitor
    name, version = resolve_once(model_id, cfg.registry.model_name)
    reference, reference_path = load_reference(name, version)
    window = read_window(mcfg, name, version)
    clf = _classifier(name, version)
    text_stored = window.info["text_stored"]
    if not text_stored:
        log.warning("the prediction log holds no text (store_text: false): comparing lengths, labels and confidence "
                    "only; no word-piece share, no embeddings")  # fmt: skip
    drift = run_drift(reference, current_frame(clf, window), text_stored, mcfg)
    feedback = feedback_quality(cfg, labels, window, reference) if labels is not None else None
    reasons = breaches(drift, feedback, mcfg)
    tags = {
        "model_name": name,
        "model_version": version,
        "window": f"{window.info['start']}..{window.info['end']}",
        "window_rows": str(window.info["rows"]),
        "window_last_n": str(mcfg.last_n),
        "window_minutes": str(mcfg.minutes),
        "text_stored": str(text_stored).lower(),
        "breach": str(bool(reasons)).lower(),
    }
    exp = experiment_id(cfg.monitor.experiment, cfg.mlflow.artifact_location)
    with mlflow.start_run(experiment_id=exp, run_name=f"drift-{name}-v{version}", tags=tags) as run:
        mlflow.log_metrics(_metrics(drift, feedback, window))
        mlflow.log_text(drift.snapshot.get_html_str(as_iframe=False), "monitoring/drift_report.html")
        mlflow.log_text(drift.snapshot.json(), "monitoring/drift_report.json")
        if feedback is not None:
            snapshot = feedback.pop("_snapshot")
            mlflow.log_text(snapshot.get_html_str(as_iframe=False), "monitoring/feedback_report.html")
            mlflow.log_text(snapshot.json(), "monitoring/feedback_report.json")
        if reasons:
            mlflow.set_tag("breach_reasons", "; ".join(reasons))
        job_id = submit_retrain(cfg, tracking_uri, name, version) if reasons and mcfg.on_breach == "retrain" else None
        if job_id:
            mlflow.set_tag("retrain_job_id", job_id)
        gauges = {"drift_share": drift.share, "drift_detected": float(drift.detected)}
        if feedback is not None:
            gauges["feedback_accuracy"] = feedback["accuracy"]
        publish(name, version, gauges)
        results = {
            "tracking_uri": tracking_uri,
            "experiment": mcfg.experiment,
            "run_id": run.info.run_id,
            "model": {"name": name, "version": version, "requested": model_id},
            "reference": {"artifact": reference_path, "rows": len(reference)},
            "log_uri": mcfg.log_uri,
            "window": window.info,
            "compared": [*drift.columns],
            "drift": drift.to_dict(),
            "feedback": feedback,
            "breach": bool(reasons),
            "breach_reasons": reasons,
            "on_breach": mcfg.on_breach,
            "retrain_job_id": job_id,
            "gauges": {"actor": f"{NAMESPACE}/{GAUGES_ACTOR}", **gauges},
        }
        mlflow.log_dict(results, "monitoring/results.json")
    return results


def _classifier(name: str, version: str):
    try:
        return load_classifier(f"models:/{name}/{version}")
    except MlflowException as exc:
        raise AppError(f"model {name} version {version} could not be loaded: {exc.message.splitlines()[0]}") from None


def format_summary(results: dict[str, Any]) -> str:
    drift = results["drift"]
    lines = [f"{results['model']['name']} version {results['model']['version']}: {results['window']['rows']} rows "
             f"({results['window']['start']} .. {results['window']['end']})"]  # fmt: skip
    for column, r in drift["columns"].items():
        lines.append(f"  {column:16} score {r['score']:.4g}  {'DRIFT' if r['detected'] else 'ok'}  ({r['method']})")
    lines.append(f"drift share {drift['share']:.3f}" + (" (breach)" if drift["detected"] else ""))
    if results["feedback"]:
        fb = results["feedback"]
        lines.append(f"feedback: {fb['matched']} labelled rows, accuracy {fb['accuracy']:.3f}, "
                     f"weighted F1 {fb['f1_weighted']:.3f}")  # fmt: skip
    lines.append("BREACH: " + "; ".join(results["breach_reasons"]) if results["breach"] else "no breach")
    if results["retrain_job_id"]:
        lines.append(f"retrain job submitted: {results['retrain_job_id']}")
    return "\n".join(lines)
