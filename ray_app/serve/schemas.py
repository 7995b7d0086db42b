"""The app's HTTP contract: the request and response bodies, every error each route answers with (status, code,
body) and the OpenAPI document built from them with the deployment's own limits, labels and API key, so that
/openapi.json says what the server does. `schemathesis run --checks all` (tests/schemathesis.toml) holds the two
together.

No `from __future__ import annotations`: FastAPI and pydantic read these annotations at run time.
"""

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ray_app.model_ids import SCHEMA_PATTERN
from ray_app.serve.edge import OPEN_PATHS
from ray_app.serve.settings import ServeArgs, TrafficPolicy
from ray_app.text import VISIBLE_CHAR, text_problem


class ApiError(Exception):
    """An answer the app chose: status, code (one of the route's documented ones), detail, headers."""

    def __init__(self, status: int, code: str, detail: Any, headers: dict[str, str] | None = None) -> None:
        super().__init__(code)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def _visible(*fields: str) -> list[dict[str, Any]]:
    """JSON Schema for "at least one of these fields has a visible character" (the server's `empty_text` rule)."""
    return [
        {"required": [name], "properties": {name: {"pattern": VISIBLE_CHAR}}}  # pattern: search, not a full match
        for name in fields
    ]


class Item(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": _visible("title", "description")})
    title: str = Field(description="Project title.")
    description: str = Field("", description="Project description; may be empty.")


def _title_or_items(schema: dict[str, Any]) -> None:
    """Say in the OpenAPI document what `_one_form` enforces, so clients and fuzzers see the two request shapes:
    a title (with an optional description) or a non-empty list of items, never both and never null."""
    props = schema["properties"]
    props["title"] = {"type": "string", "title": "Title", "description": "Project title (one-item form)."}
    props["description"] = {"type": "string", "title": "Description", "description": "May be empty."}
    array = next(a for a in props["items"]["anyOf"] if a.get("type") == "array")  # keeps pydantic's own $ref
    props["items"] = {**array, "minItems": 1, "title": "Items"}
    next(a for a in props["model"]["anyOf"] if a.get("type") == "string")["pattern"] = SCHEMA_PATTERN
    schema["oneOf"] = [
        {"required": ["title"], "not": {"required": ["items"]}, "anyOf": _visible("title", "description")},
        {"required": ["items"], "not": {"anyOf": [{"required": ["title"]}, {"required": ["description"]}]}},
    ]
    schema["examples"] = [
        {"title": "Transformers for text classification", "description": "BERT"},
        {"items": [{"title": "YOLO object detection", "description": "video frames"}], "model": "@champion"},
    ]


class PredictRequest(BaseModel):
    """One item (`title`, `description`) or a list of them (`items`); `model` names a version or alias."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_title_or_items)
    title: str | None = None
    description: str | None = None
    items: list[Item] | None = None
    model: str | None = Field(None, description="NAME/VERSION, NAME@ALIAS, VERSION or @ALIAS; bypasses the policy.")

    @model_validator(mode="after")
    def _one_form(self) -> "PredictRequest":
        nulls = [name for name in ("title", "description", "items") if name in self.model_fields_set]
        if nulls := [name for name in nulls if getattr(self, name) is None]:
            raise ValueError(f"{', '.join(nulls)} may not be null (leave the field out instead)")
        if self.items is not None and (self.title is not None or self.description is not None):
            raise ValueError("send either title/description or items, not both")
        if self.items is None and self.title is None:
            raise ValueError("title is required (or send items: [{title, description}, ...])")
        if self.items is not None and not self.items:
            raise ValueError("items is empty")
        return self

    def all_items(self) -> list[Item]:
        return (
            self.items if self.items is not None else [Item(title=self.title or "", description=self.description or "")]
        )


class StreamRequest(BaseModel):
    """One message of the input topic (stream.py): one item, the request id its result is keyed by, and an optional
    model id that bypasses the traffic policy as POST /predict's `model` does."""

    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(min_length=1, max_length=256, description="The result's key on the output topic.")
    title: str
    description: str = ""
    model: str | None = None


def problems(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic's errors as the API reports them (`invalid_request`'s detail): where, what, which rule."""
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]


def decode_message(raw: bytes | None) -> Any:
    """A message's bytes as POST /predict reads a body (FastAPI's `request.json()`): bytes that are not text are
    400 `bad_request`, text that is not JSON 422 `invalid_request`; its fields are checked after (StreamRequest)."""
    try:
        message = json.loads(raw or b"")
    except json.JSONDecodeError as exc:
        problem = [{"loc": ["body", exc.pos], "msg": "JSON decode error", "type": "json_invalid"}]
        raise ApiError(422, "invalid_request", problem) from None
    except ValueError:  # UnicodeDecodeError: not UTF-8 (nor UTF-16/32 with a BOM)
        raise ApiError(400, "bad_request", "There was an error parsing the body") from None
    return message


def stream_error(err: ApiError) -> dict[str, Any]:
    """An error as a stream answer: the HTTP body's code and detail, its status, and Retry-After when it has one."""
    retry = (err.headers or {}).get("Retry-After")
    return {
        "error": err.code,
        "detail": err.detail,
        "status": err.status,
        **({"retry_after_s": int(retry)} if retry else {}),
    }


