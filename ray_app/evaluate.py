"""Evaluation on a split or any labelled CSV, always beside the TF-IDF baseline a sceptical user would try first."""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    f1_score,
    precision_recall_fscore_support,
)
from sklearn.pipeline import FeatureUnion, make_pipeline

from ray_app.config import EvaluateConfig
from ray_app.html_report import page
from ray_app.metrics import scores
from ray_app.model import TextClassifier
from ray_app.text import join_text

log = logging.getLogger("ray_app")


@dataclass
class EvalResult:
    """Headline metrics, per class, per slice, and the transformer-minus-baseline difference with its interval."""

    n: int
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]]
    slices: dict[str, dict[str, float]]
    baseline: dict[str, float]
    difference: dict[str, float]
    worst_errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_baseline(seed: int = 0):
    """TF-IDF over word 1-2-grams and character 2-5-grams, balanced logistic regression."""
    features = FeatureUnion(
        [
            ("word", TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)),
            ("char", TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), min_df=2, sublinear_tf=True)),
        ]
    )
    return make_pipeline(features, LogisticRegression(C=10, max_iter=2000, class_weight="balanced", random_state=seed))


def paired_bootstrap(
    y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, samples: int, seed: int = 0
) -> dict[str, float]:
    """Weighted-F1 difference a - b over resamples of the same rows (scipy's paired bootstrap), with a 95 %
    percentile interval and the share of resamples where b was better."""
    from scipy.stats import bootstrap

    def diff(truth, a, b) -> float:
        return f1_score(truth, a, average="weighted", zero_division=0) - f1_score(
            truth, b, average="weighted", zero_division=0
        )

    result = bootstrap(
        (y_true, pred_a, pred_b), diff, n_resamples=samples, paired=True, vectorized=False,
        confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed),
    )  # fmt: skip
    return {
        "f1_weighted_diff": float(diff(y_true, pred_a, pred_b)),
        "ci_low": float(result.confidence_interval.low),
        "ci_high": float(result.confidence_interval.high),
        "p_baseline_better": float((result.bootstrap_distribution < 0).mean()),
    }


def slice_masks(frame: pd.DataFrame, texts: list[str], cfg: EvaluateConfig) -> dict[str, np.ndarray]:
    """Short texts, and texts that mention a term typical of another class than their own."""
    words = np.array([len(t.split()) for t in texts])
    lowered = [t.lower() for t in texts]
    patterns = {
        label: re.compile(r"\b(" + "|".join(map(re.escape, terms)) + r")\b")
        for label, terms in cfg.class_terms.items()
        if terms
    }
    golds = frame["label"].tolist()
    other_term = np.array(
        [
            any(p.search(t) for label, p in patterns.items() if label != gold)
            for t, gold in zip(lowered, golds, strict=True)
        ]
    )
    return {"short_text": words < cfg.short_text_words, "mentions_other_class_term": other_term}


def confusion_figure(y_true: list[str], y_pred: list[str], labels: list[str], title: str):
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=labels, ax=ax, xticks_rotation=30, colorbar=False, cmap="Blues"
    )
    ax.set_title(title)
    fig.tight_layout()
    return fig


