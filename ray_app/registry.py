"""MLflow model registry: log the pyfunc model, register versions, and move aliases through a gate.

Aliases only (`challenger`, `champion`, `previous`); MLflow's stages are deprecated.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import ray_app
from ray_app.config import AppConfig, RegistryConfig
from ray_app.errors import AppError
from ray_app.metrics import scores

log = logging.getLogger("ray_app")
CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"
TEST_SPLIT_ARTIFACT = "data/test_split.csv"
MODEL_CODE = Path(ray_app.__file__).with_name("pyfunc_entry.py")  # what MLflow runs to load a version
_PINNED = ("torch", "transformers", "tokenizers", "mlflow", "pandas", "numpy", "safetensors")


@dataclass
class Registered:
    name: str
    version: str
    model_uri: str
    run_id: str
    aliases: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    challenger: str
    champion_before: str | None
    champion_after: str | None
    challenger_score: float
    champion_score: float | None
    metric: str
    n_rows: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pinned_requirements() -> list[str]:
    """Exact versions of what the model needs to load, read from this environment."""
    return [f"{name}=={pkg_version(name)}" for name in _PINNED]


def log_model(cfg: AppConfig, model_dir: str, example: pd.DataFrame) -> str:
    """Log the fine-tuned model, tokenizer and label map as a pyfunc model into the active run; returns its URI."""
    from ray_app.model import TextClassifier

    inputs = example[cfg.data.text_columns].head(3).reset_index(drop=True)
    outputs = TextClassifier.load(model_dir, cfg.data.max_length).predict_frame(inputs, cfg.data.text_columns)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),  # models from code: loading runs the file, nothing is unpickled
        artifacts={"model_dir": model_dir},
        code_paths=[str(Path(ray_app.__file__).parent)],
        signature=infer_signature(inputs, outputs),
        input_example=inputs,
        pip_requirements=pinned_requirements(),
        model_config={"text_columns": cfg.data.text_columns, "max_length": cfg.data.max_length},
    )
    return info.model_uri


def register(cfg: AppConfig, model_uri: str, run_id: str, tags: dict[str, str]) -> Registered:
    """A new version of the registered model, tagged for lineage, with the `challenger` alias."""
    name = cfg.registry.model_name
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Tags ML projects: NLP, computer vision, MLOps or other.")
    mv = mlflow.register_model(model_uri, name, tags={**tags, "run_id": run_id})
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    log.info("registered %s version %s as %s", name, mv.version, CHALLENGER)
    return Registered(name, str(mv.version), f"models:/{name}/{mv.version}", run_id, [CHALLENGER])


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def load_pyfunc(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """`mlflow.pyfunc.load_model` into a directory that is removed once the model is in memory.

    Without `dst_path` MLflow downloads into a fresh temp dir per call and never removes it (~90 MB per load of
    MiniLM), and prepends the model's code path to `sys.path` each time: a serving replica that loads and evicts
    versions all day would fill the disk. The weights and tokenizer are in memory after loading, and `ray_app` is
    imported from the installed package, so neither the files nor the path entry are needed afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="ray-app-model-") as tmp:
        try:
            return mlflow.pyfunc.load_model(model_uri, dst_path=tmp)
        finally:
            sys.path[:] = [p for p in sys.path if not p.startswith(tmp)]


def load_classifier(model_uri: str):
    """The `TextClassifier` inside a registered version, read from the two things `ClassifierModel.load_context`
    reads: the model directory and the config that the MLmodel file's python_function flavor names.

    Only those are downloaded. `mlflow.pyfunc.load_model` also fetches the code copy, the environment files and the
    input example (49 files) and compares the installed packages with the model's requirements: 1.0 s per load
    against 0.3 s here, which is most of a cold version's first request in a serving replica (docs/serving.md).
    `score_version` (evaluation) still goes through the pyfunc model, and the tests hold the two to the same answers.
    """
    from mlflow.models import Model

    from ray_app.model import TextClassifier

    with tempfile.TemporaryDirectory(prefix="ray-app-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/MLmodel", dst_path=tmp))
        flavor = Model.load(local).flavors.get("python_function", {})
        model_dir = flavor.get("artifacts", {}).get("model_dir", {}).get("path")
        if flavor.get("python_model") is None or model_dir is None:  # not a model this package logged
            return load_pyfunc(model_uri).unwrap_python_model().classifier
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri}/{model_dir}", dst_path=tmp)
        return TextClassifier.load(path, max_length=(flavor.get("config") or {}).get("max_length", 128))


