"""`ray-app monitor`: has served traffic drifted away from what a model version was validated on?

One check reads a window of the prediction log for a version with Ray Data, compares it with the version's reference
(`reference.py`) through Evidently (`drift.py`: text length in characters and words, the share of words the
tokenizer has to cut into pieces, the predicted label, its confidence, and the encoder's sentence embeddings as one
embedding set), measures accuracy on labelled feedback when given, applies the policy (`monitor_policy.py`), logs
the HTML and JSON reports and the scores to MLflow, and publishes gauges per version that outlive the check.

Evidently is imported inside the functions that use it: importing it takes seconds.
"""

from __future__ import annotations

import html
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import evidently  # noqa: F401 - see below
import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from ray_app.config import AppConfig, MonitorConfig
from ray_app.drift import EMBEDDING, Drift, run_drift
from ray_app.errors import AppError
from ray_app.gauges import GAUGES_ACTOR, NAMESPACE, publish
from ray_app.model_ids import resolve_once
from ray_app.monitor_policy import breaches, submit_retrain
from ray_app.prediction_log import read_log
from ray_app.reference import describe, load_reference
from ray_app.registry import load_classifier
from ray_app.runtime import experiment_id

if TYPE_CHECKING:
    from ray_app.model import TextClassifier

# Evidently is imported here, when the check's module is, not first inside it: its import chain (litestar) builds
# ASTs, and on CPython 3.11 before 3.11.9 the AST constructor's recursion counter is shared between threads
# (gh-106905), so a first import after Ray's threads started can fail with "AST constructor recursion depth
# mismatch" (seen once in CI). `ray-app monitor` imports this module before it connects to Ray.
log = logging.getLogger("ray_app")


# ---- what is checked: a window of a version's served traffic ---------------------------------------------------------


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


def current_frame(clf: TextClassifier, window: Window) -> pd.DataFrame:
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


def _classification_report(labelled: pd.DataFrame, reference: pd.DataFrame) -> Any:
    from evidently import DataDefinition, Dataset, MulticlassClassification, Report
    from evidently.presets import ClassificationPreset

    definition = DataDefinition(
        classification=[MulticlassClassification(target="label", prediction_labels="predicted")],
        categorical_columns=["label", "predicted"],
    )
    cur = pd.DataFrame({"label": labelled["target"].to_numpy(), "predicted": labelled["predicted_label"].to_numpy()})
    ref = pd.DataFrame({"label": reference["true_label"].to_numpy(), "predicted": reference["label"].to_numpy()})
    return Report([ClassificationPreset()]).run(
        Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition)
    )


# ---- one check -------------------------------------------------------------------------------------------------------


def _metrics(drift: Drift, feedback: dict[str, Any] | None, window: Window) -> dict[str, float]:
    metrics = {**drift.metrics(), "window/rows": window.info["rows"]}
    if feedback is not None:
        metrics.update({f"feedback/{k}": feedback[k] for k in ("accuracy", "f1_weighted", "f1_macro", "matched")})
    return metrics


def _headed(report_html: str, heading: str) -> str:
    """Evidently's page with a first line naming what was compared: opened on its own it does not say."""
    banner = f'<div style="font:16px system-ui,sans-serif;padding:12px 16px">{html.escape(heading)}</div>'
    return report_html.replace("<body>", "<body>" + banner, 1)


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
        window_text = f"{window.info['rows']} served rows from {window.info['start']} to {window.info['end']}"
        heading = (f"Drift of {name} version {version}: {window_text} (routes {', '.join(mcfg.routes)}) against "
                   f"the version's reference rows. Share of drifted columns {drift.share:.2f}; a breach is above "
                   f"{mcfg.drift_share}.")  # fmt: skip
        mlflow.log_text(_headed(drift.snapshot.get_html_str(as_iframe=False), heading), "monitoring/drift_report.html")
        mlflow.log_text(drift.snapshot.json(), "monitoring/drift_report.json")
        if feedback is not None:
            snapshot = feedback.pop("_snapshot")
            page = _headed(
                snapshot.get_html_str(as_iframe=False),
                f"Feedback on {name} version {version}: its answers "
                f"in {window_text} against the labels users sent back (current) and its reference rows",
            )
            mlflow.log_text(page, "monitoring/feedback_report.html")
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


def _classifier(name: str, version: str) -> TextClassifier:
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