def evaluate(
    clf: TextClassifier,
    frame: pd.DataFrame,
    train_frame: pd.DataFrame,
    text_columns: list[str],
    cfg: EvaluateConfig,
) -> tuple[EvalResult, dict[str, Any]]:
    """Score the model and the baseline on the same rows; returns the result and the figures/tables to log."""
    texts = join_text(frame, text_columns)
    probs = clf.predict_proba(texts)
    labels = clf.labels
    y_true = frame["label"].to_numpy(dtype=object)
    y_pred = np.array([labels[i] for i in probs.argmax(axis=1)], dtype=object)

    baseline = build_baseline().fit(join_text(train_frame, text_columns), train_frame["label"])
    y_base = baseline.predict(texts).astype(object)

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    per_class = {
        label: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, label in enumerate(labels)
    }
    slices = {}
    for name, mask in slice_masks(frame, texts, cfg).items():
        if mask.any():
            slices[name] = {"n": int(mask.sum()), **scores(list(y_true[mask]), list(y_pred[mask]))}

    confidence = probs.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    worst = wrong[np.argsort(-confidence[wrong])][: cfg.worst_errors]
    errors = pd.DataFrame(
        {
            "text": [texts[i] for i in worst],
            "label": y_true[worst],
            "predicted": y_pred[worst],
            "confidence": confidence[worst].round(4),
            "baseline_predicted": y_base[worst],
        }
    )
    result = EvalResult(
        n=len(frame),
        metrics=scores(list(y_true), list(y_pred)),
        per_class=per_class,
        slices=slices,
        baseline=scores(list(y_true), list(y_base)),
        difference=paired_bootstrap(y_true, y_pred, y_base, cfg.bootstrap_samples),
        worst_errors=errors.to_dict(orient="records"),
    )
    artifacts = {
        "confusion_matrix.png": confusion_figure(list(y_true), list(y_pred), labels, "fine-tuned model"),
        "confusion_matrix_baseline.png": confusion_figure(list(y_true), list(y_base), labels, "TF-IDF baseline"),
        "worst_errors": errors,
    }
    return result, artifacts


PAGES = {
    "worst_errors": (
        "Worst errors",
        "The rows the fine-tuned model got wrong with the highest confidence, most confident first, with the TF-IDF "
        "baseline's answer beside each. Confident mistakes are where to look for wrong labels, a missing class cue or "
        "a class the model confuses.",
    ),
}


def log_to_mlflow(result: EvalResult, artifacts: dict[str, Any], section: str) -> None:
    """Metrics in one MLflow section (`test/f1_weighted`, `test/baseline/f1_weighted`, `test/class/mlops/f1`, ...) and
    the plots and tables under evaluation/SECTION/."""
    import mlflow

    metrics = {f"{section}/{k}": v for k, v in result.metrics.items()}
    metrics.update({f"{section}/baseline/{k}": v for k, v in result.baseline.items()})
    metrics.update({f"{section}/vs_baseline/{k}": v for k, v in result.difference.items()})
    for label, values in result.per_class.items():
        metrics.update({f"{section}/class/{label}/{k}": v for k, v in values.items() if k != "support"})
    for name, values in result.slices.items():
        metrics.update({f"{section}/slice/{name}/{k}": v for k, v in values.items()})
    mlflow.log_metrics(metrics)
    folder = f"evaluation/{section}"
    for name, item in artifacts.items():
        if isinstance(item, pd.DataFrame):
            mlflow.log_text(item.to_csv(index=False), f"{folder}/{name}.csv")
            title, intro = PAGES.get(name, (name.replace("_", " "), ""))
            mlflow.log_text(page(f"{title} ({section} rows)", intro, {"": item}), f"{folder}/{name}.html")
        else:
            mlflow.log_figure(item, f"{folder}/{name}")
            plt.close(item)
    mlflow.log_dict(result.to_dict(), f"{folder}/result.json")


def plot_learning_curves(history: list[dict[str, float]], best_epoch: int | None = None):
    """Loss and val F1 per epoch, the picture that says whether more epochs would help; the kept epoch is marked."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax1.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val loss")
    ax1.set(title="Loss", xlabel="epoch", ylabel="cross-entropy loss")
    ax2.plot(epochs, [h["val_f1_weighted"] for h in history], marker="o", label="val F1 (weighted)")
    ax2.plot(epochs, [h["val_f1_macro"] for h in history], marker="o", label="val F1 (macro)")
    ax2.set(title="Validation F1", xlabel="epoch", ylabel="F1", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"kept: epoch {best_epoch}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Learning curves")
    fig.tight_layout()
    return fig
