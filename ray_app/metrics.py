"""The scoring metrics, one definition for every place that scores predictions: training's validation epochs,
evaluation, the registry's gate and backend checks, and monitoring's feedback accuracy."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, f1_score

# MLflow's run page groups charts by the part of a name before its first "/": a section each for train/, val/, test/,
# data/ and best/, instead of one alphabetical wall. Only names logged to MLflow take this form; what Ray Train and Tune
# report (`val_f1_weighted`: what `tune.metric` names and checkpoints are ranked by) stays as it is.
NOT_CHARTED = {"epoch", "early_stopped", "param_count"}  # the step itself, a tag and a param


def mlflow_name(reported: str) -> str:
    """`val_f1_weighted` -> `val/f1_weighted`, `train_loss` -> `train/loss`, `lr` -> `train/lr`."""
    for section in ("val", "train"):
        if reported.startswith(f"{section}_"):
            return f"{section}/{reported[len(section) + 1 :]}"
    return f"val/{reported}" if reported.startswith("latency") else f"train/{reported}"


def epoch_metrics(reported: dict[str, float]) -> dict[str, float]:
    """One epoch's report as MLflow metrics (its step is the epoch)."""
    return {mlflow_name(k): float(v) for k, v in reported.items() if k not in NOT_CHARTED}


def scores(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """accuracy, f1_weighted and f1_macro (a class never predicted scores 0, not a warning)."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
