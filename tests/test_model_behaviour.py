"""Behavioural tests of the default model after real training (Made-With-ML style): minimum functionality,
invariance and direction. Slow: it fine-tunes the bundled MiniLM on the default config (2 epochs)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from ray.train import Checkpoint

from ray_app.config_loader import load_config
from ray_app.data import prepare
from ray_app.model import TextClassifier
from ray_app.train import MODEL_SUBDIR, train

from .conftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(ray_cluster, storage, tmp_path_factory) -> TextClassifier:
    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        # 2 of the default 5 epochs: the bundled MiniLM reaches val F1 ~0.93 after one (bench/hpo.py's note)
        [f"ray.address={ray_cluster['address']}", f"train.storage_path={storage}", "train.epochs=2"],
    )
    splits = prepare(cfg.data)
    result = train(cfg, splits, f"behaviour-{int(time.time())}", None, None)
    target = tmp_path_factory.mktemp("trained")
    with Checkpoint(result.checkpoint_path).as_directory() as ckpt:
        clf = TextClassifier.load(str(Path(ckpt) / MODEL_SUBDIR))
        clf.save(target)
    return TextClassifier.load(str(target))


def predict(clf: TextClassifier, text: str) -> str:
    return clf.labels[int(clf.predict_proba([text]).argmax())]


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Real-time object detection with YOLO. Detect and track objects in video frames.", "computer-vision"),
        ("Image segmentation with U-Net. Pixel-wise masks for medical images.", "computer-vision"),
        ("Sentiment analysis with BERT. Classify the sentiment of movie reviews.", "natural-language-processing"),
        (
            "Machine translation with transformers. Translate English sentences to German.",
            "natural-language-processing",
        ),
        ("Serving models in production. Deploy, monitor and version ML models with Docker and Kubernetes.", "mlops"),
    ],
)
def test_minimum_functionality(trained: TextClassifier, text: str, label: str) -> None:
    assert predict(trained, text) == label


@pytest.mark.parametrize(
    ("text", "perturbed"),
    [
        (
            "A great tutorial on image segmentation. Learn how to segment images.",
            "A graet tutoral on image segmentation. Lern how to segment images.",
        ),
        (
            "Named entity recognition with spaCy. Extract entities from text.",
            "Named entity recognition with spaCy. Extarct entities from text!!",
        ),
    ],
)
def test_invariance_to_typos_in_unrelated_words(trained: TextClassifier, text: str, perturbed: str) -> None:
    assert predict(trained, text) == predict(trained, perturbed)


def test_direction_object_detection_moves_toward_vision(trained: TextClassifier) -> None:
    vision = trained.labels.index("computer-vision")
    base = "A new open-source library. Fast training of deep learning models."
    before = trained.predict_proba([base])[0, vision]
    after = trained.predict_proba([base + " Includes object detection."])[0, vision]
    assert after > before


def test_predictions_do_not_depend_on_batch_composition(trained: TextClassifier) -> None:
    texts = ["short text", "a much longer text about neural networks for image classification and more", "x"]
    together = trained.predict_proba(texts)
    alone = [trained.predict_proba([t])[0] for t in texts]
    for row, single in zip(together, alone, strict=False):
        assert abs(row - single).max() < 1e-4
