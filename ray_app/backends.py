"""Faster ways to run a registered version, and the check that lets one be used.

`fp32` is the model as trained (torch), on the replica's GPU when Ray gave it one. On CPU: `torch-int8` quantizes its
Linear layers to int8 on the fly; `onnx-fp32` runs it in ONNX Runtime; `onnx-int8` runs ONNX Runtime's dynamic int8 of
that export. On a GPU: `cuda-fp16`, the model in half precision on the replica's GPU. A backend other than fp32 is
used for a version only when its weighted F1 on the version's frozen test rows is within `max_f1_drop` of fp32's,
so nobody is served a silently worse model. The export and the verdict happen once per version: they are stored
with it (version tags, and the ONNX file as an artifact of the version's run), and every later load only reads them.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import pandas as pd
import torch
from sklearn.metrics import f1_score

from ray_app.config_base import Backend
from ray_app.errors import AppError
from ray_app.model import TextClassifier, quantize_int8
from ray_app.text import join_text

log = logging.getLogger("ray_app")
BACKENDS: tuple[str, ...] = get_args(Backend)
TAG = "ray_app.backend"  # version tags: ray_app.backend.<name>.verdict / .f1 / .fp32_f1 / .artifact
ONNX_OPSET = 17


@dataclass
class OnnxClassifier(TextClassifier):
    """The shared predict path (tokenize, length-sorted padding, softmax) with ONNX Runtime for the forward pass."""

    session: Any = None
    label_names: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return self.label_names

    def device(self) -> torch.device:
        """Where the forward pass runs: the first parameter's device (cuda on a GPU replica)."""
        return torch.device("cpu")

    def _logits(self, enc):
        feeds = {i.name: enc[i.name].numpy() for i in self.session.get_inputs()}
        return self.session.run(None, feeds)[0]


