"""Drift of a traffic window against a version's reference, with Evidently 0.7: the data drift preset over the scalar
columns, and the encoder embeddings as one embedding set."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ray_app.config import MonitorConfig
from ray_app.errors import AppError

EMBEDDING = "embedding"


def compared_columns(text_stored: bool) -> tuple[list[str], list[str]]:
    """(numerical, categorical) columns; without stored text only the length descriptors and the answers remain."""
    numerical = ["text_chars", "text_words", *(["wordpiece_share"] if text_stored else []), "confidence"]
    return numerical, ["label"]


def _embedding_frame(frame: pd.DataFrame) -> pd.DataFrame:
    matrix = np.vstack(frame[EMBEDDING].to_numpy()).astype(np.float32)
    return pd.DataFrame(matrix, columns=[f"emb_{i:03d}" for i in range(matrix.shape[1])], index=frame.index)


def embedding_method(name: str, reference_rows: int):
    """Evidently's embedding drift methods; `model` (a classifier telling reference from current, judged against
    random ROC AUCs on small data) is Evidently's own default."""
    from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod, RatioDriftMethod

    methods = {
        "model": lambda: ModelDriftMethod(bootstrap=reference_rows < 1000),
        "mmd": MMDDriftMethod,
        "distance": lambda: DistanceDriftMethod(bootstrap=True),
        "ratio": RatioDriftMethod,
    }
    return methods[name]()


@dataclass
class Drift:
    snapshot: Any
    columns: dict[str, dict[str, Any]]
    share: float
    detected: bool

    def metrics(self) -> dict[str, float]:
        """For MLflow, in a `drift/` section. A p-value (statistical tests: low means drift) and a score (distances,
        the embedding classifier's ROC AUC: high means drift) read opposite ways, so each keeps its own name; a
        threshold is logged when it is a fixed number (a bootstrapped one is drawn per check)."""
        out = {"drift/share": self.share, "drift/detected": float(self.detected)}
        for column, result in self.columns.items():
            kind = "p_value" if "p_value" in str(result["method"]) else "score"
            out[f"drift/{column}/{kind}"] = result["score"]
            out[f"drift/{column}/detected"] = float(result["detected"])
            if result["threshold"] is not None:
                out[f"drift/{column}/threshold"] = float(result["threshold"])
        return out

    def to_dict(self) -> dict[str, Any]:
        drifted = sorted(c for c, r in self.columns.items() if r["detected"])
        return {"share": self.share, "detected": self.detected, "drifted_columns": drifted, "columns": self.columns}


def run_drift(reference: pd.DataFrame, current: pd.DataFrame, text_stored: bool, mcfg: MonitorConfig) -> Drift:
    """One Evidently report: the data drift preset over the columns plus the embedding set's drift. The drift share
    counts the embedding set as one column beside the others (6 columns with text, 4 without)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset

    numerical, categorical = compared_columns(text_stored)
    columns = numerical + categorical
    kinds = {**dict.fromkeys(numerical, "float64"), **dict.fromkeys(categorical, str)}
    ref, cur = reference[columns].astype(kinds), current[columns].astype(kinds)
    embeddings: dict[str, list[str]] = {}
    if text_stored:
        ref_emb, cur_emb = _embedding_frame(reference), _embedding_frame(current)
        ref, cur = pd.concat([ref, ref_emb], axis=1), pd.concat([cur, cur_emb], axis=1)
        embeddings = {EMBEDDING: list(ref_emb.columns)}
    definition = DataDefinition(
        numerical_columns=numerical, categorical_columns=categorical, embeddings=embeddings or None
    )
    method = embedding_method(mcfg.embedding_method, len(ref)) if text_stored else None
    metrics: list[Any] = [
        DataDriftPreset(
            columns=columns,
            method=mcfg.column_method,
            threshold=mcfg.column_threshold,
            drift_share=mcfg.drift_share,  # Evidently's test leaves the embedding set out; the share below counts it
        )
    ]
    if method is not None:
        metrics.append(EmbeddingsDrift(embeddings_name=EMBEDDING, drift_method=method))
    try:
        snapshot = Report(metrics, include_tests=True).run(
            Dataset.from_pandas(cur, data_definition=definition), Dataset.from_pandas(ref, data_definition=definition)
        )
    except ValueError as exc:  # an unknown monitor.column_method, or too few rows for the embedding picture
        raise AppError(
            f"the drift report failed ({exc}) on {len(ref)} reference and {len(cur)} current rows; check "
            "monitor.column_method / column_threshold, and give the window more rows (monitor.min_rows)"
        ) from None
    results = _column_results(snapshot.dict())
    if method is not None:  # Evidently reports the embedding score but not its verdict: the same method gives both
        score, detected, name = method(cur[embeddings[EMBEDDING]].copy(), ref[embeddings[EMBEDDING]].copy())
        threshold = None if getattr(method, "bootstrap", None) else getattr(method, "threshold", None)
        results[EMBEDDING] = {"score": float(score), "detected": bool(detected), "method": name, "threshold": threshold}
    share = sum(r["detected"] for r in results.values()) / len(results)
    return Drift(snapshot, results, round(share, 4), share > mcfg.drift_share)


def _column_results(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per column: Evidently's score, method, threshold and verdict (its per-column test fails on drift)."""
    failed = {t["metric_config"]["metric_id"] for t in report["tests"] if t["id"] == "drift" and t["status"] == "FAIL"}
    out = {}
    for metric in report["metrics"]:
        config = metric["config"]
        if config.get("type") == "evidently:metric_v2:ValueDrift":
            out[config["column"]] = {
                "score": float(metric["value"]),
                "detected": metric["id"] in failed,
                "method": config.get("method"),
                "threshold": config.get("threshold"),
            }
    return out
