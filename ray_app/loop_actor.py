"""The loop's controller as a Ray actor, and the commands that start, stop and ask it (`ray-app loop ...`).

A named, detached actor per model, pinned to the head node (`node:__internal_head__`):
- the name is the lock: Ray's GCS registers a name once per namespace, atomically, so a second `loop start` for the
  same model is refused (an MLflow tag has no compare-and-set and could not be one);
- `max_restarts=-1`: a controller that dies is restarted by Ray and resumes from the cycle recorded in MLflow;
- it lives beside the Serve app and the jobs it submits, so the laptop that started it may close its lid.
A scheduled Ray job could run the checks, but would need a lock and a resume of its own; a Serve deployment would tie
the loop to the app whose traffic it changes.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray

from ray_app.config import AppConfig
from ray_app.errors import AppError
from ray_app.loop import Controller
from ray_app.loop_names import FAILED, IDLE, NAMESPACE, STATES, actor_name

log = logging.getLogger("ray_app")


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=4)
class LoopActor:
    """Runs the Controller in a thread so `status` and `stop` answer while a check or a job wait is in progress;
    exports the state as `ray_app_loop_state{model,state}` (1 for the current state) and the canary weight."""

    def __init__(self, cfg: AppConfig) -> None:
        from ray.util.metrics import Gauge

        self.cfg = cfg
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # `stop` waits for a look in progress to end before closing the cycle
        self.controller: Controller | None = None
        self.error: str | None = None
        self.gauge = Gauge("app_loop_state", "1 for the loop's current state.", tag_keys=("model", "state"))
        self.weight = Gauge("app_loop_canary_weight", "The loop's canary weight.", tag_keys=("model",))
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                with self.lock:
                    if self.stopping.is_set():
                        break
                    if self.controller is None:
                        self.controller = Controller(self.cfg)  # MLflow may be down at first: retried each tick
                    self.controller.tick()
                self.error = None
            except Exception as exc:  # noqa: BLE001 - one bad look (a server down) must not end the loop
                self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                log.warning("loop %s: %s", self.cfg.registry.model_name, self.error)
            self._export()
            self.stopping.wait(self.cfg.loop.tick_s)

    def _export(self) -> None:
        model = self.cfg.registry.model_name
        current = self.controller.phase if self.controller else IDLE
        for state in STATES:
            self.gauge.set(1.0 if current == state else 0.0, {"model": model, "state": state})
        weight = self.controller.cycle.weight if self.controller and self.controller.cycle else 0.0
        self.weight.set(weight, {"model": model})

    def status(self) -> dict[str, Any]:
        if self.controller is None:
            return {"state": "starting", "model": self.cfg.registry.model_name, "error": self.error}
        return {**self.controller.status(), "error": self.error}

    def stop(self, keep_traffic: bool = False) -> dict[str, Any]:
        self.stopping.set()
        with self.lock:
            if self.controller is not None:
                self.controller.stop(keep_traffic)
        self._export()
        return self.status()


def start(cfg: AppConfig, challenger: str | None = None) -> dict[str, Any]:
    """Start the model's controller on the head node; refused when one already runs (the name is taken). With a
    `challenger`, its cycle is recorded first and the controller begins by resuming it."""
    from ray_app.loop import hand_cycle
    from ray_app.loop_state import LoopRecord

    options = dict(
        name=actor_name(cfg.registry.model_name),
        namespace=NAMESPACE,
        lifetime="detached",
        resources={"node:__internal_head__": 0.001},
        runtime_env={"env_vars": _env()},
    )
    if _running(cfg.registry.model_name):
        raise _already(cfg)
    cycle = hand_cycle(cfg, challenger) if challenger else None
    try:
        actor = LoopActor.options(**options).remote(cfg)
    except ValueError:  # another start won the name between the look above and now
        if cycle is not None:
            LoopRecord.for_config(cfg).close(cycle, FAILED, "another loop started first")
        raise _already(cfg) from None
    return ray.get(actor.status.remote(), timeout=60)


def _env() -> dict[str, str]:
    """The commit the retrains are tagged with, and the caller's token mode, so the controller's job and Serve
    clients send the Ray token as the caller's do; MLflow's "View run" line per step run left out of its log."""
    from ray_app import RAY_DATA_LOGGING
    from ray_app.runtime import git_commit

    env = {
        "RAY_APP_GIT_COMMIT": git_commit(),
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # not a "View run" line per step run
        "RAY_DATA_LOGGING_CONFIG": str(RAY_DATA_LOGGING),  # the check's Ray Data plans to its log file only
    }
    if os.environ.get("RAY_AUTH_MODE"):
        env["RAY_AUTH_MODE"] = os.environ["RAY_AUTH_MODE"]
    return env


def _running(model_name: str) -> bool:
    try:
        ray.get_actor(actor_name(model_name), namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def _already(cfg: AppConfig) -> AppError:
    name = cfg.registry.model_name
    return AppError(
        f"a loop already runs for model {name} (actor {actor_name(name)} in namespace {NAMESPACE}); "
        "`ray-app loop status` shows it, `ray-app loop stop` ends it"
    )


def handle(model_name: str):
    try:
        return ray.get_actor(actor_name(model_name), namespace=NAMESPACE)
    except ValueError:
        raise AppError(f"no loop runs for model {model_name}; `ray-app loop start` starts one") from None


def stop(model_name: str, keep_traffic: bool) -> dict[str, Any]:
    """Let the controller close its cycle (traffic back to the champion unless kept), then end the actor for good."""
    actor = handle(model_name)
    final = ray.get(actor.stop.remote(keep_traffic), timeout=120)
    ray.kill(actor, no_restart=True)
    return final


def with_explicit_paths(cfg: AppConfig) -> AppConfig:
    """The retrain's working dir named absolutely here, at the edge: the controller runs in a Ray worker whose
    current directory is not the caller's. Its job always leaves the new version challenger: the loop promotes."""
    from pathlib import Path

    retrain = cfg.monitor.retrain
    working_dir = str(Path(retrain.working_dir).expanduser().resolve()) if retrain.working_dir else None
    update = {"working_dir": working_dir, "promote": False}
    if retrain.dashboard_address is None:
        update["dashboard_address"] = cfg.loop.dashboard_address
    return cfg.replace(monitor={"retrain": retrain.model_copy(update=update)})