class _LogitsOnly(torch.nn.Module):
    """The HF model with a plain tensor output, which the TorchScript-based exporter handles."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, inputs, strict=True)), return_dict=True).logits


def export_onnx(clf: TextClassifier, out_dir: Path) -> dict[str, Path]:
    """fp32 and int8 ONNX files of one classifier (dynamic batch and sequence axes).

    `dynamo=False`: the TorchScript exporter handles these encoders without the onnxscript package; `optimum`,
    HF's own exporter, does not work with transformers 5.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    sample = clf.tokenizer(["an example text", "a second one"], padding=True, return_tensors="pt")
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in sample]
    fp32, int8 = out_dir / "model-fp32.onnx", out_dir / "model-int8.onnx"
    on_cpu = clf.model if clf.device().type == "cpu" else copy.deepcopy(clf.model).cpu()  # fp32 stays on its GPU
    with torch.inference_mode():
        torch.onnx.export(
            _LogitsOnly(on_cpu, names).eval(),  # the exporter puts back the wrapper's mode, recursively
            tuple(sample[n] for n in names),
            str(fp32),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "logits": {0: "batch"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    clf.model.eval()  # still serving fp32 (or judged against it): never with dropout on
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    return {"onnx-fp32": fp32, "onnx-int8": int8}


def onnx_classifier(clf: TextClassifier, path: Path, threads: int, spin: bool | None = None) -> OnnxClassifier:
    import os

    import onnxruntime as ort

    if spin is None:  # a measurement switch (bench/profile_request.py), not a setting
        spin = os.environ.get("RAY_APP_ORT_SPIN", "0") == "1"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:  # ORT's threads otherwise spin after each run, taking cores the ingress and HAProxy need
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return OnnxClassifier(
        model=None, tokenizer=clf.tokenizer, max_length=clf.max_length, session=session, label_names=clf.labels
    )


def half_precision(clf: TextClassifier) -> TextClassifier:
    """The model in fp16 on the GPU it is on: on a GPU the fast path is half precision on its tensor cores, not int8 or
    ONNX Runtime on the host's CPU. fp16 rather than bf16: its 10-bit mantissa keeps the logits closer to fp32's, and
    GPUs since Volta (T4, V100) run it on tensor cores where bf16 needs Ampere. Judged against fp32 like the others."""
    if clf.device().type != "cuda":
        raise AppError("backend cuda-fp16 needs a GPU replica: set num_gpus in the Classifier's ray_actor_options")
    half = copy.deepcopy(clf.model).half().eval()
    return TextClassifier(model=half, tokenizer=clf.tokenizer, max_length=clf.max_length)


# backends made from the loaded fp32 weights in process: nothing to export or store, only the verdict
TRANSFORMS = {"torch-int8": quantize_int8, "cuda-fp16": half_precision}


def weighted_f1(clf: TextClassifier, rows: pd.DataFrame, text_columns: list[str]) -> float:
    probs = clf.predict_proba(join_text(rows, text_columns))
    predicted = [clf.labels[i] for i in probs.argmax(axis=1)]
    return float(f1_score(list(rows["label"]), predicted, average="weighted", zero_division=0))


@dataclass
class Verdict:
    backend: str
    accepted: bool
    f1: float
    fp32_f1: float
    rows: int
    max_f1_drop: float

    def tags(self) -> dict[str, str]:
        prefix = f"{TAG}.{self.backend}"
        return {
            f"{prefix}.verdict": "accepted" if self.accepted else "refused",
            f"{prefix}.f1": f"{self.f1:.4f}",
            f"{prefix}.fp32_f1": f"{self.fp32_f1:.4f}",
            f"{prefix}.rows": str(self.rows),
            f"{prefix}.max_f1_drop": str(self.max_f1_drop),
        }

    @classmethod
    def from_tags(cls, backend: str, tags: dict[str, str]) -> Verdict | None:
        prefix = f"{TAG}.{backend}"
        if f"{prefix}.verdict" not in tags:
            return None
        return cls(
            backend=backend,
            accepted=tags[f"{prefix}.verdict"] == "accepted",
            f1=float(tags[f"{prefix}.f1"]),
            fp32_f1=float(tags[f"{prefix}.fp32_f1"]),
            rows=int(tags[f"{prefix}.rows"]),
            max_f1_drop=float(tags[f"{prefix}.max_f1_drop"]),
        )


def judge(backend: str, fast: TextClassifier, fp32: TextClassifier, rows, text_columns, max_drop: float) -> Verdict:
    """Score both on the same labelled rows; accept when weighted F1 drops by at most max_drop."""
    f1, base = weighted_f1(fast, rows, text_columns), weighted_f1(fp32, rows, text_columns)
    return Verdict(backend, base - f1 <= max_drop, f1, base, len(rows), max_drop)


@dataclass
class Chosen:
    """What a replica serves for one version: the classifier, the backend it runs, and why."""

    classifier: TextClassifier
    backend: str
    verdict: Verdict | None
    computed: bool  # the verdict was made now (first ask), not read from the version


def for_version(
    client,
    name: str,
    version: str,
    fp32: TextClassifier,
    backend: Backend,
    text_columns: list[str],
    max_drop: float,
    threads: int,
) -> Chosen:
    """The version's classifier on `backend` if its stored verdict accepts it, making and storing the verdict (and the
    ONNX export) the first time; fp32 when the backend is refused or its test rows cannot be read."""
    from ray_app.registry import frozen_test_rows

    if backend == "fp32":
        return Chosen(fp32, "fp32", None, computed=False)
    mv = client.get_model_version(name, version)
    verdict = Verdict.from_tags(backend, dict(mv.tags or {}))
    if verdict is not None and verdict.max_f1_drop == max_drop:
        if not verdict.accepted:
            return Chosen(fp32, "fp32", verdict, computed=False)
        return Chosen(_load_stored(client, mv, fp32, backend, threads), backend, verdict, computed=False)
    rows = frozen_test_rows(client, name, version)
    if f"{TAG}.{backend}.artifact" in (mv.tags or {}):  # exported before (another backend, another drop limit)
        fast = _load_stored(client, mv, fp32, backend, threads)
    else:
        with tempfile.TemporaryDirectory(prefix="ray-app-onnx-") as tmp:
            fast = _build(fp32, backend, Path(tmp), threads, client, mv)
    verdict = judge(backend, fast, fp32, rows, text_columns, max_drop)
    for key, value in verdict.tags().items():
        client.set_model_version_tag(name, version, key, value)
    return Chosen(fast if verdict.accepted else fp32, backend if verdict.accepted else "fp32", verdict, computed=True)


def _artifact_path(backend: str) -> str:
    return f"backends/{backend}"


def _build(fp32: TextClassifier, backend: str, tmp: Path, threads: int, client, mv) -> TextClassifier:
    """Make the backend from the fp32 model; ONNX files are stored with the version's run for every later load."""
    if backend in TRANSFORMS:
        return TRANSFORMS[backend](fp32)
    files = export_onnx(fp32, tmp / "export")
    for name, path in files.items():  # both, so a later ask for the other ONNX backend exports nothing
        client.log_artifact(mv.run_id, str(path), artifact_path=_artifact_path(name))
        stored = f"{_artifact_path(name)}/{path.name}"
        client.set_model_version_tag(mv.name, mv.version, f"{TAG}.{name}.artifact", stored)
    return onnx_classifier(fp32, files[backend], threads)


def _load_stored(client, mv, fp32: TextClassifier, backend: str, threads: int) -> TextClassifier:
    if backend in TRANSFORMS:
        return TRANSFORMS[backend](fp32)  # a transform of the loaded weights, not an export: nothing to store
    import mlflow

    artifact = (mv.tags or {})[f"{TAG}.{backend}.artifact"]
    with tempfile.TemporaryDirectory(prefix="ray-app-onnx-") as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=mv.run_id, artifact_path=artifact, dst_path=tmp)
        return onnx_classifier(fp32, Path(path), threads)  # the session holds the model in memory