def check_items(items: list[Item], args: ServeArgs) -> list[Item]:
    """The limits the schema states with maxItems / maxLength / pattern, with this app's own error codes."""
    if len(items) > args.max_items:
        raise ApiError(413, "too_many_items", f"{len(items)} items; at most {args.max_items} per request")
    for i, item in enumerate(items):
        fields = {"title": item.title, "description": item.description}
        for name, text in fields.items():
            if not _is_utf8(text):
                # JSON's "\ud800" escape decodes to a lone surrogate: the tokenizer and the Parquet log reject it
                raise ApiError(422, "invalid_text", f"items[{i}].{name} is not valid Unicode text (a lone surrogate)")
        problem = text_problem(fields, args.max_text_chars)
        if problem and problem[0] == "text_too_long":
            chars = len(fields[problem[1]])
            raise ApiError(
                413,
                "text_too_long",
                f"items[{i}].{problem[1]} has {chars} characters; the limit is {args.max_text_chars}",
            )
        if problem:
            raise ApiError(
                422,
                "empty_text",
                f"items[{i}] has no text: title and description are empty or only spaces, controls or "
                "zero-width characters",
            )
    return items


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Prediction(BaseModel):
    label: str = Field(description="The most probable label.")
    probabilities: dict[str, float] = Field(description="Every label's probability; they sum to 1.")


class PredictResponse(BaseModel):
    request_id: str = Field(description="The caller's X-Request-Id, or one the app made.")
    model: str = Field(description="The registered model that answered.")
    version: str
    route: Literal["primary", "canary", "named"] = Field(description="named: the request chose the model.")
    predictions: list[Prediction] = Field(description="One per item, in order.")


class Health(BaseModel):
    status: Literal["alive"]


class Ready(BaseModel):
    status: Literal["ready"]
    default_model: str
    version: str = Field(description="The version the default model id means now.")


class VersionInfo(BaseModel):
    version: str
    aliases: list[str]
    run_id: str | None
    status: str = Field(description="The registry's status of the version (READY once its files are uploaded).")


class ReplicaModels(BaseModel):
    models: list[dict[str, Any]] = Field(description="What the replica has loaded, most recently used first.")
    reported_at: float = Field(description="Unix time of the replica's last report.")


class Models(BaseModel):
    model: str
    default_model: str
    policy: TrafficPolicy
    canary_taken_out: str | None = Field(description="Why the guard took the canary out, or null.")
    versions: list[VersionInfo]
    replicas: dict[str, ReplicaModels]
    loop: dict[str, Any] = Field(
        description="The closed loop of this model (`ray-app loop`): `state` (off, idle, checking, retraining, shadow, "
        "canary N %, gate, promoted, rolled back, held, failed, stopped), the versions in its cycle, its last verdict."
    )


# ---- errors: status -> (codes, what they mean), per route ---------------------------------------------------------

