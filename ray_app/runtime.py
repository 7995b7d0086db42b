"""The one place that reads the environment, connects to Ray and points MLflow at a tracking server.

Stages receive what they need from here as arguments; they never look at environment variables themselves.
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass

import mlflow
from mlflow.entities import Experiment

from ray_app import RAY_DATA_LOGGING
from ray_app.config import AppConfig
from ray_app.errors import AppError

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
log = logging.getLogger("ray_app")


@dataclass(frozen=True)
class Tracking:
    """Where runs go: workers on other nodes get this instead of reading their own environment."""

    uri: str
    experiment_id: str
    experiment_name: str


def resolve_tracking_uri(cfg: AppConfig) -> str:
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def serve_tracking_uri(explicit: str | None) -> str:
    """The tracking server a Serve replica reads the registry from: its args, else the environment."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def secret_from_env(name: str | None) -> str | None:
    """Secrets only ever come from the environment (set it in the cluster's env or the deploy's runtime_env)."""
    return (os.environ.get(name) or None) if name else None


def _check_server(uri: str) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
            if resp.status == 200:
                return
    except (urllib.error.URLError, OSError) as exc:
        raise AppError(
            f"MLflow tracking server {uri} is not reachable ({exc}); start it with `make up` "
            "or set mlflow.tracking_uri / MLFLOW_TRACKING_URI to a running server"
        ) from None
    raise AppError(f"MLflow tracking server {uri} answered /health with an error; check its log")


def quiet_progress_bars() -> None:
    """Progress bars only on a terminal: in a job's or a replica's log every redraw is another line (MLflow's
    artifact downloads, Hugging Face's weight loading). A value already in the environment wins."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported ...
    if "transformers" in sys.modules:  # ... so a process that has it already is told directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def quiet_ray_data_console() -> None:
    """Ray Data's per-dataset INFO lines (plans, progress) to its log file only, in this process and the workers it
    starts; read when ray.data is first imported, so call it before that. A value already set wins."""
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))


def setup_mlflow(cfg: AppConfig) -> Tracking:
    """Point this process at the tracking server and make sure the experiment exists before workers log to it."""
    quiet_progress_bars()
    uri = resolve_tracking_uri(cfg)
    _check_server(uri)
    mlflow.set_tracking_uri(uri)
    exp_id = experiment_id(cfg.mlflow.experiment, cfg.mlflow.artifact_location)
    mlflow.set_experiment(experiment_id=exp_id)
    return Tracking(uri=uri, experiment_id=exp_id, experiment_name=cfg.mlflow.experiment)


# MLflow 3's UI picks an experiment's view from this tag; without it, an experiment of runs opens on an empty GenAI
# traces page. The training view shows runs, charts and models.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id(name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created on first use (safe when two processes create it at once) and tagged for the
    training view, an existing one included."""
    key, kind = EXPERIMENT_KIND
    exp: Experiment | None = mlflow.get_experiment_by_name(name)
    if exp is None:
        try:
            return mlflow.create_experiment(name, artifact_location=artifact_location, tags={key: kind})
        except mlflow.exceptions.MlflowException:  # created concurrently by another process
            exp = mlflow.get_experiment_by_name(name)
    if exp.tags.get(key) != kind:
        try:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, kind)
        except mlflow.exceptions.MlflowException as exc:  # e.g. a reader on a protected server: only the view
            log.warning("could not tag experiment %s for MLflow's training view: %s", name, exc.message)
    return exp.experiment_id


def connect_ray(cfg: AppConfig) -> None:
    """Join the configured cluster, the one a Ray job runs in, or start a local instance sized by config."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    logging_kwargs = {"log_to_driver": True, "logging_level": logging.WARNING}
    try:
        if address:
            ray.init(address=address, **logging_kwargs)
        else:  # a local instance: its workers inherit quiet_ray_data_console's setting
            ray.init(num_cpus=cfg.ray.num_cpus, **logging_kwargs)
    except ConnectionError as exc:
        hint = (
            "; the head uses token authentication: export RAY_AUTH_MODE=token (the Makefile does) and retry"
            if os.environ.get("RAY_AUTH_MODE") != "token"
            else ""
        )
        raise AppError(
            f"cannot connect to Ray at {address!r} ({exc}){hint}; start a head with `make up` "
            "or set ray.address to a running cluster"
        ) from None


def git_commit() -> str:
    """The commit the code came from: RAY_APP_GIT_COMMIT (set by `make run`, since a Ray job's working dir is an
    unpacked copy without .git), else the checkout's HEAD."""
    import subprocess

    if os.environ.get("RAY_APP_GIT_COMMIT"):
        return os.environ["RAY_APP_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
