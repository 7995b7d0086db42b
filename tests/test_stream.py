"""Predictions for a stream: a real broker (Tansu, as `make run` starts it), `serve deploy` of serve_config.yaml with
its stream section pointed at it, the real StreamConsumer deployment answering through the Classifier, and the
answers read back from the topics, the HTTP API, the prediction log and the metrics endpoint."""

from __future__ import annotations

import json
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ray_app import broker
from ray_app.local import Services, stop_pids
from ray_app.ports import free_port
from ray_app.prediction_log import read_recent
from ray_app.serve.schemas import ApiError, decode_message
from ray_app.serve.stream import InFlight
from tests.conftest import smoke_config
from tests.serving import deploy_config, register_version, serve_deploy, wait_until

KEY = "stream-key-" + uuid.uuid4().hex[:6]
TOPICS = {"input_topic": "requests-t", "output_topic": "results-t", "dead_letter_topic": "dead-t"}
PARTITIONS = 4
STREAM_APP = "classifier"
BROKER: dict[str, int] = {}  # the kafka fixture's broker pid, for the outage drill


# ---- without a broker -----------------------------------------------------------------------------------------------


def test_commit_point_is_the_lowest_offset_still_in_flight():
    flight = InFlight()
    for offset in (5, 6, 7, 8):
        flight.add("p0", offset)
    flight.done("p0", 6)
    flight.done("p0", 7)
    assert flight.commit_points() == {"p0": 5}  # 5 is unanswered: nothing past it may be committed
    flight.done("p0", 5)
    assert flight.commit_points() == {"p0": 8}
    flight.committed["p0"] = 8
    assert flight.commit_points() == {}
    flight.done("p0", 8)
    assert flight.commit_points() == {"p0": 9}  # all answered: one past the last fetched
    flight.forget(["p0"])
    assert flight.commit_points() == {}


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [(b"{not json", 422, "invalid_request"), (b"\x80\x81 not text", 400, "bad_request"), (b"", 422, "invalid_request")],
)
def test_a_message_is_read_as_the_http_api_reads_a_body(raw, status, code):
    with pytest.raises(ApiError) as err:
        decode_message(raw)
    assert (err.value.status, err.value.code) == (status, code)
    assert decode_message(b'{"title": "x"}') == {"title": "x"}


def test_a_services_state_from_before_the_broker_still_loads():
    old = {
        "ray_address": "127.0.0.1:6380",
        "dashboard_url": "http://127.0.0.1:8265",
        "mlflow_url": "http://127.0.0.1:5000",
        "ray_temp_dir": "/tmp/x",
        "mlflow_dir": "/tmp/m",
        "mlflow_pid": 1,
        "ray_pids": [2],
        "metrics_url": "http://127.0.0.1:8080/metrics",
    }
    state = Services(**old)
    assert (state.stream_url, state.stream_pid) == ("", 0)


# ---- a real broker and the deployed app ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka():
    """Tansu on a free port (memory storage, its log in a temp dir), up once a metadata request answers."""
    port = free_port()
    pid = broker.start_broker(port, Path(tempfile.mkdtemp(prefix="broker-")))
    BROKER["pid"] = pid
    bootstrap = f"127.0.0.1:{port}"
    assert set(broker.create_topics(bootstrap, list(TOPICS.values()), PARTITIONS).values()) == {"created"}
    yield bootstrap
    stop_pids([pid])


@pytest.fixture(scope="module")
def app(mlflow_server, ray_cluster, tiny_model, storage, kafka, tmp_path_factory):
    """Two versions (v1 champion), serve_config.yaml with the stream on, and a pool that sheds load early: a queue of
    8 items against a consumer with 32 messages in flight."""
    from ray import serve

    from ray_app.runtime import setup_mlflow

    work = tmp_path_factory.mktemp("stream")
    name = f"stream-{uuid.uuid4().hex[:6]}"
    cfg = smoke_config(mlflow_server, ray_cluster["address"], tiny_model, storage, f"registry.model_name={name}")
    setup_mlflow(cfg)
    v1, v2 = (register_version(cfg, tiny_model, seed, work) for seed in (1, 2))
    MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", v1)
    port = free_port()
    stream = {
        "bootstrap_servers": kafka,
        **TOPICS,
        "group_id": f"g-{uuid.uuid4().hex[:6]}",
        "max_in_flight": 32,
        "session_timeout_ms": 6000,
        "producer_batch_bytes": 1,
        "lag_interval_s": 1,
    }
    conf = {"path": work / "s.yaml", "port": port, "tracking_uri": mlflow_server, "model_name": name}
    conf |= {"log_dir": work / "predlog", "api_key": KEY, "max_queued_items": 8}
    serve_deploy(deploy_config(**conf, stream=stream), ray_cluster["dashboard"])
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=60)
    wait_until(lambda: _ready(http) and _consuming(), 240, "/ready and a consumer with partitions")
    consumer = serve.get_deployment_handle("StreamConsumer", STREAM_APP)
    yield {"http": http, "kafka": kafka, "name": name, "v1": v1, "v2": v2, "consumer": consumer, "work": work,
           "conf": conf, "stream": stream, "dashboard": ray_cluster["dashboard"]}  # fmt: skip
    http.close()
    serve.shutdown()


