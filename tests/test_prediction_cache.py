"""The prediction cache: keys per concrete version and backend, the replica's LRU, a real Redis (started here on a
free loopback port) as the shared store, Redis down handled as misses, and the served app answering a repeated
text from the cache, logging it as cached, never across a promotion."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ray_app.ports import free_port
from ray_app.prediction_log import read_recent
from ray_app.serve.prediction_cache import LocalStore, PredictionCache, RedisStore, cache_key
from ray_app.serve.settings import CacheSettings
from tests.conftest import smoke_config
from tests.prom import need
from tests.serving import deploy_config, register_version, serve_deploy, wait_until

KEY = "cache-key-" + uuid.uuid4().hex[:6]


def _start_redis(port: int, workdir: Path) -> subprocess.Popen:
    binary = need("redis-server", "redis-server")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    wait_until(lambda: redis.Redis(port=port, socket_timeout=1).ping(), 20, f"redis-server on {port}", 0.1)
    return proc


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[dict]:
    port, workdir = free_port(), tmp_path_factory.mktemp("redis")
    server = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "proc": _start_redis(port, workdir), "dir": workdir}
    yield server
    server["proc"].terminate()
    server["proc"].wait(10)


def test_keys_name_the_concrete_version_the_backend_and_the_exact_text() -> None:
    key = cache_key("clf/3", "fp32", "BERT")
    assert key.startswith("ray_app:pred:clf/3:fp32:") and key != cache_key("clf/4", "fp32", "BERT")
    assert key != cache_key("clf/3", "onnx-int8", "BERT") and key != cache_key("clf/3", "fp32", "BERT ")


def test_the_local_lru_keeps_the_newest_rows() -> None:
    store = LocalStore(max_items=2)
    row = np.array([0.25, 0.75], dtype=np.float32)

    async def run():
        await store.put_many({"a": row, "b": row})
        await store.get_many(["a"])  # "a" used: "b" is the oldest now
        await store.put_many({"c": row})
        return await store.get_many(["a", "b", "c"])

    a, b, c = asyncio.run(run())
    assert b is None and np.array_equal(a, row) and np.array_equal(c, row)


def test_redis_round_trips_rows_exactly_with_a_ttl(redis_server) -> None:
    import redis

    settings = CacheSettings(enabled=True, backend="redis", url=redis_server["url"], ttl_s=60)
    store = RedisStore(settings)
    row = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)

    async def run():
        await store.put_many({"ray_app:pred:t/1:fp32:x": row})
        return await store.get_many(["ray_app:pred:t/1:fp32:x", "ray_app:pred:t/1:fp32:absent"])

    got, absent = asyncio.run(run())
    assert absent is None and got.tobytes() == row.tobytes()
    assert 0 < redis.Redis(port=redis_server["port"]).ttl("ray_app:pred:t/1:fp32:x") <= 60


def test_redis_down_is_a_miss_never_an_error_and_is_retried(ray_cluster, tmp_path) -> None:
    """A Redis of its own, stopped mid-test: lookups answer 'not cached' within the timeout, writes are dropped,
    and after `retry_s` with Redis back the cache works again."""
    port = free_port()
    proc = _start_redis(port, tmp_path)
    settings = CacheSettings(enabled=True, backend="redis", url=f"redis://127.0.0.1:{port}/0", retry_s=0.5)
    row = np.array([[0.5, 0.5]], dtype=np.float32)

    async def run() -> None:
        cache = PredictionCache(settings, "fp32")
        cache.put("m/1", ["t"], row)
        await asyncio.sleep(0.2)
        (hit,) = await cache.get("m/1", ["t"])
        assert hit is not None
        proc.terminate()
        proc.wait(10)
        started = time.monotonic()
        assert await cache.get("m/1", ["t", "u"]) == [None, None]  # down: misses, no exception
        assert time.monotonic() - started < 1
        cache.put("m/1", ["u"], row)  # skipped while Redis is marked down
        restarted = _start_redis(port, tmp_path)  # an empty Redis: what it held is gone
        try:
            await asyncio.sleep(0.6)
            assert await cache.get("m/1", ["t"]) == [None]
            cache.put("m/1", ["t"], row)
            await asyncio.sleep(0.2)
            (back,) = await cache.get("m/1", ["t"])
            assert back is not None and back.tobytes() == row[0].tobytes()
        finally:
            restarted.terminate()
            restarted.wait(10)

    asyncio.run(run())


def test_redis_backend_needs_a_url() -> None:
    with pytest.raises(ValueError, match=r"cache\.backend redis needs cache\.url"):
        CacheSettings(enabled=True, backend="redis")


# ---- the served app with a shared Redis cache -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_app(mlflow_server, ray_cluster, tiny_model, storage, redis_server, tmp_path_factory):
    from ray import serve

    from ray_app.runtime import setup_mlflow

    work = tmp_path_factory.mktemp("cached-serve")
    name = f"cache-{uuid.uuid4().hex[:6]}"
    cfg = smoke_config(mlflow_server, ray_cluster["address"], tiny_model, storage, f"registry.model_name={name}")
    setup_mlflow(cfg)
    v1, v2 = (register_version(cfg, tiny_model, seed, work) for seed in (1, 2))
    client = MlflowClient(mlflow_server)
    client.set_registered_model_alias(name, "champion", v1)
    port = free_port()
    cache = {"enabled": True, "backend": "redis", "url": redis_server["url"], "ttl_s": 600}
    conf = deploy_config(work / "s.yaml", port, mlflow_server, name, work / "predlog", KEY, cache=cache)
    serve_deploy(conf, ray_cluster["dashboard"])
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"X-API-Key": KEY}, timeout=60)
    wait_until(lambda: http.get("/ready").status_code == 200, 240, "/ready")
    yield {"http": http, "name": name, "v1": v1, "v2": v2, "client": client, "log": work / "predlog"}
    http.close()
    serve.shutdown()


def test_a_repeated_text_is_answered_from_the_cache_logged_as_cached_and_counted(cached_app, ray_cluster) -> None:
    http = cached_app["http"]
    body = {"items": [{"title": f"cache me {uuid.uuid4().hex}"}, {"title": "YOLO detection"}]}
    first = http.post("/predict", json=body, headers={"X-Request-Id": "first"}).json()
    second = http.post("/predict", json=body, headers={"X-Request-Id": "second"}).json()
    assert first["version"] == second["version"] == cached_app["v1"]
    assert first["predictions"] == second["predictions"]  # the same float32 rows: identical answers

    def logged():
        frame = read_recent(str(cached_app["log"]))
        mine = frame[frame["request_id"].isin(["first", "second"])]
        return (mine,) if len(mine) == 4 else None

    (rows,) = wait_until(logged, 30, "both requests in the prediction log")
    rows = rows.sort_values(["request_id", "item"])
    assert rows["cached"].tolist() == [False, False, True, True]  # first, then second
    model_id = f"{cached_app['name']}/{cached_app['v1']}"

    def hits() -> float:
        lines = [line for line in httpx.get(ray_cluster["metrics"], timeout=10).text.splitlines()
                 if line.startswith("ray_app_prediction_cache_total{") and 'result="hit"' in line
                 and f'model_id="{model_id}"' in line]  # fmt: skip
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    assert wait_until(lambda: hits() >= 2, 60, "the hits on the metrics endpoint (Ray exports every few seconds)")


def test_a_promotion_between_two_requests_of_one_text_is_answered_by_the_new_version(cached_app) -> None:
    http, client, name = cached_app["http"], cached_app["client"], cached_app["name"]
    body = {"title": f"promoted {uuid.uuid4().hex}", "description": "same text, two versions"}
    before = http.post("/predict", json=body).json()
    assert before["version"] == cached_app["v1"]
    client.set_registered_model_alias(name, "champion", cached_app["v2"])
    try:
        after = wait_until(
            lambda: (r := http.post("/predict", json=body).json())["version"] == cached_app["v2"] and r,
            15,
            "the promotion to show",
        )
        direct = http.post("/predict", json=body, headers={"serve_multiplexed_model_id": cached_app["v2"]}).json()
        assert after["predictions"] == direct["predictions"] != before["predictions"]  # v2's own answer
    finally:
        client.set_registered_model_alias(name, "champion", cached_app["v1"])
