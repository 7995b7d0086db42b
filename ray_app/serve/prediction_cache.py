"""Answers already given, so a repeated text is not predicted twice.

Keyed by the concrete version the pool runs (NAME/VERSION, never an alias), the backend it runs with and a SHA-256 of
the exact text: a promotion or rollback changes the key, so it can never serve another version's answer. Two stores:
this replica's LRU (`cachetools.LRUCache`: no hop, not shared) or Redis (shared by every replica, with a TTL). Redis
down or slow past `timeout_s` is a miss, counted, and skipped for `retry_s`: predicted as if the cache were empty,
never an error to the caller.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Protocol

import numpy as np
from ray.serve import metrics

from ray_app.serve.settings import CacheSettings

log = logging.getLogger("ray.serve")
KEY_PREFIX = "ray_app:pred:"


def cache_key(model_id: str, backend: str, text: str) -> str:
    return f"{KEY_PREFIX}{model_id}:{backend}:{hashlib.sha256(text.encode()).hexdigest()}"


class Store(Protocol):
    name: str

    async def get_many(self, keys: list[str]) -> list[np.ndarray | None]: ...

    async def put_many(self, items: dict[str, np.ndarray]) -> None: ...


class LocalStore:
    """This replica's LRU of probability rows."""

    name = "local"

    def __init__(self, max_items: int) -> None:
        from cachetools import LRUCache

        self._lru: LRUCache = LRUCache(maxsize=max_items)

    async def get_many(self, keys: list[str]) -> list[np.ndarray | None]:
        return [self._lru.get(k) for k in keys]

    async def put_many(self, items: dict[str, np.ndarray]) -> None:
        self._lru.update(items)


class RedisStore:
    """One store for every replica: float32 rows as bytes (exact round trip), MGET to read, a pipeline of SET EX to
    write."""

    name = "redis"

    def __init__(self, settings: CacheSettings) -> None:
        import redis.asyncio as aioredis

        self.ttl_s = settings.ttl_s
        self._client = aioredis.from_url(
            settings.url, socket_timeout=settings.timeout_s, socket_connect_timeout=settings.timeout_s
        )

    async def get_many(self, keys: list[str]) -> list[np.ndarray | None]:
        values = await self._client.mget(keys)
        return [None if v is None else np.frombuffer(v, dtype=np.float32) for v in values]

    async def put_many(self, items: dict[str, np.ndarray]) -> None:
        pipe = self._client.pipeline(transaction=False)
        for key, row in items.items():
            pipe.set(key, np.asarray(row, dtype=np.float32).tobytes(), ex=self.ttl_s)
        await pipe.execute()


def store_for(settings: CacheSettings) -> Store:
    return RedisStore(settings) if settings.backend == "redis" else LocalStore(settings.max_items)


class PredictionCache:
    """The pool's view: look texts up (None where not cached), keep new answers off the request path, count both."""

    def __init__(self, settings: CacheSettings, backend: str, store: Store | None = None) -> None:
        self.settings, self.backend = settings, backend
        self.store = store or store_for(settings)
        self._skip_until = 0.0
        self._writes: set[asyncio.Task] = set()
        self.m_lookups = metrics.Counter(
            "app_prediction_cache", "Prediction cache lookups, per text.", tag_keys=("model_id", "result")
        )
        self.m_errors = metrics.Counter(
            "app_prediction_cache_errors",
            "Cache store failures (texts predicted as if not cached).",
            tag_keys=("backend", "op"),
        )

    async def get(self, model_id: str, texts: list[str]) -> list[np.ndarray | None]:
        found: list[np.ndarray | None] = [None] * len(texts)
        if time.monotonic() >= self._skip_until:
            try:
                found = await self.store.get_many([cache_key(model_id, self.backend, t) for t in texts])
            except Exception as exc:  # noqa: BLE001 - any store failure is a miss, never the caller's error
                self._failed("get", exc)
        hits = sum(row is not None for row in found)
        if hits:
            self.m_lookups.inc(hits, tags={"model_id": model_id, "result": "hit"})
        if hits < len(texts):
            self.m_lookups.inc(len(texts) - hits, tags={"model_id": model_id, "result": "miss"})
        return found

    def put(self, model_id: str, texts: list[str], rows: np.ndarray) -> None:
        """Written in the background: the answer does not wait for the store."""
        if time.monotonic() < self._skip_until:
            return
        rows = np.asarray(rows, dtype=np.float32)
        items = {cache_key(model_id, self.backend, t): row.copy() for t, row in zip(texts, rows, strict=True)}
        task = asyncio.get_running_loop().create_task(self._put(items))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, items: dict[str, np.ndarray]) -> None:
        try:
            await self.store.put_many(items)
        except Exception as exc:  # noqa: BLE001
            self._failed("put", exc)

    def _failed(self, op: str, exc: Exception) -> None:
        self.m_errors.inc(tags={"backend": self.store.name, "op": op})
        if time.monotonic() >= self._skip_until:  # one line per outage, not one per request
            log.warning("prediction cache (%s) %s failed: %r; predicting without it for %gs",
                        self.store.name, op, exc, self.settings.retry_s)  # fmt: skip
        self._skip_until = time.monotonic() + self.settings.retry_s
