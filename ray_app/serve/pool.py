"""The models of one replica: every registered version, loaded on demand with `@serve.multiplexed` (LRU eviction)
and predicted in batches of one model id that take whatever queued while the last forward pass ran (`DrainBatcher`;
batcher.py says why not `@serve.batch`).

The pool lives inside the app's one deployment, beside the HTTP routes (ingress.py), not in a deployment of its own:
a handle call to a second deployment cost about 3 ms of CPU and 14 ms of latency per request on 2 cores, more than
everything else Serve does (docs/serving.md has the profile). It sheds load itself, at once and in JSON, when more
items wait than `max_queued_items` or than it clears in `max_queue_wait_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics

from ray_app.model_ids import Resolver, parse_model_id
from ray_app.serve.batcher import DrainBatcher
from ray_app.serve.prediction_cache import PredictionCache
from ray_app.serve.settings import ServeArgs

log = logging.getLogger("ray.serve")
LOAD_MS_BUCKETS = [50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 24, 32, 48, 64, 128]


class Overloaded(RuntimeError):
    """More items wait for a forward pass in this replica than it may queue: refused now, not queued."""


class ModelLoadError(RuntimeError):
    """A version could not be loaded on this replica; the replica keeps serving the others."""

    def __init__(self, model_id: str, reason: str) -> None:
        super().__init__(model_id, reason)
        self.model_id, self.reason = model_id, reason

    def __str__(self) -> str:
        return f"model {self.model_id} could not be loaded: {self.reason}"


class ModelRefused(ModelLoadError):
    """The registry has the version, but it is not the pipeline's work (require_lineage): not served."""

    def __str__(self) -> str:
        return f"model {self.model_id} is not served: {self.reason}"


@dataclass
class Loaded:
    """A version in this replica's cache. The multiplexer calls `__del__` when it evicts it (Serve's documented
    hook), which is how the pool learns of evictions."""

    model_id: str
    classifier: Any
    load_ms: float
    loaded_at: float = field(default_factory=time.time)
    on_unload: Any = None
    device: str = "cpu"  # where its forward pass runs (cuda on a replica Ray gave a GPU)

    def __del__(self) -> None:
        if self.on_unload is not None:
            self.on_unload(self.model_id)
            self.on_unload = None

    def info(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "load_ms": round(self.load_ms, 1),
            "loaded_at": self.loaded_at,
            "device": self.device,
        }


def _items(payloads: list[tuple[list[str], Any]]) -> int:
    """@serve.batch's size in items (each call's payload is (texts, loaded)), so a 32-item request fills one."""
    return sum(len(texts) for texts, _ in payloads)


