"""Per-epoch metrics from the Train worker that owns them to MLflow, in order, through outages of the tracking
server: training never waits for MLflow, and no epoch is lost (what never arrived is logged from the checkpoint)."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from ray_app.metrics import epoch_metrics, mlflow_name

log = logging.getLogger("ray_app")


class EpochLogger:
    """Rank 0 logs into the run the driver opened; a worker on another node only needs the URI and run id.

    Batches go out from a background thread, in order. A batch the tracking server cannot take (it is down or
    restarting) stays at the head of the queue and is tried again every `retry_s` until it lands, so an outage
    neither stalls nor fails training and no epoch is dropped. `close` waits for the queue at the end of the loop,
    at most `flush_timeout_s`; what is still queued then is logged by the driver from the checkpoint's history
    (`backfill_epoch_metrics`).
    """

    def __init__(
        self, tracking_uri: str | None, run_id: str | None, retry_s: float = 2.0, flush_timeout_s: float = 60.0
    ) -> None:
        import os

        from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES
        from mlflow.tracking import MlflowClient

        from ray_app.registry_auth import use_node_credentials

        use_node_credentials()  # a Train worker: the node's MLflow user, as the driver has it
        self.client = MlflowClient(tracking_uri) if tracking_uri and run_id else None
        self.run_id = run_id
        self.retry_s, self.flush_timeout_s = retry_s, flush_timeout_s
        self.failed_attempts = 0
        self._queue: collections.deque[tuple[list[Any], list[Any]]] = collections.deque()  # (metrics, tags)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        # This process is a Train worker and the thread below is its retry policy: MLflow's own retries (7, with
        # exponential backoff up to minutes) would only delay the first attempt after the server is back.
        os.environ.setdefault(MLFLOW_HTTP_REQUEST_MAX_RETRIES.name, "1")

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)  # the epoch's own time, whenever the batch reaches the server
        self._put([Metric(k, v, now, step) for k, v in epoch_metrics(metrics).items()], [])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Run tags from the worker (the device it trained on), queued and retried like the epochs' metrics."""
        from mlflow.entities import RunTag

        self._put([], [RunTag(k, v) for k, v in tags.items()])

    def _put(self, metrics: list[Any], tags: list[Any]) -> None:
        if self.client is None:
            return
        with self._cond:
            self._queue.append((metrics, tags))
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._send_forever, name="mlflow-epoch-logger", daemon=True)
            self._thread.start()

    def _send_forever(self) -> None:
        from mlflow.exceptions import MlflowException

        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                batch, tags = self._queue[0]
            try:
                self.client.log_batch(self.run_id, metrics=batch, tags=tags)
            except MlflowException as exc:
                code = exc.get_http_status_code()
                if 400 <= code < 500 and code != 429:  # refused for its content: retrying cannot help
                    log.error("MLflow refused epoch metrics %s: %s", [m.key for m in batch + tags], exc)
                else:
                    self._failed(exc)
                    continue
            except Exception as exc:  # noqa: BLE001 - connection errors of any kind: the server is away
                self._failed(exc)
                continue
            with self._cond:
                self._queue.popleft()
                self._cond.notify_all()

    def _failed(self, exc: Exception) -> None:
        if self.failed_attempts == 0 or self.failed_attempts % 30 == 0:
            log.warning("MLflow unreachable; %d metric batches held for retry (%s)", len(self._queue), exc)
        self.failed_attempts += 1
        time.sleep(self.retry_s)

    def close(self) -> int:
        """Wait until every batch landed, at most `flush_timeout_s`; returns how many did not."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue, self.flush_timeout_s)
            left = len(self._queue)
        if left:
            log.warning("%d metric batches not logged after %.0f s; the driver logs them", left, self.flush_timeout_s)
        elif self.failed_attempts:
            log.warning("every epoch's metrics reached MLflow after %d failed attempts", self.failed_attempts)
        return left


def backfill_epoch_metrics(tracking_uri: str | None, run_id: str | None, history: list[dict[str, float]]) -> int:
    """Epochs whose metrics never reached MLflow (it was still down when training ended) are logged from the
    checkpoint's history; this call runs with MLflow's own retries. Returns how many epochs were missing."""
    if not (tracking_uri and run_id and history):
        return 0
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    logged = {m.step for m in client.get_metric_history(run_id, mlflow_name("train_loss"))}
    missing = [h for h in history if int(h["epoch"]) not in logged]
    now = int(time.time() * 1000)
    for h in missing:
        client.log_batch(run_id, metrics=[Metric(k, v, now, int(h["epoch"])) for k, v in epoch_metrics(h).items()])
    if missing:
        log.warning("logged the metrics of epochs %s from the checkpoint", [int(h["epoch"]) for h in missing])
    return len(missing)
