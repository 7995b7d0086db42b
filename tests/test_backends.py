"""Serving backends on a real (tiny) classifier: the ONNX export answers like torch, the F1 limit decides in both
directions, and a version's verdict and export are made once, stored with it in a real MLflow registry, then read."""

from __future__ import annotations

import logging
import uuid

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from ray_app.backends import export_onnx, for_version, half_precision, judge, onnx_classifier
from ray_app.errors import AppError
from ray_app.model import TextClassifier, load_for_training, load_tokenizer, quantize_int8, unexpected_load_keys
from tests.conftest import smoke_config
from tests.serving import EXAMPLE, register_version

LABELS = ["natural-language-processing", "computer-vision", "mlops", "other"]
ROWS = pd.DataFrame(
    {"title": ["BERT text", "image GAN", "deploy docker"], "description": ["", "", ""], "label": LABELS[:3]}
)
TEXTS = [f"{t} {d}" for t, d in zip(EXAMPLE["title"], EXAMPLE["description"], strict=True)] + ["short", "a " * 60]


@pytest.fixture(scope="module")
def classifier(tiny_model) -> TextClassifier:
    torch.manual_seed(0)
    return TextClassifier(load_for_training(str(tiny_model), LABELS), load_tokenizer(str(tiny_model)))


def test_onnx_export_answers_like_torch_and_int8_stays_close(classifier, tmp_path) -> None:
    files = export_onnx(classifier, tmp_path)
    want = classifier.predict_proba(TEXTS, batch_size=2)
    fp32 = onnx_classifier(classifier, files["onnx-fp32"], threads=1)
    assert fp32.labels == classifier.labels
    assert np.allclose(fp32.predict_proba(TEXTS, batch_size=2), want, atol=1e-5)
    int8 = onnx_classifier(classifier, files["onnx-int8"], threads=1).predict_proba(TEXTS, batch_size=4)
    assert np.allclose(int8.sum(axis=1), 1, atol=1e-5) and np.abs(int8 - want).max() < 0.2
    assert files["onnx-int8"].stat().st_size < files["onnx-fp32"].stat().st_size


def test_the_f1_limit_accepts_within_and_refuses_beyond(classifier) -> None:
    fast = quantize_int8(classifier)
    assert judge("torch-int8", fast, classifier, ROWS, ["title", "description"], max_drop=1.0).accepted
    assert not judge("torch-int8", fast, classifier, ROWS, ["title", "description"], max_drop=-1.0).accepted


def test_cuda_fp16_on_a_model_that_is_not_on_a_gpu_is_refused_naming_the_setting(classifier) -> None:
    """A replica without a GPU asked for cuda-fp16: no verdict (the pool then serves fp32 and logs this reason)."""
    with pytest.raises(AppError, match="needs a GPU replica: set num_gpus"):
        half_precision(classifier)


@pytest.mark.slow
def test_a_versions_verdict_and_export_are_made_once_then_read(
    mlflow_server, ray_cluster, tiny_model, storage, tmp_path
) -> None:
    from ray_app.registry import load_classifier
    from ray_app.runtime import setup_mlflow

    name = f"backends-{uuid.uuid4().hex[:6]}"
    cfg = smoke_config(mlflow_server, ray_cluster["address"], tiny_model, storage, f"registry.model_name={name}")
    setup_mlflow(cfg)
    version = register_version(cfg, tiny_model, 3, tmp_path)
    client = MlflowClient(mlflow_server)
    fp32 = load_classifier(f"models:/{name}/{version}")
    cols = ["title", "description"]

    first = for_version(client, name, version, fp32, "onnx-int8", cols, max_drop=1.0, threads=1)
    assert first.computed and first.backend == "onnx-int8" and first.verdict.accepted
    tags = client.get_model_version(name, version).tags
    assert tags["ray_app.backend.onnx-int8.verdict"] == "accepted"
    assert tags["ray_app.backend.onnx-fp32.artifact"] == "backends/onnx-fp32/model-fp32.onnx"
    run_files = {f.path for f in client.list_artifacts(client.get_model_version(name, version).run_id, "backends")}
    assert run_files == {"backends/onnx-fp32", "backends/onnx-int8"}

    again = for_version(client, name, version, fp32, "onnx-int8", cols, max_drop=1.0, threads=1)
    assert not again.computed and again.backend == "onnx-int8"
    assert np.allclose(again.classifier.predict_proba(TEXTS), first.classifier.predict_proba(TEXTS), atol=1e-6)

    other = for_version(client, name, version, fp32, "onnx-fp32", cols, max_drop=-1.0, threads=1)
    assert other.computed and other.backend == "fp32" and not other.verdict.accepted  # refused: serve fp32
    assert client.get_model_version(name, version).tags["ray_app.backend.onnx-fp32.verdict"] == "refused"


def test_a_fresh_head_loads_quietly_and_anything_else_missing_is_named(tiny_model, caplog) -> None:
    """Fine-tuning always starts a new classification head: not worth transformers' WARNING table on every load.
    Weights missing outside the head mean the checkpoint is not the encoder the config names: that is a warning."""
    with caplog.at_level(logging.INFO, logger="ray_app"):
        load_for_training(str(tiny_model), LABELS)
    assert not [r for r in caplog.records if r.name == "ray_app"]
    info = {
        "missing_keys": {"classifier.weight", "bert.encoder.layer.0.output.dense.weight"},
        "unexpected_keys": set(),
        "mismatched_keys": {("classifier.bias", (2,), (4,))},
    }
    assert unexpected_load_keys(info) == "missing keys ['bert.encoder.layer.0.output.dense.weight']"
    assert unexpected_load_keys({"missing_keys": {"classifier.bias"}, "mismatched_keys": set()}) == ""