Errors = dict[int, tuple[tuple[str, ...], str]]
COMMON: Errors = {
    401: (("unauthorized",), "Missing or wrong API key (X-API-Key, or Authorization: Bearer)."),
    500: (("internal_error",), "A fault in the server; it is logged in the replica, never sent."),
}
PREDICT: Errors = {
    400: (("bad_request",), "The body could not be read (not UTF-8 JSON)."),
    403: (
        ("model_refused",),
        "The version is not the pipeline's work (no lineage tags or no test evaluation) and the app serves only "
        "those (require_lineage).",
    ),
    404: (("unknown_model",), "The registry has no such model name, version or alias."),
    408: (("request_timeout",), "The body did not arrive within the deployment's body_timeout_s."),
    413: (
        ("request_too_large", "too_many_items", "text_too_long"),
        "The body is over max_body_bytes, or it has more items or longer texts than the schema allows.",
    ),
    422: (
        ("invalid_request", "bad_model_id", "invalid_text", "empty_text"),
        "The body breaks the schema (detail lists each problem), names a model id outside the grammar, or has "
        "an item with no visible text.",
    ),
    500: (("internal_error", "prediction_failed"), "A fault in the server; it is logged in the replica, never sent."),
    503: (
        ("overloaded", "registry_busy", "registry_unavailable", "model_unavailable"),
        "Busy or not able to answer now: retry after Retry-After seconds.",
    ),
}
READY: Errors = {503: (("not_ready",), "The default model is not registered or not loaded yet.")}
MODELS: Errors = {503: (("registry_unavailable",), "MLflow could not be asked.")}


class Problem(BaseModel):
    loc: list[str | int] = Field(description="Where in the request: ['body', 'items', 0, 'title'].")
    msg: str
    type: str


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "required": True, "schema": {"type": "integer"}}}


def responses(route: str, errors: Errors, open_route: bool = False) -> dict[int | str, dict[str, Any]]:
    """FastAPI's `responses=` for one route: each status with a body model whose `error` enum is exactly the codes
    the route can answer with there (401 only where the API key is asked for)."""
    out: dict[int | str, dict[str, Any]] = {}
    common = {k: v for k, v in COMMON.items() if not (open_route and k == 401)}
    for status, (codes, meaning) in sorted({**common, **errors}.items()):
        detail = (list[Problem] | str) if "invalid_request" in codes else str
        body = create_model(
            f"{route}Error{status}",
            error=(Literal[codes], Field(description="A stable code to branch on.")),  # type: ignore[valid-type]
            detail=(detail, Field(description="What was wrong, for people.")),
        )
        out[status] = {"model": body, "description": f"{meaning} error: {' | '.join(codes)}"}
        if status == 503:
            out[status]["headers"] = _RETRY_AFTER
    return out


EXAMPLE_PROBABILITIES = (0.91, 0.05, 0.03, 0.01)


def document(base: dict[str, Any], args: ServeArgs, keyed: bool) -> dict[str, Any]:
    """FastAPI's generated document with what only the deployment knows: the length and count limits, the label
    set, the API-key scheme when a key is set (401 is documented only then), and a response example."""
    schemas = base["components"]["schemas"]
    for name in ("Item", "PredictRequest"):
        for field in ("title", "description"):
            schemas[name]["properties"][field]["maxLength"] = args.max_text_chars
    schemas["PredictRequest"]["properties"]["items"]["maxItems"] = args.max_items
    schemas["Prediction"]["properties"]["label"]["enum"] = list(args.labels)
    schemas["Prediction"]["properties"]["probabilities"].update(
        properties={label: {"type": "number", "minimum": 0, "maximum": 1} for label in args.labels},
        required=list(args.labels),
        additionalProperties=False,
    )
    schemas["PredictResponse"]["examples"] = [_example(args)]
    for path, operations in base["paths"].items():
        for operation in operations.values():
            if not keyed or path in OPEN_PATHS:
                operation["responses"].pop("401", None)
            else:
                operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
    used = json.dumps(base["paths"])
    for name in [n for n in schemas if "Error" in n and f'"#/components/schemas/{n}"' not in used]:
        del schemas[name]  # the 401 bodies of an app without a key
    if keyed:
        base["components"]["securitySchemes"] = {
            "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            "Bearer": {"type": "http", "scheme": "bearer", "description": "The same key as a bearer token."},
        }
    return base


def _example(args: ServeArgs) -> dict[str, Any]:
    """A response as the app gives it (the label set of this deployment, a champion's probabilities)."""
    probs = list(EXAMPLE_PROBABILITIES[: len(args.labels)]) + [0.0] * max(0, len(args.labels) - 4)
    probs[0] += 1 - sum(probs)
    return {
        "request_id": "5d2c6a0e8f9b4f37a1c2d3e4f5a6b7c8",
        "model": args.model_name,
        "version": "3",
        "route": "primary",
        "predictions": [{"label": args.labels[0], "probabilities": dict(zip(args.labels, probs, strict=True))}],
    }