class ModelPool:
    """Built by the replica's `__init__` (an event loop is running); `start()` loads the default model."""

    def __init__(self, args: ServeArgs) -> None:
        import mlflow
        import ray
        import torch
        from mlflow.tracking import MlflowClient

        from ray_app.runtime import quiet_progress_bars, serve_tracking_uri

        quiet_progress_bars()

        self.args = args
        torch.set_num_threads(args.torch_threads)
        # A GPU Ray assigned to this replica (ray_actor_options num_gpus; Ray sets CUDA_VISIBLE_DEVICES to it): every
        # version loads onto it, and the predict path moves each batch to where the model is.
        gpus = ray.get_gpu_ids()
        self.device = torch.device("cuda" if gpus and torch.cuda.is_available() else "cpu")
        if gpus and self.device.type == "cpu":
            log.warning("Ray assigned GPU %s, but torch sees no CUDA device: serving on CPU", gpus)
        mlflow.set_tracking_uri(serve_tracking_uri(args.tracking_uri))
        self.resolver = Resolver(MlflowClient(), ttl_s=args.alias_ttl_s)
        self.loaded: dict[str, Loaded] = {}
        self._refused: dict[str, tuple[str, float]] = {}
        self.replica = str(serve.get_replica_context().replica_id.unique_id)

        async def load(model_id: str) -> Loaded:  # a plain function: the multiplexer keeps its cache on it
            return await self._load(model_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=args.max_models_per_replica)(load)
        # One thread for forward passes: torch's own threads do the parallel work, and two passes at once would
        # only share the same cores. A batch size of 1 is one request per pass (a larger request still runs, alone).
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        batch = args.batch
        self.batcher = DrainBatcher(self._forward, max_items=batch.max_batch_size, wait_s=batch.batch_wait_timeout_s)
        self._serve_batch.set_max_batch_size(batch.max_batch_size)
        self._serve_batch.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
        self.m_batch = metrics.Histogram(
            "app_batch_items", "Items per model forward pass.", boundaries=BATCH_BUCKETS, tag_keys=("model_id",)
        )
        self.m_loads = metrics.Counter("app_model_loads", "Model version loads.", tag_keys=("model_id", "outcome"))
        self.m_load_ms = metrics.Histogram(
            "app_model_load_ms", "Time to load and warm up a version.", boundaries=LOAD_MS_BUCKETS
        )
        self.m_backend = metrics.Counter(
            "app_backend", "Backend chosen per version load.", tag_keys=("model_id", "backend", "outcome")
        )
        self.m_cache = metrics.Counter("app_model_cache", "Model cache lookups.", tag_keys=("model_id", "result"))
        self.cache = PredictionCache(args.cache, args.backend) if args.cache.enabled else None
        self.directory = None
        self._reporter: asyncio.Task | None = None
        self._items_per_s = 0.0  # of recent forward passes (a moving average): what a queued item waits for

    async def start(self) -> None:
        self._reporter = asyncio.create_task(self._report_loop())
        await self._preload_default()

    async def _preload_default(self) -> None:
        """Load the default model (the champion) now, so the first request after a deploy is not a cold one."""
        from ray_app.model_ids import RegistryUnavailable, UnknownModel

        try:
            ref = await asyncio.to_thread(
                self.resolver.resolve, parse_model_id(self.args.default_model, self.args.model_name)
            )
            await self.get_model(ref.concrete)
        except (UnknownModel, RegistryUnavailable, ModelLoadError) as exc:
            log.warning("default model %s not loaded at start: %s", self.args.default_model, exc)

    async def _load(self, model_id: str) -> Loaded:
        from ray_app.registry import load_classifier

        started = time.perf_counter()
        if self.args.require_lineage:
            await self._check_lineage(model_id)
        try:
            classifier = await asyncio.to_thread(load_classifier, f"models:/{model_id}")
            classifier.model.to(self.device)  # before any backend is made from it (cuda-fp16 needs it there)
            if self.args.backend != "fp32":
                classifier = await asyncio.to_thread(self._backend_if_accepted, model_id, classifier)
            await asyncio.to_thread(classifier.predict_proba, ["warm up", "a second warm-up text"])
        except Exception as exc:  # any failure to load is this version's, not the replica's
            self.m_loads.inc(tags={"model_id": model_id, "outcome": "failed"})
            log.exception("loading %s failed", model_id)  # the traceback stays in the replica's log
            raise ModelLoadError(model_id, f"{type(exc).__name__} (the replica's log has the details)") from None
        if set(classifier.labels) != set(self.args.labels):  # its answers would break the published schema
            self.m_loads.inc(tags={"model_id": model_id, "outcome": "failed"})
            raise ModelLoadError(model_id, f"it predicts {classifier.labels}, not the API's labels {self.args.labels}")
        load_ms = (time.perf_counter() - started) * 1000
        self.m_loads.inc(tags={"model_id": model_id, "outcome": "ok"})
        self.m_load_ms.observe(load_ms)
        loaded = Loaded(model_id, classifier, load_ms, on_unload=self._forget, device=str(classifier.device()))
        self.loaded[model_id] = loaded
        log.info("loaded %s in %.0f ms", model_id, load_ms)
        self._report()
        return loaded

    async def _check_lineage(self, model_id: str) -> None:
        from mlflow.tracking import MlflowClient

        from ray_app.registry_auth import lineage_problem

        refused = self._refused.get(model_id)
        if refused and refused[1] > time.monotonic():  # asked again after alias_ttl_s, not on every request
            raise ModelRefused(model_id, refused[0])
        name, version = model_id.split("/")
        try:
            problem = await asyncio.to_thread(lineage_problem, MlflowClient(), name, version)
        except Exception as exc:  # noqa: BLE001 - the registry could not say: not loaded now, asked again next time
            log.warning("lineage of %s could not be read: %r", model_id, exc)
            raise ModelLoadError(model_id, f"its lineage could not be read ({type(exc).__name__})") from None
        if problem:
            self.m_loads.inc(tags={"model_id": model_id, "outcome": "refused"})
            log.warning("%s refused: %s", model_id, problem)
            self._refused[model_id] = (problem, time.monotonic() + self.args.alias_ttl_s)
            raise ModelRefused(model_id, problem)

    def _backend_if_accepted(self, model_id: str, classifier):
        """The configured backend when the version's verdict accepts it (made and stored on the first ask); fp32
        otherwise, with a log line and a metric, so nobody is served a silently worse model."""
        from mlflow.tracking import MlflowClient

        from ray_app.backends import for_version

        name, version = model_id.split("/")
        backend = self.args.backend
        try:
            chosen = for_version(
                MlflowClient(), name, version, classifier, backend, self.args.text_columns,
                self.args.backend_max_f1_drop, self.args.torch_threads,
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - no verdict means fp32, never an unchecked backend
            log.warning("%s refused for %s: no verdict could be made (%s); serving fp32", backend, model_id, exc)
            self.m_backend.inc(tags={"model_id": model_id, "backend": backend, "outcome": "no_verdict"})
            return classifier
        outcome = "used" if chosen.backend == backend else "refused"
        self.m_backend.inc(tags={"model_id": model_id, "backend": backend, "outcome": outcome})
        v = chosen.verdict
        log.warning(
            "%s %s for %s: weighted F1 %.4f vs fp32 %.4f on %d test rows (max drop %g; verdict %s)",
            backend, outcome, model_id, v.f1, v.fp32_f1, v.rows, v.max_f1_drop,
            "made now and stored" if chosen.computed else "read from the version",
        )  # fmt: skip
        return chosen.classifier

    def _forget(self, model_id: str) -> None:
        self.loaded.pop(model_id, None)
        log.info("evicted %s", model_id)
        self._report()

    def overloaded(self, items: int = 0) -> str | None:
        """Why a request of `items` more would wait too long, or None. Two bounds: the items already waiting
        (`max_queued_items`, memory) and the seconds they take at the rate recent passes ran (`max_queue_wait_s`,
        latency, so the bound follows the backend: onnx-int8 clears 5x the items fp32 does in the same second)."""
        queued = self.batcher.queued()
        if queued + items > self.args.max_queued_items:
            return f"{queued} items wait for a forward pass in this replica (at most {self.args.max_queued_items})"
        ahead = queued + self.batcher.running  # the pass under way is ahead of a newcomer too
        if self._items_per_s and queued and (wait := (ahead + items) / self._items_per_s) > self.args.max_queue_wait_s:
            return f"{queued} items wait, about {wait:.1f} s of work (at most {self.args.max_queue_wait_s:g} s)"
        return None

    async def predict(self, model_id: str, texts: list[str]) -> dict[str, Any]:
        """Probabilities for `texts` from version `model_id` (NAME/VERSION), from the prediction cache where it has
        them. Refused at once with `Overloaded` when the texts left to predict would not fit the queue, before
        anything is loaded or computed; `cached` says which came from the cache."""
        cached = await self.cache.get(model_id, texts) if self.cache else [None] * len(texts)
        todo = [t for t, row in zip(texts, cached, strict=True) if row is None]
        if todo and (reason := self.overloaded(len(todo))):
            raise Overloaded(reason)
        self.m_cache.inc(tags={"model_id": model_id, "result": "hit" if model_id in self.loaded else "miss"})
        loaded: Loaded = await self.get_model(model_id)  # a cold load here stalls only this version's callers
        probs, batch_items = (None, 0) if not todo else await self._predict(model_id, todo, loaded)
        if self.cache and todo:
            self.cache.put(model_id, todo, probs)
        if len(todo) < len(texts):  # the cached rows and the new ones, in the request's order
            new = iter(probs if probs is not None else ())
            probs = np.stack([row if row is not None else next(new) for row in cached])
        return {
            "model_id": model_id,
            "labels": loaded.classifier.labels,
            "probs": probs,
            "batch_items": batch_items,
            "cached": [row is not None for row in cached],
        }

    async def _predict(self, model_id: str, texts: list[str], loaded: Loaded) -> tuple[Any, int]:
        if self.args.batch.mode == "serve_batch":
            return await self._serve_batch((texts, loaded))
        return await self.batcher.submit(model_id, (texts, loaded), len(texts))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02, batch_size_fn=_items)
    async def _serve_batch(self, payloads: list[tuple[list[str], Loaded]]) -> list[tuple[Any, int]]:
        """Ray's own batching, for comparison only (batch.mode: serve_batch). Called in process, its batches can mix
        versions (Serve keeps them apart only by a request's multiplexed id), so each version runs on its own."""
        out: list[tuple[Any, int] | None] = [None] * len(payloads)
        for model_id in dict.fromkeys(loaded.model_id for _, loaded in payloads):
            mine = [i for i, (_, loaded) in enumerate(payloads) if loaded.model_id == model_id]
            for i, result in zip(mine, await self._forward(model_id, [payloads[i] for i in mine]), strict=True):
                out[i] = result
        return out

    async def _forward(self, model_id: str, payloads: list[tuple[list[str], Loaded]]) -> list[tuple[Any, int]]:
        """One forward pass for every item of these requests, all for `model_id` (the batcher keeps them apart)."""
        classifier = payloads[0][1].classifier
        texts = [t for request_texts, _ in payloads for t in request_texts]
        self.m_batch.observe(len(texts), tags={"model_id": model_id})
        loop = asyncio.get_running_loop()
        chunk = min(len(texts), self.args.batch.chunk_items)
        started = time.perf_counter()
        probs = await loop.run_in_executor(self._forward_thread, classifier.predict_proba, texts, chunk)
        rate = len(texts) / max(time.perf_counter() - started, 1e-6)
        self._items_per_s = rate if not self._items_per_s else 0.8 * self._items_per_s + 0.2 * rate
        out, start = [], 0
        for request_texts, _ in payloads:
            out.append((probs[start : start + len(request_texts)], len(texts)))
            start += len(request_texts)
        return out

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self.loaded

    def _report(self) -> None:
        """Tell the app's directory what this replica holds (fire and forget: never on the request's path)."""
        try:
            if self.directory is None:
                from ray_app.serve.directory import directory_for

                self.directory = directory_for(serve.get_replica_context().app_name)
            self.directory.report.remote(self.replica, [m.info() for m in self.loaded.values()])
        except Exception as exc:  # noqa: BLE001 - reporting is best effort; serving goes on
            log.warning("could not report loaded models: %s", exc)

    async def _report_loop(self) -> None:
        while True:
            await asyncio.sleep(10)
            self._report()

    def close(self) -> None:
        """The replica stops: the directory forgets it, and the forward thread ends."""
        if self._reporter is not None:
            self._reporter.cancel()
        if self.directory is not None:
            self.directory.forget.remote(self.replica)
        self._forward_thread.shutdown(wait=False)
