"""The stream consumer: a deployment of the app (`StreamConsumer`, no CPU reserved) whose replicas form one consumer
group on the input topic, send every message through the Classifier deployment's `predict_message` (the HTTP route's
own path, over a DeploymentHandle: validation, traffic policy, multiplexing, batching, backend, metrics and the
prediction log with route `stream`) and write one answer per message: the result on the output topic keyed by the
request id, or the original bytes on the dead-letter topic with the error in headers.

At least once: a partition's offset is committed only past messages whose answer the broker has acknowledged
(acks=all), so a message in flight when a replica stops or a partition moves is answered again, under the same key.
When the pool sheds load (503 `overloaded`) the replica pauses its partitions until the Retry-After has passed and
sends the message again; nothing is dropped and nothing spins. docs/streaming.md has the contract.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from ray import serve
from ray.serve import metrics

from ray_app.serve.schemas import ApiError, decode_message, stream_error
from ray_app.serve.settings import StreamSettings

log = logging.getLogger("ray.serve")
OVERLOADED = "overloaded"
# The other 503s: retried for `retry_for_s`, then dead-lettered with their code.
RETRYABLE = frozenset({"registry_busy", "registry_unavailable", "model_unavailable", "unreachable"})


class InFlight:
    """Offsets fetched and not yet answered, per partition. Records arrive in offset order, so everything below the
    lowest offset still in flight is answered: that is the commit point, or one past the last fetched when none is."""

    def __init__(self) -> None:
        self.pending: dict[Any, set[int]] = {}
        self.fetched: dict[Any, int] = {}
        self.committed: dict[Any, int] = {}

    def add(self, tp: Any, offset: int) -> None:
        self.pending.setdefault(tp, set()).add(offset)
        self.fetched[tp] = offset + 1

    def done(self, tp: Any, offset: int) -> None:
        self.pending.get(tp, set()).discard(offset)

    def commit_points(self) -> dict[Any, int]:
        """Partitions whose commit point moved past what was last committed."""
        points = {}
        for tp, after_last in self.fetched.items():
            point = min(self.pending[tp]) if self.pending.get(tp) else after_last
            if point > self.committed.get(tp, -1):
                points[tp] = point
        return points

    def forget(self, tps: Any) -> None:
        for tp in tps:
            self.pending.pop(tp, None)
            self.fetched.pop(tp, None)
            self.committed.pop(tp, None)


class StreamConsumer:
    """`ingress`: the name of the deployment that predicts (app.py's Classifier), in this replica's own app."""

    async def __init__(self, settings: StreamSettings, ingress: str) -> None:
        self.s, self.ingress_name = settings, ingress
        context = serve.get_replica_context()
        self.ingress = serve.get_deployment_handle(ingress, context.app_name)
        self.client_id = f"ray-app-stream-{context.replica_id.unique_id}"
        self.inflight = InFlight()
        self.tasks: dict[tuple[Any, int], asyncio.Task] = {}
        self.resume_at = 0.0  # monotonic time until which partitions stay paused (the pool shed load)
        self.counts: Counter[str] = Counter()
        self.lag: dict[str, int] = {}
        self.state = "starting"
        self.consumer = self.producer = None
        tags = ("topic",)
        self.m_consumed = metrics.Counter("app_stream_consumed", "Messages read from the input topic.", tag_keys=tags)
        self.m_produced = metrics.Counter("app_stream_produced", "Results acknowledged by the broker.", tag_keys=tags)
        self.m_dead = metrics.Counter(
            "app_stream_dead_lettered", "Messages sent to the dead-letter topic.", tag_keys=("topic", "error")
        )
        self.m_pauses = metrics.Counter("app_stream_pauses", "Pauses of the partitions because the pool shed load.")
        self.m_retries = metrics.Counter("app_stream_retries", "Messages sent again after a 503.", tag_keys=("error",))
        self.m_lag = metrics.Gauge(
            "app_stream_lag", "End offset minus committed offset, per partition.", tag_keys=("topic", "partition")
        )
        self._main = asyncio.create_task(self._run())

    # ---- what Serve and callers see ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        return {
            "replica": self.client_id,
            "state": self.state,
            "assigned": sorted(f"{tp.topic}/{tp.partition}" for tp in assigned),
            "in_flight": len(self.tasks),
            "paused": self.resume_at > time.monotonic(),
            "lag": dict(self.lag),
            **self.counts,
        }

    def check_health(self) -> None:
        if self._main.done() and not self._main.cancelled() and self._main.exception() is not None:
            raise RuntimeError(f"the consume loop ended: {self._main.exception()!r}")

    async def __del__(self) -> None:
        """Serve stops the replica: answers in flight get a moment to finish and their offsets are committed."""
        self._main.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=5)
        await self._commit()
        await self._close()

    # ---- the loop ----------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        """Connect, consume; on a broker error start again after a growing pause (the replica stays up meanwhile)."""
        backoff = 1.0
        while True:
            try:
                await self._connect()
                backoff = 1.0
                await self._consume()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broker or network fault: reconnect, uncommitted work is redone
                self.state = f"reconnecting after {type(exc).__name__}: {exc}"
                log.warning("stream consumer: %s; retrying in %.0f s", self.state, backoff)
                for task in self.tasks.values():
                    task.cancel()
                self.tasks.clear()
                self.inflight = InFlight()
                await self._close()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _connect(self) -> None:
        s = self.s
        self.state = f"connecting to {s.bootstrap_servers}"
        common = {"bootstrap_servers": s.bootstrap_servers, "client_id": self.client_id}
        # acks=all: a result counts as written once every in-sync replica has it; only then is its offset committed
        self.producer = AIOKafkaProducer(**common, acks="all", linger_ms=0, max_batch_size=s.producer_batch_bytes)
        await self.producer.start()
        self.consumer = AIOKafkaConsumer(
            **common,
            group_id=s.group_id,
            enable_auto_commit=False,
            auto_offset_reset=s.auto_offset_reset,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=max(s.session_timeout_ms // 3, 100),
        )
        await self.consumer.start()
        self.consumer.subscribe([s.input_topic], listener=_Rebalance(self))
        self.state = f"joining group {s.group_id}"
        log.info("stream consumer: %s on %s", self.state, s.bootstrap_servers)

    async def _close(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    await client.stop()
                except Exception as exc:  # noqa: BLE001 - closing a client of a broker that is gone
                    log.info("stream consumer: closing %s: %r", type(client).__name__, exc)
        self.consumer = self.producer = None

    async def _consume(self) -> None:
        last_lag = 0.0
        while True:
            self._flow()
            room = self.s.max_in_flight - len(self.tasks)
            batch = await self.consumer.getmany(timeout_ms=200, max_records=max(room, 1))
            for records in batch.values():
                for record in records:
                    self._start(record)
            await self._commit()
            if time.monotonic() - last_lag >= self.s.lag_interval_s:
                last_lag = time.monotonic()
                try:
                    await self._measure_lag()
                except Exception as exc:  # noqa: BLE001 - a missed measurement; consuming goes on
                    log.info("stream consumer: lag not measured: %r", exc)

    def _flow(self) -> None:
        """Partitions are paused while the pool sheds load (until `resume_at`) or while `max_in_flight` messages
        are in prediction; getmany returns nothing from a paused partition, and the group still sees a live member."""
        assigned = self.consumer.assignment()
        if self.resume_at > time.monotonic() or len(self.tasks) >= self.s.max_in_flight:
            self.consumer.pause(*assigned)
        elif paused := self.consumer.paused():
            self.consumer.resume(*paused)

    def _start(self, record) -> None:
        tp = TopicPartition(record.topic, record.partition)
        key = (tp, record.offset)
        self.inflight.add(tp, record.offset)
        task = asyncio.create_task(self._answer(record))
        self.tasks[key] = task

        def finished(task: asyncio.Task) -> None:
            self.tasks.pop(key, None)
            if not task.cancelled():  # cancelled: the partition moved or the loop restarts; it is answered again
                self.inflight.done(tp, record.offset)

        task.add_done_callback(finished)

    async def _commit(self, only: Any = None) -> None:
        points = self.inflight.commit_points()
        points = {tp: p for tp, p in points.items() if only is None or tp in only}
        if not points or self.consumer is None:
            return
        try:
            await self.consumer.commit(points)
        except Exception as exc:  # noqa: BLE001 - a rebalance under way: the next owner answers those messages again
            log.info("stream consumer: commit of %s failed: %r", points, exc)
            return
        self.inflight.committed.update(points)

    async def _measure_lag(self) -> None:
        """End offset (the broker's ListOffsets) minus the group's committed offset, per assigned partition."""
        assigned = list(self.consumer.assignment())
        if not assigned:
            return
        ends = await self.consumer.end_offsets(assigned)
        starts = await self.consumer.beginning_offsets(assigned)
        for tp in assigned:
            committed = await self.consumer.committed(tp)
            lag = max(ends[tp] - (starts[tp] if committed is None else committed), 0)
            self.lag[f"{tp.topic}/{tp.partition}"] = lag
            self.m_lag.set(lag, tags={"topic": tp.topic, "partition": str(tp.partition)})

    # ---- one message -------------------------------------------------------------------------------------------

    async def _answer(self, record) -> None:
        self.counts["consumed"] += 1
        self.m_consumed.inc(tags={"topic": record.topic})
        try:
            message = decode_message(record.value)
        except ApiError as err:
            message, answer = None, stream_error(err)
        else:
            answer = await self._predict(message)
        if "error" in answer:
            await self._dead_letter(record, message, answer)
            return
        value = json.dumps(answer).encode()
        await self._send(self.s.output_topic, value, answer["request_id"].encode())
        self.counts["produced"] += 1
        self.m_produced.inc(tags={"topic": self.s.output_topic})

    async def _predict(self, message: Any) -> dict[str, Any]:
        """The Classifier's answer; `overloaded` pauses the partitions and waits, other 503s are retried for
        `retry_for_s`. A message naming a model is routed as an HTTP request with that header is (multiplexing)."""
        model = message.get("model") if isinstance(message, dict) else None
        handle = self.ingress.options(multiplexed_model_id=model) if isinstance(model, str) and model else self.ingress
        deadline = time.monotonic() + self.s.retry_for_s
        while True:
            await self._resumed()
            try:
                answer = await handle.predict_message.remote(message)
            except Exception as exc:  # noqa: BLE001 - no replica answered (restarting, gone): retried like a 503
                answer = {
                    "error": "unreachable",
                    "detail": f"the {self.ingress_name} deployment did not answer: {type(exc).__name__}: {exc}",
                    "status": 503,
                }
            code = answer.get("error")
            if code == OVERLOADED:
                self._pause(answer.get("retry_after_s", 1))
            elif code in RETRYABLE and time.monotonic() < deadline:
                self.counts["retries"] += 1
                self.m_retries.inc(tags={"error": code})
                await asyncio.sleep(answer.get("retry_after_s", 1))
            elif code == "unreachable":  # retried for retry_for_s: counts as the server's fault, as HTTP's 500
                return {**answer, "error": "internal_error", "status": 500}
            else:
                return answer

    def _pause(self, seconds: float) -> None:
        now = time.monotonic()
        if self.resume_at <= now:
            self.counts["pauses"] += 1
            self.m_pauses.inc()
            log.info("stream consumer: the pool shed load; partitions paused for %s s", seconds)
        self.resume_at = max(self.resume_at, now + seconds)
        if self.consumer is not None:
            self._flow()

    async def _resumed(self) -> None:
        while (wait := self.resume_at - time.monotonic()) > 0:
            await asyncio.sleep(wait)

    async def _dead_letter(self, record, message: Any, answer: dict[str, Any]) -> None:
        """The original bytes and key, with why in headers: error (the HTTP API's code), detail (JSON), status, and
        where the message came from."""
        headers = [
            ("error", answer["error"]),
            ("detail", json.dumps(answer.get("detail"))),
            ("status", str(answer.get("status", ""))),
            ("source_topic", record.topic),
            ("source_partition", str(record.partition)),
            ("source_offset", str(record.offset)),
        ]
        if isinstance(message, dict) and isinstance(message.get("request_id"), str):
            headers.append(("request_id", message["request_id"]))
        await self._send(self.s.dead_letter_topic, record.value, record.key, [(k, v.encode()) for k, v in headers])
        self.counts["dead_lettered"] += 1
        self.m_dead.inc(tags={"topic": self.s.dead_letter_topic, "error": answer["error"]})

    async def _send(self, topic: str, value: bytes | None, key: bytes | None, headers=None) -> None:
        """Until the broker acknowledges it: an answer is never dropped, and its offset waits for it."""
        backoff = 0.5
        while True:
            producer = self.producer
            try:
                if producer is None:
                    raise RuntimeError("not connected")
                await producer.send_and_wait(topic, value=value, key=key, headers=headers)
                return
            except Exception as exc:  # noqa: BLE001 - broker away or a timeout: try again; the offset is not committed
                log.warning("stream consumer: writing to %s failed (%r); retrying in %.1f s", topic, exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _revoked(self, revoked) -> None:
        """Before a partition moves: its answers in flight get half a session to finish, what is answered is
        committed, the rest is cancelled (the next owner answers it again)."""
        mine = [task for (tp, _), task in self.tasks.items() if tp in revoked]
        if mine:
            await asyncio.wait(mine, timeout=self.s.session_timeout_ms / 2000)
        await self._commit(only=revoked)
        for (tp, _), task in list(self.tasks.items()):
            if tp in revoked:
                task.cancel()
        self.inflight.forget(revoked)
        for tp in revoked:
            self.lag.pop(f"{tp.topic}/{tp.partition}", None)
            self.m_lag.set(0, tags={"topic": tp.topic, "partition": str(tp.partition)})  # its new owner reports it

    def _assigned(self, assigned) -> None:
        self.state = "consuming"
        self.counts["rebalances"] += 1
        log.info("stream consumer: assigned %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, owner: StreamConsumer) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked) -> None:
        await self.owner._revoked(revoked)

    async def on_partitions_assigned(self, assigned) -> None:
        self.owner._assigned(assigned)