def _ready(http: httpx.Client) -> bool:
    from ray import serve

    status = serve.status().applications.get(STREAM_APP)
    if status is not None and status.status == "DEPLOY_FAILED":
        pytest.fail(f"serve deploy failed: {status.message}")
    return http.get("/ready").status_code == 200


def _consuming() -> bool:
    from ray import serve

    try:
        handle = serve.get_deployment_handle("StreamConsumer", STREAM_APP)
    except KeyError:  # not deployed yet
        return False
    return bool(handle.status.remote().result()["assigned"])


def _send(app, messages: list[bytes | dict], keys: list[str] | None = None) -> None:
    keys = keys or [m["request_id"] if isinstance(m, dict) else None for m in messages]
    records = [
        (k.encode() if k else None, json.dumps(m).encode() if isinstance(m, dict) else m)
        for k, m in zip(keys, messages, strict=True)
    ]
    broker.send(app["kafka"], TOPICS["input_topic"], records)


def _results(app, ids: set[str], timeout: float = 120) -> dict[str, list[dict]]:
    """Every result for these ids (at least once: a redelivered request can be answered twice, same key)."""
    records = broker.read(app["kafka"], TOPICS["output_topic"], ids, timeout)
    out: dict[str, list[dict]] = {}
    for r in records:
        if r.key is not None and r.key.decode() in ids:
            out.setdefault(r.key.decode(), []).append(json.loads(r.value))
    return out


def _status(app) -> dict:
    return app["consumer"].status.remote().result()


@pytest.mark.slow
def test_every_message_is_answered_keyed_by_its_id_as_http_answers_it(app):
    run = uuid.uuid4().hex[:6]
    messages = [
        {
            "request_id": f"{run}-{i}",
            "title": f"project {i} about {'images and video' if i % 3 else 'language models'}",
            "description": "a stream item" if i % 2 else "",
            **({"model": app["v2"]} if i % 5 == 0 else {}),  # a named version: multiplexed as the HTTP header is
        }
        for i in range(200)
    ]
    _send(app, messages)
    results = _results(app, {m["request_id"] for m in messages})
    assert set(results) == {m["request_id"] for m in messages}, len(results)
    for answers in results.values():  # a redelivery answers again with the same key; never differently
        assert all(a == answers[0] for a in answers)
    by_id = {k: v[0] for k, v in results.items()}
    for m in messages:
        got = by_id[m["request_id"]]
        assert set(got) == {"request_id", "model", "version", "label", "probabilities"}
        assert (got["request_id"], got["model"]) == (m["request_id"], app["name"])
        assert got["version"] == (app["v2"] if "model" in m else app["v1"])
        assert got["label"] == max(got["probabilities"], key=got["probabilities"].get)

    # the HTTP API, asked the same items of the same versions (8 a request), answers the same
    for version in (app["v1"], app["v2"]):
        mine = [m for m in messages if by_id[m["request_id"]]["version"] == version]
        for start in range(0, len(mine), 8):
            chunk = mine[start : start + 8]
            items = [{"title": m["title"], "description": m["description"]} for m in chunk]
            body = wait_until(lambda b={"items": items, "model": version}: _http(app, b), 60, "HTTP")
            for m, prediction in zip(chunk, body["predictions"], strict=True):
                streamed = by_id[m["request_id"]]
                assert prediction["label"] == streamed["label"]
                labels = sorted(prediction["probabilities"])
                want = [prediction["probabilities"][k] for k in labels]
                assert np.allclose([streamed["probabilities"][k] for k in labels], want, atol=1e-4)

    # everything consumed is committed: lag (end offset minus committed, per partition) comes back to 0
    def caught_up() -> bool:
        lag = _status(app)["lag"]
        return len(lag) == PARTITIONS and set(lag.values()) == {0}

    wait_until(caught_up, 60, "lag 0 on every partition")


