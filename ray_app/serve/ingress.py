"""The app's one serving deployment: the HTTP routes validate requests, apply the traffic policy, resolve model ids
through the registry, predict with the replica's own model pool (pool.py, in process) and record metrics and the
prediction log. Every client mistake gets a JSON 4xx. The stream consumer (stream.py) sends each message through the
same path, over a DeploymentHandle (`predict_message`), and gets the same error codes.

No `from __future__ import annotations`: FastAPI reads the route methods' annotations at run time.
"""

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from ray import serve
from ray.serve import metrics

from ray_app.model_ids import (
    BadModelId,
    Lookups,
    ModelRef,
    RegistryBusy,
    RegistryUnavailable,
    Resolver,
    UnknownModel,
    parse_model_id,
)
from ray_app.prediction_log import text_fields
from ray_app.serve import schemas
from ray_app.serve.api import api
from ray_app.serve.edge import error_body
from ray_app.serve.loop_status import loop_status
from ray_app.serve.policy import NAMED, SHADOW, Guard, Route, choose
from ray_app.serve.pool import ModelLoadError, ModelPool, ModelRefused, Overloaded
from ray_app.serve.predlog import PredictionLog
from ray_app.serve.schemas import ApiError, Health, Item, Models, Prediction, PredictRequest, PredictResponse, Ready
from ray_app.serve.settings import ServeArgs, TrafficPolicy
from ray_app.text import join_parts

log = logging.getLogger("ray.serve")
MODEL_HEADER = "serve_multiplexed_model_id"
STREAM = "stream"  # the route of stream predictions in metrics and the prediction log
LATENCY_BUCKETS_MS = [5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000]


def probabilities(labels: list[str], row) -> dict[str, float]:
    return {label: float(p) for label, p in zip(labels, row, strict=True)}


