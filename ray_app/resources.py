"""What a training run asks of the cluster, and whether the cluster can ever give it.

A retrain is submitted beside a running Serve app that holds part of every node. Ray Train on its own waits for a
worker group that can never start and retries without end; these checks refuse an impossible request at once and
say what a feasible one is waiting for. Both read the cluster's *total* resources (what an autoscaler can grow
towards is not known here), so a request that is only busy right now is never refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray_app.config import TrainConfig
from ray_app.errors import AppError

log = logging.getLogger("ray_app")
SETTINGS = "train.cpus_per_worker / train.num_workers (train.use_gpu for GPUs)"


@dataclass(frozen=True)
class TrainingRequest:
    """`workers` Ray Train workers, each reserving `per_worker` (Ray's accounting, not the threads it runs)."""

    workers: int
    per_worker: dict[str, float]

    @classmethod
    def of(cls, tc: TrainConfig) -> TrainingRequest:
        per_worker = {"CPU": tc.cpus_per_worker, **({"GPU": 1.0} if tc.use_gpu else {})}
        return cls(workers=tc.num_workers, per_worker=per_worker)

    def total(self) -> dict[str, float]:
        return {k: v * self.workers for k, v in self.per_worker.items()}

    def __str__(self) -> str:
        each = ", ".join(f"{_num(v)} {k}" for k, v in self.per_worker.items())
        return f"{self.workers} worker(s) x {{{each}}}"


def worker_threads(tc: TrainConfig) -> int:
    """Threads a worker computes with, set apart from the CPUs it reserves: Ray's accounting is what lets a retrain
    start beside a Serve app, the threads are what make it fast."""
    return tc.torch_threads or max(1, round(tc.cpus_per_worker))


def _num(value: float) -> str:
    return f"{value:g}"


def _fmt(resources: dict[str, float], keys) -> str:
    return ", ".join(f"{_num(resources.get(k, 0.0))} {k}" for k in keys)


def impossible(request: TrainingRequest, total: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why the cluster can never run this request (its totals are too small, or no node holds one worker), or None.

    Ray places each worker on one node, so a worker larger than every node is as impossible as a sum larger than
    the cluster, even when the sum would fit.
    """
    keys = list(request.per_worker)
    need = request.total()
    short = [k for k in keys if need[k] > total.get(k, 0.0) + 1e-9]
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in keys}
    too_big = [k for k in keys if request.per_worker[k] > largest[k] + 1e-9]
    if not short and not too_big:
        return None
    where = (
        f"the cluster has {_fmt(total, keys)} in total"
        if short
        else f"no node holds one worker (the largest has {_fmt(largest, keys)})"
    )
    return (
        f"training asks for {request} = {_fmt(need, keys)}, but {where}; lower {SETTINGS} "
        "(train.torch_threads sets the threads each worker runs, independently of what it reserves), or add nodes"
    )


def waiting_for(request: TrainingRequest, available: dict[str, float], total: dict[str, float]) -> str | None:
    """What a feasible request waits for when the free resources are short right now (Serve replicas, other jobs)."""
    keys = list(request.per_worker)
    need = request.total()
    if all(available.get(k, 0.0) + 1e-9 >= need[k] for k in keys):
        return None
    return (
        f"training waits for {request} = {_fmt(need, keys)}: {_fmt(available, keys)} of {_fmt(total, keys)} "
        "are free now (Serve replicas and other jobs hold the rest)"
    )


def is_local_path(storage_path: str) -> bool:
    return "://" not in storage_path or storage_path.startswith("file://")


def storage_problem(alive_nodes: int, storage_path: str, shared_filesystem: bool) -> str | None:
    """Why checkpoints cannot go to `storage_path` on this cluster, or None. On more than one node a local path is
    each node's own disk: a worker elsewhere writes its checkpoint where the driver never reads it, and Ray Train
    fails only at the first checkpoint. A path every node mounts (NFS) is allowed when the config says so."""
    if alive_nodes <= 1 or shared_filesystem or not is_local_path(storage_path):
        return None
    return (
        f"train.storage_path={storage_path!r} is a local path, but the Ray cluster has {alive_nodes} nodes and each "
        "has its own disk: set train.storage_path to shared storage (s3://BUCKET/PATH, with the endpoint and "
        "credentials in every node's environment), or, if that path is a shared file system mounted on every node "
        "(NFS), set train.shared_filesystem=true"
    )


def _cluster() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return dict(ray.cluster_resources()), nodes


def refuse_impossible(tc: TrainConfig) -> None:
    """Raise, naming the request, the cluster's totals and the settings (or the storage that the cluster's nodes
    cannot share), before any data or worker work starts."""
    total, nodes = _cluster()
    reason = storage_problem(len(nodes), tc.storage_path, tc.shared_filesystem) or impossible(
        TrainingRequest.of(tc), total, nodes
    )
    if reason:
        raise AppError(reason)


def say_if_waiting(tc: TrainConfig) -> None:
    """Log what the trainer will wait for (up to train.start_timeout_s) when its resources are busy right now."""
    import ray

    total, _ = _cluster()
    reason = waiting_for(TrainingRequest.of(tc), dict(ray.available_resources()), total)
    if reason:
        log.warning("%s; it fails if they are not free within train.start_timeout_s=%gs", reason, tc.start_timeout_s)


def start_timeout_error(tc: TrainConfig) -> AppError:
    """The one line a user sees when a feasible request never got its resources in time."""
    import ray

    request = TrainingRequest.of(tc)
    keys = list(request.per_worker)
    total, _ = _cluster()
    return AppError(
        f"training could not start: {request} = {_fmt(request.total(), keys)} was not free within "
        f"train.start_timeout_s={tc.start_timeout_s:g}s (the cluster has {_fmt(total, keys)} in total, "
        f"{_fmt(dict(ray.available_resources()), keys)} free now); free resources (scale serving down), "
        f"raise train.start_timeout_s, or lower {SETTINGS}"
    )
