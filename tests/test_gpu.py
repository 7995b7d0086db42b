"""The GPU path, on a machine with a CUDA device (`pytest -m gpu`; skipped without one): Ray Train with
`train.use_gpu`, a Serve replica given a GPU, and the GPU backend (`cuda-fp16`). The session's Ray head finds the
machine's GPUs itself (`ray start` detects them), so the fixtures are the same ones every other test uses.

Written on a CPU-only machine: these tests have not run yet (docs/cluster.md, "GPU")."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ray_app.ports import free_port
from tests.conftest import smoke_config
from tests.serving import EXAMPLE, deploy_config, register_version, serve_deploy, wait_until

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: torch.cuda.is_available() is False"),
]
TEXTS = [f"{t} {d}" for t, d in zip(EXAMPLE["title"], EXAMPLE["description"], strict=True)] + ["short", "a " * 60]


def test_ray_train_with_use_gpu_trains_on_cuda_to_a_checkpoint(mlflow_server, ray_cluster, tiny_model, storage):
    """One worker with train.use_gpu: Ray gives it a GPU, the loop runs there (bf16 autocast) and rank 0 says so in
    the run's `train.device` tag; the checkpoint it writes loads back as a model."""
    from ray_app.data import prepare
    from ray_app.model import TextClassifier
    from ray_app.pipeline import run_training, training_run
    from ray_app.runtime import setup_mlflow

    cfg = smoke_config(mlflow_server, ray_cluster["address"], tiny_model, storage, "train.use_gpu=true")
    tracking = setup_mlflow(cfg)
    splits = prepare(cfg.data)
    with training_run(cfg, tracking, splits, "train") as (run_id, name):
        result = run_training(cfg, tracking, splits, run_id, name)

    tags = MlflowClient(mlflow_server).get_run(run_id).data.tags
    assert tags["train.device"].startswith("cuda"), tags.get("train.device")
    assert tags["train.autocast"] == "bf16"
    assert [h["epoch"] for h in result.history] == list(range(1, cfg.train.epochs + 1))
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    model_dir = Path(result.checkpoint_path) / "model"
    assert (model_dir / "model.safetensors").is_file(), result.checkpoint_path
    assert TextClassifier.load(str(model_dir)).predict_proba(TEXTS).shape == (len(TEXTS), len(splits.labels))


def test_a_serve_replica_given_a_gpu_answers_from_cuda_in_fp16(
    mlflow_server, ray_cluster, tiny_model, storage, tmp_path
):
    """serve_config.yaml's Classifier with `num_gpus: 1` and `backend: cuda-fp16`: the replica loads the version onto
    its GPU (/models reports where each replica's models run), makes the fp16 verdict there and stores it with the
    version, and answers a request."""
    from ray import serve

    from ray_app.runtime import setup_mlflow

    name = f"gpu-{uuid.uuid4().hex[:6]}"
    cfg = smoke_config(mlflow_server, ray_cluster["address"], tiny_model, storage, f"registry.model_name={name}")
    setup_mlflow(cfg)
    version = register_version(cfg, tiny_model, 1, tmp_path)
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(name, "champion", version)
    port, key = free_port(), f"gpu-{uuid.uuid4().hex[:6]}"
    path = deploy_config(
        tmp_path / "gpu.yaml", port, mlflow_server, name, tmp_path / "predlog", key, backend="cuda-fp16"
    )
    conf = yaml.safe_load(path.read_text())
    conf["applications"][0]["deployments"][0]["ray_actor_options"]["num_gpus"] = 1
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    serve_deploy(path, ray_cluster["dashboard"])
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": key}, timeout=60)
    try:
        wait_until(lambda: http.get("/ready").status_code == 200, 240, "/ready")
        answer = http.post("/predict", json={"title": "BERT for text", "description": "nlp"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["version"] == version

        def held() -> list[dict]:
            replicas = http.get("/models").json()["replicas"]
            return [m for r in replicas.values() for m in r["models"] if m["model_id"] == f"{name}/{version}"]

        (model,) = wait_until(held, 30, "the replica's report of its models")
        assert model["device"].startswith("cuda"), model
        tags = client.get_model_version(name, version).tags
        assert tags["ray_app.backend.cuda-fp16.verdict"] in {"accepted", "refused"}, tags  # made on the GPU
    finally:
        http.close()
        serve.shutdown()


def test_cuda_fp16_runs_in_half_precision_on_the_gpu_and_answers_like_fp32(tiny_model):
    from ray_app.backends import half_precision, judge
    from ray_app.model import TextClassifier, load_for_training, load_tokenizer
    from tests.test_backends import LABELS, ROWS

    torch.manual_seed(0)
    fp32 = TextClassifier(load_for_training(str(tiny_model), LABELS), load_tokenizer(str(tiny_model)))
    fp32.model.to("cuda").eval()
    fp16 = half_precision(fp32)
    assert {(p.device.type, p.dtype) for p in fp16.model.parameters()} == {("cuda", torch.float16)}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}  # the fp32 model is left as it was
    want, got = fp32.predict_proba(TEXTS), fp16.predict_proba(TEXTS)
    assert np.allclose(got.sum(axis=1), 1, atol=1e-3) and np.abs(got - want).max() < 1e-2
    assert judge("cuda-fp16", fp16, fp32, ROWS, ["title", "description"], max_drop=1.0).accepted
