"""The scoring metrics, one definition for every place that scores predictions: training's validation epochs,
evaluation, the registry's gate and backend checks, and monitoring's feedback accuracy."""

from __future__ import annotations

from collections.abc import Sequence

from sklearn.metrics import accuracy_score, f1_score


def scores(y_true: Sequence, y_pred: Sequence) -> dict[str, float]:
    """accuracy, f1_weighted and f1_macro (a class never predicted scores 0, not a warning)."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }
