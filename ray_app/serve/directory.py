"""What each model-pool replica has loaded, as the replicas report it: Serve has no public call that lists a
replica's multiplexed models, so replicas push their list here and `GET /models` reads it."""

from __future__ import annotations

import time
from typing import Any

import ray

STALE_AFTER_S = 30.0


@ray.remote(num_cpus=0, max_restarts=-1)
class ModelDirectory:
    """One per Serve app. Replicas report on every load and eviction and every few seconds; silent ones age out.
    Restarted by Ray whenever it dies (its node lost, a crash): the replicas' handles stay valid, and their next
    reports fill it again within seconds; without restarts they would report into a dead actor for good."""

    def __init__(self) -> None:
        self.replicas: dict[str, dict[str, Any]] = {}

    def report(self, replica: str, models: list[dict[str, Any]]) -> None:
        self.replicas[replica] = {"models": models, "reported_at": time.time()}

    def forget(self, replica: str) -> None:
        self.replicas.pop(replica, None)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        self.replicas = {k: v for k, v in self.replicas.items() if now - v["reported_at"] < STALE_AFTER_S}
        return self.replicas


def directory_for(app_name: str):
    """Detached so it outlives any one replica; zero CPUs so it never competes with the model."""
    return ModelDirectory.options(
        name=f"ray_app_models:{app_name}", namespace="ray_app", lifetime="detached", get_if_exists=True
    ).remote()