def frozen_test_rows(client: MlflowClient, name: str, version: str) -> pd.DataFrame:
    """The test rows stored with a version's training run: every comparison uses these exact rows."""
    run_id = client.get_model_version(name, version).run_id
    with tempfile.TemporaryDirectory(prefix="ray-app-rows-") as tmp:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=TEST_SPLIT_ARTIFACT, dst_path=tmp)
        return pd.read_csv(path, dtype={"id": str}, keep_default_na=False)


def score_version(name: str, version: str, rows: pd.DataFrame, metric: str) -> float:
    model = load_pyfunc(f"models:/{name}/{version}")
    predicted = model.predict(rows[model.metadata.get_input_schema().input_names()])
    return scores(list(rows["label"]), list(predicted["label"]))[metric]


def decide(challenger: float, champion: float | None, cfg: RegistryConfig) -> tuple[bool, str]:
    """The gate: clear the minimum, and beat the champion (if any) by the margin."""
    if challenger < cfg.min_score:
        return False, f"challenger {cfg.metric} {challenger:.4f} is below registry.min_score {cfg.min_score}"
    if champion is None:
        return True, f"first champion: {cfg.metric} {challenger:.4f} clears registry.min_score {cfg.min_score}"
    if challenger >= champion + cfg.margin:
        return True, f"challenger {challenger:.4f} >= champion {champion:.4f} + margin {cfg.margin}"
    return False, f"challenger {challenger:.4f} < champion {champion:.4f} + margin {cfg.margin}"


def promote(cfg: RegistryConfig) -> GateDecision:
    """Re-score champion and challenger on the challenger's frozen test rows and move `champion` if the gate says so."""
    client = MlflowClient()
    name = cfg.model_name
    challenger = _alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise AppError(f"model {name} has no '{CHALLENGER}' version; run `ray-app pipeline` or `ray-app register`")
    champion = _alias_version(client, name, CHAMPION)
    rows = frozen_test_rows(client, name, challenger)
    challenger_score = score_version(name, challenger, rows, cfg.metric)
    if champion == challenger:
        return GateDecision(
            False,
            "challenger is already champion",
            challenger,
            champion,
            champion,
            challenger_score,
            challenger_score,
            cfg.metric,
            len(rows),
        )
    champion_score = score_version(name, champion, rows, cfg.metric) if champion else None
    promoted, reason = decide(challenger_score, champion_score, cfg)
    if promoted:
        if champion:
            client.set_registered_model_alias(name, PREVIOUS, champion)
        client.set_registered_model_alias(name, CHAMPION, challenger)
    client.set_model_version_tag(name, challenger, "gate", f"{'promoted' if promoted else 'held'}: {reason}")
    log.info("promotion gate: %s: %s", "promoted" if promoted else "held", reason)
    return GateDecision(
        promoted,
        reason,
        challenger,
        champion,
        challenger if promoted else champion,
        challenger_score,
        champion_score,
        cfg.metric,
        len(rows),
    )


def rollback(cfg: RegistryConfig) -> dict[str, Any]:
    """Move `champion` back to `previous`; the version rolled away from is tagged so nobody re-promotes it blindly."""
    client = MlflowClient()
    name = cfg.model_name
    previous = _alias_version(client, name, PREVIOUS)
    if previous is None:
        raise AppError(f"model {name} has no '{PREVIOUS}' version to roll back to")
    champion = _alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.delete_registered_model_alias(name, PREVIOUS)
    if champion:
        client.set_model_version_tag(name, champion, "rolled_back", "true")
    log.info("rolled back %s: champion %s -> %s", name, champion, previous)
    return {"model": name, "champion_before": champion, "champion_after": previous}


def aliases(cfg: RegistryConfig) -> dict[str, str]:
    client = MlflowClient()
    return {a: v for a in (CHALLENGER, CHAMPION, PREVIOUS) if (v := _alias_version(client, cfg.model_name, a))}
