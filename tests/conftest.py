"""Session-scoped real services: a `ray start --head` cluster and an `mlflow server`, each on free ports in its own
temp dir, stopped by their own pids so a `make run` left up is never touched."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_app.config import AppConfig
from ray_app.config_loader import load_config
from ray_app.local import start_mlflow, start_ray_head, stop_mlflow, stop_ray_head
from ray_app.ports import free_port, free_serve_ports

# Ray's token authentication stays on (its default for `ray start`); a driver that names an explicit address must
# opt in to sending the token, as users do with this variable.
os.environ.setdefault("RAY_AUTH_MODE", "token")
ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ray_app.model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def mlflow_server() -> Iterator[str]:
    root = Path(tempfile.mkdtemp(prefix="mlf-"))
    port = free_port()
    pid = start_mlflow(root, port)
    yield f"http://127.0.0.1:{port}"
    stop_mlflow(pid, root)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, str]]:
    """A real head node; the test process joins it as a driver, like `ray-app` does on a cluster."""
    import ray

    temp_dir = Path(tempfile.mkdtemp(prefix="rt-"))  # short: Ray's socket paths must stay under 107 chars
    metrics_port, serve_ports = free_port(), free_serve_ports()
    address, dashboard, pids = start_ray_head(
        temp_dir, free_port(), free_port(), num_cpus=2, metrics_port=metrics_port, serve_ports=serve_ports
    )
    ray.init(address=address, log_to_driver=True)
    yield {
        "address": address,
        "dashboard": dashboard,
        "temp_dir": str(temp_dir),
        "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
        "serve_ports": serve_ports,
    }
    ray.shutdown()
    stop_ray_head(temp_dir, pids)


def smoke_config(mlflow_url: str, ray_address: str, model: Path, storage: Path, *extra: str) -> AppConfig:
    """configs/smoke.yaml pointed at this session's services; each call gets its own experiment."""
    return load_config(
        SMOKE,
        [
            f"model.name_or_path={model}",
            f"mlflow.tracking_uri={mlflow_url}",
            f"mlflow.experiment=smoke-{uuid.uuid4().hex[:8]}",
            f"ray.address={ray_address}",
            f"train.storage_path={storage}",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray_storage")


@pytest.fixture(scope="session")
def smoke_run(mlflow_server: str, ray_cluster: dict[str, str], tiny_model: Path, storage: Path):
    """The whole smoke pipeline once; several tests read what it produced."""
    from ray_app.pipeline import run_pipeline
    from ray_app.runtime import connect_ray, setup_mlflow

    cfg = smoke_config(
        mlflow_server, ray_cluster["address"], tiny_model, storage, f"registry.model_name=smoke-{uuid.uuid4().hex[:6]}"
    )
    tracking = setup_mlflow(cfg)
    connect_ray(cfg)
    return cfg, run_pipeline(cfg, tracking)