@serve.ingress(api)
class Ingress:
    async def __init__(self, args: ServeArgs, stream: Any = None) -> None:
        """`stream`: the StreamConsumer deployment's handle when `args.stream` is set, bound here so the app deploys
        it (app.py); the consumer calls this deployment, not the other way round."""
        import mlflow
        from mlflow.tracking import MlflowClient

        from ray_app.registry_auth import use_credentials
        from ray_app.runtime import secret_from_env, serve_tracking_uri

        self.args = args  # validated once, by Serve from serve_config.yaml's args (build_app's annotation)
        use_credentials(self.args.registry_credentials)  # before any MLflow client exists
        self.pool = ModelPool(self.args)
        api.state.max_body_bytes = self.args.max_body_bytes
        api.state.body_timeout_s = self.args.body_timeout_s
        api.state.retry_after_s = self.args.retry_after_s
        api.state.pool = self.pool
        api.state.api_key = secret_from_env(self.args.api_key_env)
        api.openapi_schema = None  # built on first ask, with this deployment's limits, labels and key
        api.openapi = self._openapi
        mlflow.set_tracking_uri(serve_tracking_uri(self.args.tracking_uri))
        self.client = MlflowClient()
        self.resolver = Resolver(self.client, ttl_s=self.args.alias_ttl_s)
        self.lookups = Lookups(self.resolver)
        self.policy = TrafficPolicy()
        self.guard = Guard(self.policy.guard)
        self.log = PredictionLog(self.args.prediction_log)
        self.m_requests = metrics.Counter(
            "app_requests", "Prediction requests.", tag_keys=("model", "version", "route", "status")
        )
        self.m_latency = metrics.Histogram(
            "app_request_latency_ms",
            "End-to-end latency in the ingress.",
            boundaries=LATENCY_BUCKETS_MS,
            tag_keys=("model", "version", "route"),
        )
        self.m_canary_out = metrics.Counter("app_canary_taken_out", "Canaries removed by the guard.")
        self._shadows: set[asyncio.Task] = set()
        self._flusher = asyncio.create_task(self._flush_loop())
        await self.pool.start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A new traffic policy, live: `serve deploy` with only user_config changed calls this, nothing restarts."""
        self.policy = TrafficPolicy.model_validate(user_config.get("traffic", user_config))
        self.guard = Guard(self.policy.guard)
        log.info("traffic policy: %s", self.policy.model_dump())

    def _openapi(self) -> dict[str, Any]:
        from fastapi.openapi.utils import get_openapi

        if api.openapi_schema is None:
            base = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            api.openapi_schema = schemas.document(base, self.args, keyed=bool(api.state.api_key))
        return api.openapi_schema

    # ---- routes -------------------------------------------------------------------------------------------------

    @api.get("/health", response_model=Health, responses=schemas.responses("Health", {}, open_route=True))
    async def health(self) -> Health:
        return Health(status="alive")

    @api.get("/ready", response_model=Ready, responses=schemas.responses("Ready", schemas.READY))
    async def ready(self) -> Ready:
        try:
            ref = await self._resolve(self.args.default_model)
        except ApiError as err:  # no champion yet (nothing trained) is "not ready", not a client error
            raise ApiError(503, "not_ready", err.detail, {"Retry-After": "5"}) from None
        if not self.pool.is_loaded(ref.concrete):
            raise ApiError(503, "not_ready", f"default model {ref.concrete} is not loaded yet", {"Retry-After": "5"})
        return Ready(status="ready", default_model=self.args.default_model, version=str(ref.version))

    @api.get("/models", response_model=Models, responses=schemas.responses("Models", schemas.MODELS))
    async def models(self) -> dict[str, Any]:
        from ray_app.serve.directory import directory_for

        try:
            versions = self.client.search_model_versions(f"name='{self.args.model_name}'")
            # search results carry no aliases; the registered model has them all
            by_version: dict[str, list[str]] = {}
            for alias, version in (self.client.get_registered_model(self.args.model_name).aliases or {}).items():
                by_version.setdefault(str(version), []).append(alias)
        except Exception as exc:  # noqa: BLE001 - the registry's client raises several types
            raise ApiError(503, "registry_unavailable", str(exc), {"Retry-After": "5"}) from None
        replicas = await directory_for(serve.get_replica_context().app_name).snapshot.remote()
        return {
            "loop": await loop_status(self.args.model_name),
            "model": self.args.model_name,
            "default_model": self.args.default_model,
            "policy": self.policy.model_dump(),
            "canary_taken_out": self.guard.tripped,
            "versions": [
                {
                    "version": str(v.version),
                    "aliases": sorted(by_version.get(str(v.version), [])),
                    "run_id": v.run_id,
                    "status": v.status,
                }
                for v in sorted(versions, key=lambda v: int(v.version))
            ],
            "replicas": replicas,
        }

    @api.post("/predict", response_model=PredictResponse, responses=schemas.responses("Predict", schemas.PREDICT))
    async def predict(self, body: PredictRequest, request: Request) -> PredictResponse:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        named = request.headers.get(MODEL_HEADER) or body.model
        caller = request.headers.get(self.policy.sticky_header)
        return await self._predict(body.all_items(), request_id, named, caller)

    async def predict_message(self, message: Any) -> dict[str, Any]:
        """One message of the input topic (stream.py calls this through a DeploymentHandle), down the same path as
        POST /predict, logged and counted with route `stream`: the result message, or {"error", "detail", "status"
        [, "retry_after_s"]} with the code the HTTP API answers the same mistake or condition with."""
        try:
            msg = schemas.StreamRequest.model_validate(message)
            items = [Item(title=msg.title, description=msg.description)]
            answer = await self._predict(items, msg.request_id, msg.model, None, STREAM)
        except ValidationError as exc:
            return {**error_body("invalid_request", schemas.problems(exc.errors())), "status": 422}
        except ApiError as err:
            return schemas.stream_error(err)
        except Exception as exc:  # noqa: BLE001 - as the HTTP app's 500: logged here, the code only in the answer
            log.error("unhandled error on a stream message: %r", exc)
            return {**error_body("internal_error", type(exc).__name__), "status": 500}
        (prediction,) = answer.predictions
        return {
            "request_id": msg.request_id,
            "model": answer.model,
            "version": answer.version,
            "label": prediction.label,
            "probabilities": prediction.probabilities,
        }

    async def _predict(
        self, items: list[Item], request_id: str, named: str | None, caller: str | None, logged: str | None = None
    ) -> PredictResponse:
        """The one prediction path: limits, traffic policy, model resolution, the pool, metrics, prediction log and
        shadow. `logged`: the route metrics and the log record instead of the policy's (the stream's)."""
        started = time.perf_counter()
        served_id = uuid.uuid4().hex  # the log's key: unique even when a caller reuses its request id
        items = schemas.check_items(items, self.args)
        if named is not None:  # "model": "" is a bad id (422), not "no model"
            route = Route(named, NAMED)
        else:
            route = choose(self.policy, caller, request_id, canary_enabled=self.guard.tripped is None)
        routes = (route.route, logged or route.route)
        ref = await self._resolve(route.model_id)
        texts = [join_parts([item.title, item.description]) for item in items]
        try:
            result = await self._call_pool(ref, texts)
        except ApiError as err:
            self._record(ref, routes, err.status, started, (request_id, served_id), texts, None, err.code)
            raise
        ms = self._record(ref, routes, 200, started, (request_id, served_id), texts, result, None)
        if route.route == "canary" and (reason := self.guard.record(True, ms)):
            self.m_canary_out.inc()
            log.warning("canary %s taken out: %s", ref, reason)
        if route.shadow:
            task = asyncio.create_task(self._shadow(route.shadow, texts, (request_id, served_id)))
            self._shadows.add(task)  # keep a reference until it is done, or the loop may drop it
            task.add_done_callback(self._shadows.discard)
        return PredictResponse(
            request_id=request_id,
            model=ref.name,
            version=str(ref.version),
            route=route.route,
            predictions=[
                Prediction(label=result["labels"][int(p.argmax())], probabilities=probabilities(result["labels"], p))
                for p in result["probs"]
            ],
        )

    # ---- helpers ------------------------------------------------------------------------------------------------

    async def _resolve(self, model_id: str) -> ModelRef:
        """From the resolver's cache when it has the answer; otherwise the registry is asked in a thread of its own
        (`Lookups`: bounded, one lookup per id), so a slow or unreachable MLflow (its client retries for minutes)
        or a flood of unknown ids never stalls the replica's event loop or the known traffic."""
        try:
            return await self.lookups.resolve(parse_model_id(model_id, self.args.model_name))
        except BadModelId as exc:
            raise ApiError(422, "bad_model_id", str(exc)) from None
        except UnknownModel as exc:
            raise ApiError(404, "unknown_model", str(exc)) from None
        except RegistryBusy as exc:
            raise ApiError(503, "registry_busy", str(exc), {"Retry-After": str(self.args.retry_after_s)}) from None
        except RegistryUnavailable as exc:
            raise ApiError(503, "registry_unavailable", str(exc), {"Retry-After": "5"}) from None

    async def _call_pool(self, ref: ModelRef, texts: list[str]) -> dict[str, Any]:
        try:
            return await self.pool.predict(ref.concrete, texts)
        except Overloaded as exc:
            raise ApiError(
                503,
                "overloaded",
                f"{exc}; retry after the Retry-After seconds",
                {"Retry-After": str(self.args.retry_after_s)},
            ) from None
        except ModelRefused as exc:
            raise ApiError(403, "model_refused", str(exc)) from None
        except ModelLoadError as exc:
            self.resolver.forget(ref)  # deleted from the registry, perhaps: the next request asks it again (404)
            raise ApiError(503, "model_unavailable", str(exc), {"Retry-After": "30"}) from None
        except Exception as exc:  # a server fault still answers JSON, and counts against the version
            log.exception("prediction with %s failed", ref.concrete)
            raise ApiError(500, "prediction_failed", f"{ref.concrete} failed: {type(exc).__name__}") from None

    def _record(
        self,
        ref: ModelRef,
        routes: tuple[str, str],
        status: int,
        started: float,
        ids: tuple[str, str],
        texts: list[str],
        result: dict[str, Any] | None,
        error: str | None,
    ) -> float:
        """`routes`: (the policy's route, for the canary guard; the route metrics and the log record)."""
        ms = (time.perf_counter() - started) * 1000
        route, logged = routes
        tags = {"model": ref.name, "version": str(ref.version), "route": logged}
        self.m_requests.inc(tags={**tags, "status": str(status)})
        self.m_latency.observe(ms, tags=tags)
        if route == "canary" and status >= 500 and (reason := self.guard.record(False, ms)):
            self.m_canary_out.inc()
            log.warning("canary %s taken out: %s", ref, reason)
        self.log.add(self._log_rows(ref, logged, status, ms, ids, texts, result, error))
        return ms

    def _log_rows(self, ref, route, status, ms, ids, texts, result, error) -> list[dict[str, Any]]:
        """One row per item; `ids` is (the caller's request id, this request's unique served id)."""
        request_id, served_id = ids
        now = time.time() * 1000
        rows = []
        for i, text in enumerate(texts):
            row = {
                "request_id": request_id,
                "served_id": served_id,
                "item": i,
                "timestamp": int(now),
                "route": route,
                "model_name": ref.name,
                "model_version": str(ref.version),
                "status": status,
                "error": error,
                "latency_ms": ms,
                **text_fields(text, self.args.prediction_log.store_text),
                "label": None,
                "confidence": None,
                "probabilities": None,
                "cached": None,
            }
            if result is not None:
                p = result["probs"][i]
                row.update(
                    label=result["labels"][int(p.argmax())],
                    confidence=float(p.max()),
                    probabilities=json.dumps(probabilities(result["labels"], p)),
                    cached=bool(result["cached"][i]),
                )
            rows.append(row)
        return rows

    async def _shadow(self, model_id: str, texts: list[str], ids: tuple[str, str]) -> None:
        """The shadow model's answer goes to the log only; its failures never reach the caller."""
        started = time.perf_counter()
        try:
            ref = await self._resolve(model_id)
            result = await self._call_pool(ref, texts)
            self._record(ref, (SHADOW, SHADOW), 200, started, ids, texts, result, None)
        except ApiError as err:
            log.warning("shadow %s failed: %s", model_id, err.detail)
        except Exception as exc:  # noqa: BLE001 - the caller already has its answer; the shadow must not crash anything
            log.warning("shadow %s failed: %s", model_id, exc)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            await self.flush()

    async def flush(self, force: bool = False) -> int:
        """Write buffered log rows when due, or now when forced (on shutdown)."""
        if not (self.log.due() or (force and self.log.rows)):
            return 0
        rows = self.log.take()
        try:
            await asyncio.to_thread(self.log.write, rows)
        except Exception as exc:  # noqa: BLE001 - a failed write must not take serving down; it is logged loudly
            log.error("prediction log write of %d rows failed: %s", len(rows), exc)
        return len(rows)

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: what is buffered is written, not lost."""
        self._flusher.cancel()
        self.pool.close()
        await self.flush(force=True)
