"""The stream consumer against HTTP: messages/s and p50/p99 from produce to result (a closed loop of `--concurrency`
producers, each sending its next message once the last one's result is on the output topic) against the same items
as single-item HTTP requests at the same concurrency, in one run; and with `--drills`, the two failure drills at full
size (the consumer's replica SIGKILLed mid-stream; the broker paused with SIGSTOP for `--outage-s` then SIGCONT).

    .venv/bin/python bench/stream.py --tracking-uri http://127.0.0.1:5000 --model projects-classifier@champion
    .venv/bin/python bench/stream.py --requests 100 --repeats 1 --drills --drill-messages 200 --outage-s 5

Needs a registered model (what `make run` leaves behind); starts its own Tansu broker and Ray head on free ports.
The drill functions are what tests/test_stream.py runs at small size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, median, report, serving_args

os.environ.setdefault("RAY_AUTH_MODE", "token")
TOPICS = {"input_topic": "bench-requests", "output_topic": "bench-results", "dead_letter_topic": "bench-dead"}
CONSUMER = "StreamConsumer"


class Results:
    """The output topic, read from its end on while this is open: per key of `prefix`, every result's arrival
    (monotonic) and the producer's own timestamp of it (wall clock: the consumer runs on this host)."""

    def __init__(self, bootstrap: str, topic: str, prefix: str) -> None:
        self.bootstrap, self.topic, self.prefix = bootstrap, topic, prefix
        self.seen: dict[str, list[tuple[float, float]]] = {}
        self.waiters: dict[str, asyncio.Future] = {}

    async def __aenter__(self) -> Results:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
        )
        await self.consumer.start()
        parts = [TopicPartition(self.topic, p) for p in sorted(self.consumer.partitions_for_topic(self.topic) or ())]
        self.consumer.assign(parts)
        await self.consumer.seek_to_end(*parts)
        for tp in parts:
            await self.consumer.position(tp)  # resolved now: nothing sent from here on is skipped
        self.task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await self.consumer.stop()

    async def _loop(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for records in batch.values():
                for r in records:
                    key = r.key.decode() if r.key is not None else ""
                    if key.startswith(self.prefix):
                        self.seen.setdefault(key, []).append((now, r.timestamp / 1000))
                        if (waiter := self.waiters.pop(key, None)) is not None and not waiter.done():
                            waiter.set_result(now)

    async def wait(self, key: str, timeout: float) -> float:
        if key in self.seen:
            return self.seen[key][0][0]
        waiter = self.waiters.setdefault(key, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(waiter, timeout)

    async def all_of(self, keys: list[str], timeout: float) -> set[str]:
        """The keys still without a result once all have one or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while (missing := set(keys) - set(self.seen)) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        return missing

    def counts(self, keys: list[str]) -> dict[str, int]:
        results = sum(len(self.seen.get(k, ())) for k in keys)
        answered = sum(k in self.seen for k in keys)
        return {
            "messages": len(keys),
            "results": results,
            "duplicates": results - answered,
            "lost": len(keys) - answered,
        }


def _producer(bootstrap: str):
    from aiokafka import AIOKafkaProducer

    # one record per batch, as everywhere here (Tansu's end offsets); a long timeout so an outage only delays a send
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_batch_size=1, request_timeout_ms=120_000
    )


def _message(request_id: str, item: dict[str, str] | None = None) -> bytes:
    return json.dumps({"request_id": request_id, **(item or {"title": f"stream drill {request_id}"})}).encode()


async def _produce(producer, topic: str, ids: list[str], rate: float) -> None:
    """`ids` at about `rate` messages/s (10 at a time), each acknowledged by the broker before this returns."""
    sent = []
    for i, rid in enumerate(ids):
        sent.append(await producer.send(topic, value=_message(rid), key=rid.encode()))
        if i % 10 == 9:
            await asyncio.sleep(10 / rate)
    await asyncio.gather(*sent)


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f} s")
        await asyncio.sleep(0.05)


def consumer_pids(app_name: str, dashboard: str) -> list[int]:
    from soak import replica_pids

    return [pid for name, pid in replica_pids(app_name, dashboard).items() if name.startswith(f"{CONSUMER}:")]


async def drill_kill(bootstrap: str, topics: dict[str, str], app_name: str, dashboard: str, messages: int,
                     rate: float = 100, timeout: float = 300) -> dict[str, Any]:  # fmt: skip
    """SIGKILL the (one) consumer replica's process once a tenth of a stream of `messages` is answered, the rest still
    being produced: Serve starts another, which rejoins the group and answers what was not committed. Recovery: from
    the kill to the first result the new replica wrote (by the result's own timestamp)."""
    pids = await asyncio.to_thread(consumer_pids, app_name, dashboard)
    if len(pids) != 1:
        raise RuntimeError(f"expected one {CONSUMER} replica, found pids {pids}")
    tag = f"kill-{uuid.uuid4().hex[:6]}-"
    ids = [f"{tag}{i}" for i in range(messages)]
    marks: dict[str, float] = {}
    async with Results(bootstrap, topics["output_topic"], tag) as results:
        producer = _producer(bootstrap)
        await producer.start()
        try:

            async def kill() -> None:
                await _until(lambda: len(results.seen) >= max(messages // 10, 1), timeout, "a tenth answered")
                marks["answered_at_kill"] = len(results.seen)
                marks["wall"], marks["mono"] = time.time(), time.monotonic()
                os.kill(pids[0], signal.SIGKILL)

            await asyncio.gather(_produce(producer, topics["input_topic"], ids, rate), kill())
            missing = await results.all_of(ids, timeout)
        finally:
            await producer.stop()
    after = [ts for arrivals in results.seen.values() for _, ts in arrivals if ts > marks["wall"]]
    last = max(arrival for arrivals in results.seen.values() for arrival, _ in arrivals)
    new = await asyncio.to_thread(consumer_pids, app_name, dashboard)
    return {
        "drill": "consumer-kill",
        **results.counts(ids),
        "answered_at_kill": int(marks["answered_at_kill"]),
        "recovery_s": round(min(after) - marks["wall"], 2) if after else None,
        "all_answered_s": round(last - marks["mono"], 2) if not missing else None,
        "killed_pid": pids[0],
        "new_pids": new,
        "missing_sample": sorted(missing)[:5],
    }


async def drill_outage(bootstrap: str, topics: dict[str, str], broker_pid: int, messages: int, outage_s: float,
                       rate: float = 100, timeout: float = 300, status=None) -> dict[str, Any]:  # fmt: skip
    """Pause the broker (SIGSTOP) once a twentieth of a stream of `messages` is answered, the rest held by the broker
    or still being produced, for `outage_s`, then SIGCONT: the consumer's requests wait on the open connections (or
    time out and are retried; a closed connection would send it through its reconnect loop) and it answers
    everything. Recovery: from SIGCONT to the first result written after it (by its own timestamp).
    `status`: the consumer's status() (a handle call), to report the rebalances and retries the outage caused."""
    before = await asyncio.to_thread(status) if status else {}
    tag = f"outage-{uuid.uuid4().hex[:6]}-"
    ids = [f"{tag}{i}" for i in range(messages)]
    marks: dict[str, float] = {}
    async with Results(bootstrap, topics["output_topic"], tag) as results:
        producer = _producer(bootstrap)
        await producer.start()
        try:

            async def outage() -> None:
                await _until(lambda: len(results.seen) >= max(messages // 20, 1), timeout, "a twentieth answered")
                marks["answered_at_stop"] = len(results.seen)
                os.kill(broker_pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(outage_s)
                finally:
                    os.kill(broker_pid, signal.SIGCONT)
                marks["wall"], marks["mono"] = time.time(), time.monotonic()

            await asyncio.gather(_produce(producer, topics["input_topic"], ids, rate), outage())
            missing = await results.all_of(ids, timeout)
        finally:
            await producer.stop()
    after = [ts for arrivals in results.seen.values() for _, ts in arrivals if ts > marks["wall"]]
    last = max(arrival for arrivals in results.seen.values() for arrival, _ in arrivals)
    after_status = await asyncio.to_thread(status) if status else {}
    return {
        "drill": "broker-outage",
        **results.counts(ids),
        "outage_s": outage_s,
        "answered_at_stop": int(marks["answered_at_stop"]),
        "recovery_s": round(min(after) - marks["wall"], 2) if after else None,
        "all_answered_s": round(last - marks["mono"], 2) if not missing else None,
        **{f"consumer_{k}": after_status.get(k, 0) - before.get(k, 0) for k in ("rebalances", "retries") if status},
        "missing_sample": sorted(missing)[:5],
    }


# ---- the benchmark ------------------------------------------------------------------------------------------------


def items(n: int) -> list[dict[str, str]]:
    """`n` rows of the data set, in a fixed shuffled order (repeated when n exceeds it)."""
    frame = pd.read_csv(ROOT / "data" / "projects" / "dataset.csv", keep_default_na=False)
    rows = frame[["title", "description"]].sample(frac=1, random_state=0).to_dict("records")
    return [rows[i % len(rows)] for i in range(n)]


async def stream_loop(bootstrap: str, batch: list[dict[str, str]], conc: int, tag: str, timeout: float = 120):
    """`conc` producers, each sending its next message once the last one's result is read back; ms per message."""
    lat: list[float] = []
    queue = list(enumerate(batch))
    async with Results(bootstrap, TOPICS["output_topic"], tag) as results:
        producer = _producer(bootstrap)
        await producer.start()
        try:

            async def client() -> None:
                while queue:
                    i, item = queue.pop(0)
                    rid = f"{tag}{i}"
                    t0 = time.monotonic()
                    await producer.send(TOPICS["input_topic"], value=_message(rid, item), key=rid.encode())
                    lat.append((await results.wait(rid, timeout) - t0) * 1000)

            start = time.monotonic()
            await asyncio.gather(*[client() for _ in range(conc)])
            wall = time.monotonic() - start
        finally:
            await producer.stop()
    return lat, wall, results.counts([f"{tag}{i}" for i in range(len(batch))])["duplicates"]


def row(lat: list[float], ok: int, wall: float) -> dict[str, float]:
    return {"per_s": ok / wall, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from cache import closed_loop
    from ray import serve
    from serve import wait_ready

    from ray_app import broker
    from ray_app.local import start_ray_head, stop_pids, stop_ray_head
    from ray_app.ports import free_port
    from ray_app.serve.app import build_app

    temp = Path(tempfile.mkdtemp(prefix="rs-"))
    bootstrap = f"127.0.0.1:{free_port()}"
    broker_pid = broker.start_broker(int(bootstrap.rsplit(":", 1)[1]), temp / "broker")
    address, dashboard, pids = start_ray_head(temp / "ray", free_port(), free_port(), num_cpus=2)
    out: dict[str, Any] = {"http": [], "stream": [], "drills": []}
    try:
        broker.create_topics(bootstrap, list(TOPICS.values()), broker.PARTITIONS)
        ray.init(address=address, logging_level="WARNING")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        stream = {"bootstrap_servers": bootstrap, **TOPICS, "group_id": f"bench-{uuid.uuid4().hex[:6]}"}
        stream |= {"max_in_flight": max(32, args.concurrency), "session_timeout_ms": args.session_timeout_ms}
        stream |= {"producer_batch_bytes": 1}
        sargs = serving_args(args.tracking_uri, args.model, stream=stream)
        serve.run(build_app(sargs), name="bench", route_prefix="/", logging_config={"enable_access_log": False})
        wait_ready(f"http://127.0.0.1:{port}/ready")
        handle = serve.get_deployment_handle(CONSUMER, "bench")
        deadline = time.monotonic() + 120
        while not handle.status.remote().result()["assigned"]:
            if time.monotonic() > deadline:
                raise SystemExit("the stream consumer holds no partition after 120 s")
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/predict"
        asyncio.run(closed_loop(url, [{"title": f"warm-up {i}"} for i in range(8)], 2, "warm"))
        asyncio.run(stream_loop(bootstrap, [{"title": f"warm-up {i}"} for i in range(8)], 2, "warm-"))
        for repeat in range(args.repeats):
            batch = items(args.requests)
            lat, codes, wall = asyncio.run(closed_loop(url, batch, args.concurrency, f"h{repeat}"))
            ok = [ms for ms, c in zip(lat, codes, strict=True) if c == 200]
            out["http"].append({**row(ok, len(ok), wall), "errors": len(codes) - len(ok)})
            lat, wall, dups = asyncio.run(stream_loop(bootstrap, batch, args.concurrency, f"s{repeat}-"))
            out["stream"].append({**row(lat, len(lat), wall), "errors": 0, "duplicates": dups})
            h, s = out["http"][-1], out["stream"][-1]
            print(f"  repeat {repeat}: http {h['per_s']:.1f}/s p50 {h['p50_ms']:.1f} p99 {h['p99_ms']:.1f} ms | "
                  f"stream {s['per_s']:.1f}/s p50 {s['p50_ms']:.1f} p99 {s['p99_ms']:.1f} ms", flush=True)  # fmt: skip
        if args.drills:
            kill = asyncio.run(drill_kill(bootstrap, TOPICS, "bench", dashboard, args.drill_messages))
            print(f"DRILL consumer-kill: {kill}", flush=True)
            status = lambda: handle.status.remote().result()  # noqa: E731
            outage = asyncio.run(
                drill_outage(bootstrap, TOPICS, broker_pid, args.drill_messages, args.outage_s, status=status)
            )
            print(f"DRILL broker-outage: {outage}", flush=True)
            out["drills"] = [kill, outage]
    finally:
        serve.shutdown()
        ray.shutdown()
        stop_ray_head(temp / "ray", pids)
        stop_pids([broker_pid])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default="http://127.0.0.1:5000")
    p.add_argument("--model", default="projects-classifier@champion", help="NAME@ALIAS or NAME/VERSION")
    p.add_argument("--requests", type=int, default=600, help="Single-item requests, and messages, per run")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--session-timeout-ms", type=int, default=6000, help="The consumer group's session timeout")
    p.add_argument("--drills", action="store_true", help="Then the two drills (consumer kill, broker outage)")
    p.add_argument("--drill-messages", type=int, default=1000)
    p.add_argument("--outage-s", type=float, default=20)
    args = p.parse_args()
    args.config, args.overrides = None, []  # what report() records beside the table
    out = run(args)
    labels = {"per_s": "items/s", "p50_ms": "p50 ms, send to result", "p99_ms": "p99 ms, send to result"}
    size = f"({args.requests} items, concurrency {args.concurrency})"
    rows = [
        {"metric": f"{label} {size}", **{side: median([r[key] for r in out[side]]) for side in ("http", "stream")}}
        for key, label in labels.items()
    ]
    errors = {"http_errors": sum(r["errors"] for r in out["http"])}
    errors["stream_duplicates"] = sum(r["duplicates"] for r in out["stream"])
    print(f"errors and duplicates over all repeats: {errors}")
    report("stream", "http", "stream", rows, args, {"runs": out, **errors, "args": vars(args)})
    for drill in out["drills"]:
        print(f"| {drill['drill']} | " + " | ".join(f"{k}={v}" for k, v in drill.items() if k != "drill") + " |")


if __name__ == "__main__":
    main()
