"""The FastAPI app the ingress's routes hang on (ingress.py): its docs page, the JSON answer to every error FastAPI or
Starlette raises, and the edge middleware (edge.py) with the limits each replica sets on it.

No `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_swagger import patch_fastapi
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_app.serve.edge import EdgeGuard, error_body
from ray_app.serve.schemas import ApiError, problems

log = logging.getLogger("ray.serve")

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
    return JSONResponse(error_body("invalid_request", problems(exc.errors())), status_code=422)


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
