"""The app's one deployment: the HTTP routes validate requests, apply the traffic policy, resolve model ids
through the registry, predict with the replica's own model pool (pool.py, in process) and record metrics and the
prediction log. Every client mistake gets a JSON 4xx.

No `from __future__ import annotations`: FastAPI reads the route methods' annotations at run time.
"""

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_swagger import patch_fastapi
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from ray_app.serve.edge import EdgeGuard, error_body
from ray_app.serve.policy import NAMED, SHADOW, Guard, Route, choose
from ray_app.serve.pool import ModelLoadError, ModelPool, ModelRefused, Overloaded
from ray_app.serve.predlog import PredictionLog
from ray_app.serve.schemas import ApiError, Health, Models, Prediction, PredictRequest, PredictResponse, Ready
from ray_app.serve.settings import ServeArgs, TrafficPolicy
from ray_app.text import join_parts

log = logging.getLogger("ray.serve")
MODEL_HEADER = "serve_multiplexed_model_id"
LATENCY_BUCKETS_MS = [5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000]


def probabilities(labels: list[str], row) -> dict[str, float]:
    return {label: float(p) for label, p in zip(labels, row, strict=True)}


api = FastAPI(
    title="ray_app classifier",
    description="Tags ML projects (NLP, computer vision, MLOps, other) with any registered model version.",
    docs_url=None,  # FastAPI's /docs loads Swagger UI from a CDN: blank on a machine without internet
    redoc_url=None,
    swagger_ui_oauth2_redirect_url=None,
)
# /docs with Swagger UI 5 from the installed fastapi-swagger package, "Try it out" on; its pages are open (edge.py).
patch_fastapi(api, docs_url="/docs", redirect_from_root_to_docs=False, title="ray_app classifier: API")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(error_body(exc.code, exc.detail), status_code=exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse(error_body("invalid_request", problems), status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (an unknown path, a wrong method) in the same JSON shape as the app's."""
    named = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}
    code = named.get(exc.status_code, f"http_{exc.status_code}")
    return JSONResponse(error_body(code, exc.detail), status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A fault no route anticipated still answers JSON (Starlette's default is a plain-text 500); it is logged."""
    log.error("unhandled error on %s %s: %r", request.method, request.url.path, exc)
    return JSONResponse(error_body("internal_error", type(exc).__name__), status_code=500)


def _edge_limits(scope) -> tuple[int, float, str | None]:
    """From the serving app's own state (`scope["app"]`): the replica runs a copy of `api` that Serve unpickled,
    and its constructor sets the limits there."""
    state = scope["app"].state
    return (
        getattr(state, "max_body_bytes", 1_000_000),
        getattr(state, "body_timeout_s", 10.0),
        getattr(state, "api_key", None),
    )


def _shed(scope) -> tuple[str, int] | None:
    """A prediction that would only wait too long is refused before its body is read, so refusals stay fast when
    the replica is busiest; the pool checks again, with the request's item count, before it queues it."""
    state = scope["app"].state
    pool = getattr(state, "pool", None)
    if pool is None or scope.get("method") != "POST" or not scope.get("path", "").endswith("/predict"):
        return None
    reason = pool.overloaded()
    return (f"{reason}; retry after the Retry-After seconds", state.retry_after_s) if reason else None


api.add_middleware(EdgeGuard, limits=_edge_limits, shed=_shed)


@serve.ingress(api)
class Ingress:
    async def __init__(self, args: ServeArgs) -> None:
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
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        served_id = uuid.uuid4().hex  # the log's key: unique even when a caller reuses its request id
        items = schemas.check_items(body.all_items(), self.args)
        named = request.headers.get(MODEL_HEADER) or body.model
        if named is not None:  # "model": "" is a bad id (422), not "no model"
            route = Route(named, NAMED)
        else:
            caller = request.headers.get(self.policy.sticky_header)
            route = choose(self.policy, caller, request_id, canary_enabled=self.guard.tripped is None)
        ref = await self._resolve(route.model_id)
        texts = [join_parts([item.title, item.description]) for item in items]
        try:
            result = await self._call_pool(ref, texts)
        except ApiError as err:
            self._record(ref, route.route, err.status, started, (request_id, served_id), texts, None, err.code)
            raise
        ms = self._record(ref, route.route, 200, started, (request_id, served_id), texts, result, None)
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
        route: str,
        status: int,
        started: float,
        ids: tuple[str, str],
        texts: list[str],
        result: dict[str, Any] | None,
        error: str | None,
    ) -> float:
        ms = (time.perf_counter() - started) * 1000
        tags = {"model": ref.name, "version": str(ref.version), "route": route}
        self.m_requests.inc(tags={**tags, "status": str(status)})
        self.m_latency.observe(ms, tags=tags)
        if route == "canary" and status >= 500 and (reason := self.guard.record(False, ms)):
            self.m_canary_out.inc()
            log.warning("canary %s taken out: %s", ref, reason)
        self.log.add(self._log_rows(ref, route, status, ms, ids, texts, result, error))
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
            self._record(ref, SHADOW, 200, started, ids, texts, result, None)
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
