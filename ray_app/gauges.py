"""Monitoring gauges per model version that outlive the check that set them (exported by Ray's metrics agent)."""

from __future__ import annotations

import time

import ray

GAUGES_ACTOR = "ray_app_monitor_gauges"
NAMESPACE = "ray_app"


@ray.remote(num_cpus=0)
class MonitorGauges:
    """Holds the latest check's numbers per model version as Ray metrics, exported as `ray_app_drift_share`,
    `ray_app_drift_detected` and `ray_app_feedback_accuracy` with tags model and version. Ray drops the metrics of a
    process that exits, so they live in this detached actor instead of the short-lived check; and since Ray's metrics
    agent forgets a gauge that is not re-reported within two report intervals, a thread re-sets them every few
    seconds."""

    def __init__(self, refresh_s: float = 5.0) -> None:
        import threading

        from ray.util.metrics import Gauge

        keys = ("model", "version")
        self.gauges = {
            "drift_share": Gauge("app_drift_share", "Share of drifted columns in the last check.", tag_keys=keys),
            "drift_detected": Gauge("app_drift_detected", "1 if the drift share is breached.", tag_keys=keys),
            "feedback_accuracy": Gauge("app_feedback_accuracy", "Accuracy on labelled feedback.", tag_keys=keys),
        }
        self.values: dict[tuple[str, str], dict[str, float]] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._refresh, args=(refresh_s,), daemon=True).start()

    def set(self, model: str, version: str, values: dict[str, float]) -> None:
        with self.lock:
            self.values.setdefault((model, version), {}).update({k: float(v) for k, v in values.items()})
            self._export()

    def _export(self) -> None:
        for (model, version), values in self.values.items():
            for key, value in values.items():
                self.gauges[key].set(value, tags={"model": model, "version": version})

    def _refresh(self, every_s: float) -> None:
        while True:
            time.sleep(every_s)
            with self.lock:
                self._export()


def publish(name: str, version: str, values: dict[str, float]) -> None:
    """Values left out (feedback accuracy without labels) keep their last published number."""
    actor = MonitorGauges.options(
        name=GAUGES_ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()
    ray.get(actor.set.remote(name, version, values), timeout=60)