def _http(app, body: dict) -> dict | bool:
    r = app["http"].post("/predict", json=body)
    return r.json() if r.status_code == 200 else False  # a 503 while the stream still sheds: asked again


POISON = {
    "not-json": (b'{"request_id": "x", "title": ', 422, "invalid_request"),
    "not-text": (b"\x80\x81\x82", 400, "bad_request"),
    "no-title": ({"description": "no title here"}, 422, "invalid_request"),
    "unknown-model": ({"title": "a fine title", "model": "999"}, 404, "unknown_model"),
    "bad-model-id": ({"title": "a fine title", "model": "../../etc/passwd"}, 422, "bad_model_id"),
    "too-long": ({"title": "x" * 2001}, 413, "text_too_long"),
    "empty-text": ({"title": " \u200b ", "description": ""}, 422, "empty_text"),
}


@pytest.mark.slow
def test_poison_messages_are_dead_lettered_with_the_http_code_and_the_rest_answered(app):
    run = uuid.uuid4().hex[:6]
    keys, messages, good = [], [], []
    for i, (name, (body, _, _)) in enumerate(POISON.items()):
        key = f"{run}-{name}"
        keys.append(key)
        messages.append({"request_id": key, **body} if isinstance(body, dict) else body)
        ok = {"request_id": f"{run}-ok-{i}", "title": f"good message after {name}", "description": "fine"}
        keys.append(ok["request_id"])
        messages.append(ok)
        good.append(ok["request_id"])
    _send(app, messages, keys)
    assert set(_results(app, set(good))) == set(good)  # the consumer went on past every poison message
    poison = {f"{run}-{name}" for name in POISON}
    letters = {r.key.decode(): r for r in broker.read(app["kafka"], TOPICS["dead_letter_topic"], poison, 60) if r.key}
    assert poison <= set(letters), poison - set(letters)
    for name, (body, status, code) in POISON.items():
        record = letters[f"{run}-{name}"]
        headers = {k: v.decode() for k, v in record.headers}
        sent = messages[keys.index(f"{run}-{name}")]
        assert record.value == (sent if isinstance(sent, bytes) else json.dumps(sent).encode())  # the original bytes
        assert (headers["error"], headers["status"]) == (code, str(status)), (name, headers)
        assert json.loads(headers["detail"]), name
        assert headers["source_topic"] == TOPICS["input_topic"] and headers["source_offset"].isdigit()
        # and the HTTP API answers the same body with the same status and code
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = app["http"].post("/predict", content=content, headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]) == (status, code), (name, r.text)


@pytest.mark.slow
def test_shed_load_pauses_the_partitions_and_loses_no_message(app, ray_cluster):
    """A burst far past the pool's queue (8 items; 32 messages in flight): the pool answers 503 `overloaded`, the
    consumer pauses and resumes after Retry-After, and every message is answered, none dead-lettered."""
    before = _status(app)
    run = uuid.uuid4().hex[:6]
    messages = [
        {"request_id": f"{run}-{i}", "title": f"burst {i} " + "words " * 60, "description": "load " * 100}
        for i in range(150)
    ]
    _send(app, messages)
    results = _results(app, {m["request_id"] for m in messages}, timeout=180)
    assert set(results) == {m["request_id"] for m in messages}
    after = _status(app)
    print(f"STREAM shed: before {before} after {after}")
    assert after["pauses"] > before.get("pauses", 0), after
    assert after.get("dead_lettered", 0) == before.get("dead_lettered", 0), after

    def shows() -> bool:
        lines = httpx.get(ray_cluster["metrics"], timeout=10).text.splitlines()
        series = {line.split("{")[0] for line in lines if line.startswith("ray_app_stream_")}
        refused = [x for x in lines if x.startswith("ray_app_requests_total") and 'route="stream"' in x]
        wanted = {"ray_app_stream_consumed_total", "ray_app_stream_produced_total", "ray_app_stream_pauses_total"}
        wanted |= {"ray_app_stream_lag"} | (
            {"ray_app_stream_dead_lettered_total"} if after.get("dead_lettered") else set()
        )
        return wanted <= series and any('status="503"' in x for x in refused)

    wait_until(shows, 90, "the stream's series and its 503s on the metrics endpoint")


@pytest.mark.slow
def test_stream_predictions_are_in_the_prediction_log_with_route_stream(app):
    run = uuid.uuid4().hex[:6]
    messages = [{"request_id": f"log-{run}-{i}", "title": f"logged stream item {i}"} for i in range(5)]
    _send(app, messages)
    results = _results(app, {m["request_id"] for m in messages})
    log_dir = str(app["work"] / "predlog")

    def logged():
        frame = read_recent(log_dir)
        rows = frame[frame["request_id"].str.startswith(f"log-{run}-") & (frame["status"] == 200)]
        return rows if len(rows) >= 5 else None

    rows = wait_until(lambda: (r := logged()) is not None and [r], 60, "the stream's rows in the prediction log")[0]
    assert set(rows["route"]) == {"stream"}
    assert Counter(rows["model_version"]) == {app["v1"]: len(rows)}
    for _, row in rows.iterrows():
        assert row["label"] == results[row["request_id"]][0]["label"]
        assert row["text"].startswith("logged stream item")


@pytest.mark.slow
def test_drill_killing_the_consumer_replica_mid_stream_loses_no_message(app):
    """SIGKILL the consumer replica's process once a tenth of a 200-message stream is answered, the rest still being
    produced: Serve starts another replica, it joins the group once the dead member's session (6 s) expires, and
    every request id gets a result; duplicates (answered, not yet committed) are counted, none is lost."""
    import asyncio

    from bench.stream import drill_kill

    out = asyncio.run(drill_kill(app["kafka"], TOPICS, STREAM_APP, app["dashboard"], 200, timeout=120))
    print(f"DRILL stream-consumer-kill: {out}")
    assert out["lost"] == 0, out
    assert out["answered_at_kill"] < 200 and out["new_pids"] and out["killed_pid"] not in out["new_pids"], out
    wait_until(_consuming, 60, "the new consumer replica holding partitions")


@pytest.mark.slow
def test_drill_pausing_the_broker_mid_stream_loses_no_message(app):
    """SIGSTOP the broker for 5 s once a twentieth of a 200-message stream is answered (never a restart: Tansu keeps
    everything in memory), then SIGCONT: the consumer reconnects and goes on, and every request id gets a result."""
    import asyncio

    from bench.stream import drill_outage

    out = asyncio.run(
        drill_outage(app["kafka"], TOPICS, BROKER["pid"], 200, 5, timeout=120, status=lambda: _status(app))
    )
    print(f"DRILL stream-broker-outage: {out}")
    assert out["lost"] == 0, out
    assert out["answered_at_stop"] < 200, out


@pytest.mark.slow
def test_a_second_consumer_replica_takes_half_the_partitions(app):
    """Last: it scales the consumer the way Serve scales any deployment, `num_replicas: 2` for StreamConsumer in
    serve_config.yaml's `deployments` (only that deployment changes; `stream.replicas` would restart the app): each
    replica holds 2 of the 4 partitions, and a stream sent then is answered whole."""
    import time

    import yaml

    path = deploy_config(**app["conf"], stream=app["stream"])
    conf = yaml.safe_load(path.read_text())
    conf["applications"][0]["deployments"].append({"name": "StreamConsumer", "num_replicas": 2})
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    started = time.monotonic()
    serve_deploy(path, app["dashboard"])

    def split() -> dict[str, list[str]] | bool:
        seen = {}
        for _ in range(20):  # handle calls land on either replica
            status = _status(app)
            seen[status["replica"]] = status["assigned"]
        held = [p for parts in seen.values() for p in parts]
        spread = len(seen) == 2 and all(seen.values()) and sorted(held) == sorted(set(held))
        return seen if spread and len(held) == PARTITIONS else False

    seen = wait_until(split, 120, "two consumer replicas sharing the partitions")
    print(f"STREAM two replicas: {seen} after {time.monotonic() - started:.1f}s")
    assert sorted(len(parts) for parts in seen.values()) == [2, 2], seen
    run = uuid.uuid4().hex[:6]
    messages = [{"request_id": f"two-{run}-{i}", "title": f"two replicas {i}"} for i in range(40)]
    _send(app, messages)
    assert set(_results(app, {m["request_id"] for m in messages})) == {m["request_id"] for m in messages}
