"""Serving logic without a cluster: model-id grammar, alias cache, traffic split, canary guard, prediction log,
canary verdicts."""

from __future__ import annotations

import asyncio
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_app.buckets import bucket
from ray_app.canary_report import HOLD, PROMOTE, ROLLBACK, canary_report
from ray_app.config import CanaryConfig
from ray_app.model_ids import BadModelId, ModelRef, Resolver, parse_model_id
from ray_app.prediction_log import text_fields
from ray_app.serve.policy import Guard, choose
from ray_app.serve.predlog import PredictionLog
from ray_app.serve.settings import CanaryGuard, PredictionLogSettings, ServeArgs, TrafficPolicy


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("3", ModelRef("m", version="3")),
        ("@champion", ModelRef("m", alias="champion")),
        ("other/12", ModelRef("other", version="12")),
        ("other@challenger", ModelRef("other", alias="challenger")),
    ],
)
def test_model_id_grammar(text, ref):
    assert parse_model_id(text, "m") == ref


@pytest.mark.parametrize("text", ["", "0", "../etc/passwd", "a/b/c", "m@", "@1x", "m/1@x", "/tmp/x", "m/01", " ; rm"])
def test_bad_model_ids_are_refused(text):
    with pytest.raises(BadModelId, match="is not NAME/VERSION"):
        parse_model_id(text, "m")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CountingRegistry:
    """Stands in for MlflowClient in a unit test of the cache only; the Serve tests use the real registry."""

    def __init__(self) -> None:
        self.version, self.calls = "1", 0

    def get_model_version_by_alias(self, name, alias):
        self.calls += 1
        return type("MV", (), {"version": self.version})()


def test_alias_cache_expires_after_ttl():
    registry, clock = CountingRegistry(), FakeClock()
    resolver = Resolver(registry, ttl_s=5, clock=clock)
    ref = ModelRef("m", alias="champion")
    assert resolver.cached(ref) is None  # the ingress asks the registry in a thread only then
    assert resolver.resolve(ref).concrete == "m/1"
    registry.version = "2"
    clock.now = 4.9
    assert resolver.cached(ref).concrete == "m/1"
    assert resolver.resolve(ref).concrete == "m/1" and registry.calls == 1
    clock.now = 5.1
    assert resolver.cached(ref) is None
    assert resolver.resolve(ref).concrete == "m/2" and registry.calls == 2
    assert resolver.cached(ModelRef("m", version="7")) is None  # a version is checked once, then known for good


def test_split_is_weighted_and_sticky():
    policy = TrafficPolicy(canary="@challenger", canary_weight=0.2, shadow=None)
    routes = [choose(policy, f"user-{i}", "rid").route for i in range(5000)]
    assert abs(routes.count("canary") / 5000 - 0.2) < 0.03
    assert len({choose(policy, "alice", f"r{i}").route for i in range(20)}) == 1
    assert 0 <= bucket("x") < 1
    assert choose(policy, "alice", "r", canary_enabled=False).route == "primary"


def test_shadow_rides_along_primary_only():
    policy = TrafficPolicy(shadow="@challenger")
    assert choose(policy, None, "r1").shadow == "@challenger"


def test_policy_and_args_validation():
    with pytest.raises(ValueError, match="needs a canary"):
        TrafficPolicy(canary_weight=0.5)
    with pytest.raises(ValueError, match="is not NAME/VERSION"):
        TrafficPolicy(primary="../x")
    with pytest.raises(ValueError, match="one request must fit in one batch"):
        ServeArgs(max_items=64)
    assert ServeArgs(batch={"max_batch_size": 1}).max_items == 32  # no batching: each request runs alone
    with pytest.raises(ValueError, match="enabled is no longer a setting: set max_batch_size: 1"):
        ServeArgs(batch={"enabled": False})


def test_the_guard_pulls_a_canary_only_past_the_promotion_bar():
    """Two sets of canary limits on purpose: a canary between them keeps its traffic but is not promoted."""
    guard, bar = CanaryGuard(), CanaryConfig()
    assert guard.max_error_rate >= bar.max_error_rate and guard.max_p99_ms >= bar.max_p99_ms


def test_guard_trips_on_errors_and_latency():
    guard = Guard(CanaryGuard(max_error_rate=0.1, max_p99_ms=100, min_requests=10))
    for _ in range(9):
        assert guard.record(True, 5) is None
    assert guard.record(False, 5) is None  # 1 error in 10 is not above 0.1
    assert guard.record(False, 5).startswith("error rate")
    slow = Guard(CanaryGuard(max_p99_ms=100, min_requests=10))
    reasons = [slow.record(True, 500) for _ in range(10)]
    assert reasons[-1].startswith("p99")


def _row(i: int, **kw):
    return {
        "request_id": f"r{i}",
        "item": 0,
        "timestamp": int(time.time() * 1000),
        "route": "primary",
        "model_name": "m",
        "model_version": "1",
        "status": 200,
        "error": None,
        "latency_ms": 10.0,
        **text_fields("some text here", store_text=False),
        "label": "mlops",
        "confidence": 0.9,
        "probabilities": "{}",
        **kw,
    }


def test_prediction_log_writes_batches_hashes_text_and_keeps_size(tmp_path):
    log = PredictionLog(PredictionLogSettings(uri=str(tmp_path), flush_rows=3, max_bytes=None, store_text=False))
    log.add([_row(1), _row(2)])
    assert not log.due()
    log.add([_row(3)])
    assert log.due()
    path = log.write(log.take())
    table = pq.read_table(path)
    assert table.num_rows == 3 and table.column("text").null_count == 3
    assert table.column("text_chars").to_pylist() == [14, 14, 14]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp files left behind
    for i in range(4):
        log.write([_row(10 + i)])
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    capped = PredictionLog(PredictionLogSettings(uri=str(tmp_path), max_bytes=size // 2))
    removed = capped.enforce_retention()
    assert removed and sum(p.stat().st_size for p in tmp_path.iterdir()) <= size // 2
    assert sorted(p.name for p in tmp_path.iterdir())[0] > min(removed).rsplit("/", 1)[1]  # oldest went first


def _traffic(n: int, challenger_status=200, challenger_ms=10.0, disagree=0):
    rows = []
    for i in range(n):
        rows.append(_row(i))
        rows.append(
            _row(
                i,
                model_version="2",
                route="shadow",
                status=challenger_status,
                latency_ms=challenger_ms,
                label="other" if i < disagree else "mlops",
            )
        )
    return pd.DataFrame(rows)


def test_canary_verdicts():
    cfg = CanaryConfig(min_requests=20, max_error_rate=0.01, max_p99_ms=100, min_agreement=0.9)
    assert canary_report(_traffic(30), "1", "2", cfg)["verdict"] == PROMOTE
    assert canary_report(_traffic(10), "1", "2", cfg)["verdict"] == HOLD
    assert canary_report(_traffic(30, disagree=10), "1", "2", cfg)["verdict"] == HOLD
    assert canary_report(_traffic(30, challenger_ms=300), "1", "2", cfg)["verdict"] == ROLLBACK
    assert canary_report(_traffic(30, challenger_status=500), "1", "2", cfg)["verdict"] == ROLLBACK


@pytest.mark.parametrize(
    "body",
    [
        {"title": "YOLO"},
        {"title": "YOLO", "description": "frames", "model": "@champion"},
        {"items": [{"title": "a"}, {"title": "b", "description": "c"}]},
        {"description": "no title"},
        {"items": []},
        {"items": [{"title": "a"}], "title": "both"},
        {"items": [{"title": "a"}], "description": "both"},
        {},
        {"title": "x", "extra": 1},
        {"title": "x", "model": "projects-classifier/3"},
        {"title": "x", "model": "../etc/passwd"},
        {"title": "x", "model": "m/01"},
        {"title": "x", "model": ""},
        {"title": "x", "model": " @champion"},
        {"title": "x", "description": None},
        {"items": None, "title": "x"},
        {"items": [{"title": ""}]},
        {"items": [{"title": "", "description": "frames"}]},
        {"title": "\u200b\ufeff\x00", "description": " "},
        {"title": "日本語"},
        {"title": "x" * 2000},
        {"title": "x" * 2001},
        {"items": [{"title": "x"}] * 32},
        {"items": [{"title": "x"}] * 33},
    ],
)
def test_openapi_document_of_a_request_agrees_with_the_server(body):
    """The request schema /openapi.json publishes (with the deployment's limits) accepts exactly what the server's
    own checks accept, so a client or a fuzzer generating from the schema sends requests the server takes."""
    import jsonschema
    from fastapi.openapi.utils import get_openapi
    from pydantic import ValidationError

    from ray_app.serve import schemas
    from ray_app.serve.ingress import api

    args = ServeArgs()
    doc = schemas.document(get_openapi(title="t", version="1", routes=api.routes), args, keyed=True)
    schema = {**doc, "$ref": "#/components/schemas/PredictRequest"}  # the document is the root its $refs point into
    schema_ok = jsonschema.Draft202012Validator(schema).is_valid(body)
    try:
        request = schemas.PredictRequest.model_validate(body)
        schemas.check_items(request.all_items(), args)
        if request.model is not None:
            parse_model_id(request.model, "m")  # the server's next check (a 422 too)
        server_ok = True
    except (ValidationError, BadModelId, schemas.ApiError):
        server_ok = False
    assert schema_ok == server_ok, (body, schema_ok, server_ok)


def test_openapi_document_names_the_labels_the_key_and_every_error():
    from fastapi.openapi.utils import get_openapi

    from ray_app.serve import schemas
    from ray_app.serve.ingress import api

    args = ServeArgs()
    keyed = schemas.document(get_openapi(title="t", version="1", routes=api.routes), args, keyed=True)
    open_ = schemas.document(get_openapi(title="t", version="1", routes=api.routes), args, keyed=False)
    prediction = keyed["components"]["schemas"]["Prediction"]["properties"]
    assert prediction["label"]["enum"] == args.labels
    assert prediction["probabilities"]["required"] == args.labels
    predict = keyed["paths"]["/predict"]["post"]
    assert set(predict["responses"]) == {"200", "400", "401", "403", "404", "408", "413", "422", "500", "503"}
    assert predict["security"] and "ApiKey" in keyed["components"]["securitySchemes"]
    assert (
        "security" not in keyed["paths"]["/health"]["get"]
        and "401" not in keyed["paths"]["/health"]["get"]["responses"]
    )
    assert "401" not in open_["paths"]["/predict"]["post"]["responses"] and "securitySchemes" not in open_["components"]
    assert not [n for n in open_["components"]["schemas"] if n.endswith("Error401")]
    assert predict["responses"]["503"]["headers"]["Retry-After"]["required"]


def test_the_visible_text_rule_is_unicode_s_invisible_categories():
    """Every character the published pattern calls invisible is a control, space, separator or format mark in the
    running Python's Unicode tables (the ranges are spelled out so the pattern does not change with Python)."""
    import unicodedata

    from ray_app.text import _INVISIBLE_RANGES

    for low, high in _INVISIBLE_RANGES:
        for cp in range(low, high + 1):
            assert unicodedata.category(chr(cp)) in ("Cc", "Cf", "Co", "Cn", "Zs", "Zl", "Zp"), hex(cp)


def _shipped_app_and_deployment() -> tuple[ServeArgs, dict]:
    import yaml

    from tests.conftest import ROOT

    (app,) = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    (deployment,) = app["deployments"]
    return ServeArgs.model_validate(app["args"]), deployment


def test_the_shipped_app_promises_the_labels_the_pipeline_trains():
    from ray_app.config_loader import load_config
    from tests.conftest import ROOT

    args, _ = _shipped_app_and_deployment()
    assert args.labels == load_config(ROOT / "configs" / "default.yaml").data.labels


def test_the_app_sheds_overload_itself_before_serve_does():
    """Serve refuses past max_ongoing + max_queued requests in plain text; the app's own JSON 503 must come first:
    at most max_queued_items waiting and one batch running, each a request of at least one item."""
    from ray_app.serve.app import build_app

    args, deployment = _shipped_app_and_deployment()
    assert deployment["max_ongoing_requests"] > args.max_queued_items + args.batch.max_batch_size
    defaults = ServeArgs()
    built = build_app(defaults)._bound_deployment
    assert built.max_ongoing_requests > defaults.max_queued_items + defaults.batch.max_batch_size


def test_a_full_request_always_fits_an_empty_queue():
    with pytest.raises(ValueError, match="exceeds max_queued_items"):
        ServeArgs(max_items=32, max_queued_items=16)


class SlowRegistry:
    """Knows versions 1-3 of "m"; every lookup waits for `gate`, so a test can hold lookups in flight."""

    def __init__(self) -> None:
        import threading

        self.gate, self.calls, self.searches = threading.Event(), 0, 0

    def search_model_versions(self, filter_string, max_results, order_by):
        from types import SimpleNamespace

        self.searches += 1
        assert order_by == ["version_number DESC"] and max_results == 1
        return [SimpleNamespace(version="3")] if filter_string == "name='m'" else []

    def get_model_version(self, name, version):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

        self.calls += 1
        self.gate.wait(10)
        if name != "m" or int(version) > 3:
            raise MlflowException(f"no {name}/{version}", error_code=RESOURCE_DOES_NOT_EXIST)
        return object()


def test_unknown_ids_are_remembered_for_the_ttl_and_a_failed_version_is_asked_again():
    from ray_app.model_ids import UnknownModel

    registry, clock = SlowRegistry(), FakeClock()
    registry.gate.set()
    resolver = Resolver(registry, ttl_s=5, clock=clock)
    missing, known = ModelRef("m", version="9"), ModelRef("m", version="2")
    with pytest.raises(UnknownModel):
        resolver.resolve(missing)
    with pytest.raises(UnknownModel):  # from the cache: the registry is not asked again
        resolver.cached(missing)
    assert registry.calls == 1
    clock.now = 5.1
    assert resolver.cached(missing) is None
    assert resolver.resolve(known) == known and resolver.cached(known) == known
    resolver.forget(known)  # its load failed: perhaps deleted
    assert resolver.cached(known) is None


def test_a_miss_makes_every_higher_version_unknown_without_a_lookup_for_the_ttl():
    from ray_app.model_ids import UnknownModel

    registry, clock = SlowRegistry(), FakeClock()
    registry.gate.set()
    resolver = Resolver(registry, ttl_s=5, clock=clock)
    with pytest.raises(UnknownModel):
        resolver.resolve(ModelRef("m", version="9"))
    for version in range(10, 1000):  # a flood of new numbers: answered from the cache
        with pytest.raises(UnknownModel, match="newest version is 3"):
            resolver.cached(ModelRef("m", version=str(version)))
    assert (registry.calls, registry.searches) == (1, 1)
    assert resolver.cached(ModelRef("m", version="2")) is None  # at or below the newest: the registry decides
    with pytest.raises(UnknownModel):  # a model with no versions: every number is unknown
        resolver.resolve(ModelRef("other", version="1"))
    with pytest.raises(UnknownModel, match="none"):
        resolver.cached(ModelRef("other", version="5"))
    clock.now = 1.1  # a version registered meanwhile is asked about again a second later
    assert resolver.cached(ModelRef("m", version="4")) is None
    with pytest.raises(UnknownModel):  # while the id that missed stays unknown for the whole ttl_s
        resolver.cached(ModelRef("m", version="9"))


def test_lookups_are_shared_per_id_bounded_and_busy_beyond_the_bound():
    from ray_app.model_ids import Lookups, RegistryBusy, UnknownModel

    async def scenario() -> None:
        registry = SlowRegistry()
        lookups = Lookups(Resolver(registry, ttl_s=5), threads=2, max_pending=3)
        same = [asyncio.ensure_future(lookups.resolve(ModelRef("m", version="7"))) for _ in range(20)]
        others = [asyncio.ensure_future(lookups.resolve(ModelRef("m", version=v))) for v in ("1", "8")]
        await asyncio.sleep(0.05)
        with pytest.raises(RegistryBusy):  # 3 ids in flight: a fourth is refused at once
            await lookups.resolve(ModelRef("m", version="5"))
        registry.gate.set()
        results = await asyncio.gather(*same, *others, return_exceptions=True)
        assert all(isinstance(r, UnknownModel) for r in results[:20]) and registry.calls == 3
        assert results[20] == ModelRef("m", version="1") and isinstance(results[21], UnknownModel)

    asyncio.run(scenario())


def test_an_alias_past_its_ttl_is_served_from_its_last_answer_while_it_refreshes():
    from ray_app.model_ids import Lookups

    async def scenario() -> None:
        registry, clock = CountingRegistry(), FakeClock()
        resolver = Resolver(registry, ttl_s=5, clock=clock)
        lookups = Lookups(resolver)
        ref = ModelRef("m", alias="champion")
        assert (await lookups.resolve(ref)).version == "1"
        registry.version, clock.now = "2", 6.0
        assert (await lookups.resolve(ref)).version == "1"  # stale, and a refresh started
        for _ in range(100):
            await asyncio.sleep(0.01)
            if resolver.cached(ref) is not None:
                break
        assert (await lookups.resolve(ref)).version == "2" and registry.calls == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("text", ["\x00\x00", "\u200b\u200b", "\ufeff", " \t\u00a0\u2028", "\u200d\u2060"])
def test_text_of_only_controls_spaces_and_zero_width_marks_is_empty(text):
    from ray_app.text import has_visible_text

    assert not has_visible_text(text)
    assert has_visible_text(text + "a") and has_visible_text("日本") and has_visible_text("🙂")


def _run_edge(messages, limits=(100, 0.2, "k"), headers=None, path="/predict"):
    """Drive EdgeGuard as an ASGI server would: `messages` are the client's body chunks (None: the client stalls)."""
    from ray_app.serve.edge import EdgeGuard

    seen, sent = {}, []

    async def inner(scope, receive, send):
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        seen["body"] = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario():
        queue = list(messages)

        async def receive():
            if not queue or queue[0] is None:
                await asyncio.sleep(3600)
            return queue.pop(0)

        async def send(message):
            sent.append(message)

        raw = [(k.encode(), v.encode()) for k, v in (headers if headers is not None else {"x-api-key": "k"}).items()]
        scope = {"type": "http", "path": path, "headers": raw, "method": "POST"}
        await EdgeGuard(inner, lambda _: limits)(scope, receive, send)

    asyncio.run(scenario())
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, (body if status == 200 else __import__("json").loads(body)), seen.get("body")


def _chunk(data: bytes, more: bool = True) -> dict:
    return {"type": "http.request", "body": data, "more_body": more}


def test_edge_passes_a_body_within_the_limit_through_whole():
    status, _, body = _run_edge([_chunk(b"a" * 60), _chunk(b"b" * 40, more=False)])
    assert status == 200 and body == b"a" * 60 + b"b" * 40


def test_edge_refuses_a_chunked_body_over_the_limit_as_it_arrives():
    status, answer, body = _run_edge([_chunk(b"a" * 60), _chunk(b"b" * 60), None])
    assert (status, answer["error"]) == (413, "request_too_large") and body is None


def test_edge_refuses_a_declared_length_over_the_limit_without_reading():
    headers = {"x-api-key": "k", "content-length": "5000"}
    status, answer, _ = _run_edge([None], headers=headers)
    assert (status, answer["error"]) == (413, "request_too_large")


def test_edge_answers_408_when_the_body_stalls():
    status, answer, _ = _run_edge([_chunk(b"a" * 10), None])
    assert (status, answer["error"]) == (408, "request_timeout")


def test_edge_wants_the_api_key_everywhere_but_health_and_the_api_docs():
    assert _run_edge([_chunk(b"", more=False)], headers={})[1]["error"] == "unauthorized"
    assert _run_edge([_chunk(b"", more=False)], headers={"authorization": "Bearer k"})[0] == 200
    for path in ("/health", "/docs", "/openapi.json", "/swagger/swagger-ui-bundle.js", "/swagger/swagger-ui.css"):
        assert _run_edge([_chunk(b"", more=False)], headers={}, path=path)[0] == 200, path
    for path in ("/predict", "/models", "/ready", "/docsx", "/swagger/other.js"):
        assert _run_edge([_chunk(b"", more=False)], headers={}, path=path)[0] == 401, path


def test_docs_page_uses_only_the_apps_own_swagger_files():
    """Swagger UI from the installed package, not a CDN: the page renders on a machine without internet."""
    import re

    from fastapi.testclient import TestClient

    from ray_app.serve.ingress import api

    client = TestClient(api)
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("http://testserver/swagger/") for s in sources), sources
    for source in sources:
        asset = client.get(source)
        assert asset.status_code == 200 and len(asset.content) > 500, source
    assert "SwaggerUIBundle" in client.get("/swagger/swagger-ui-bundle.js").text
    assert "/openapi.json" in page.text


def test_new_ids_are_looked_up_at_a_bounded_rate():
    from ray_app.model_ids import Lookups, RegistryBusy, UnknownModel

    async def scenario() -> None:
        registry, clock = SlowRegistry(), FakeClock()
        registry.gate.set()
        lookups = Lookups(Resolver(registry, ttl_s=5, clock=clock), per_s=2, clock=clock)
        for name in ("x", "y"):  # new names: no newest version to decide by
            with pytest.raises(UnknownModel):
                await lookups.resolve(ModelRef(name, version="1"))
        with pytest.raises(RegistryBusy):  # a third new id in the same second
            await lookups.resolve(ModelRef("z", version="1"))
        with pytest.raises(UnknownModel):  # a known miss is answered from the cache, outside the rate
            await lookups.resolve(ModelRef("x", version="1"))
        clock.now = 1.0
        assert await lookups.resolve(ModelRef("m", version="1")) == ModelRef("m", version="1")
        assert registry.calls == 3

    asyncio.run(scenario())


def _canary(n: int, wrong: int, labelled: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`n` primary requests to version 1 (all right) and `n` canary requests to version 2, `wrong` of them answered
    wrongly; labels for the first `labelled` of each."""
    rows = [_row(i) for i in range(n)]
    rows += [_row(n + i, model_version="2", route="canary", label="other" if i < wrong else "mlops") for i in range(n)]
    labels = pd.DataFrame(
        {"request_id": [f"r{i}" for i in [*range(labelled), *range(n, n + labelled)]], "item": 0, "label": "mlops"}
    )
    return pd.DataFrame(rows), labels


def test_canary_verdict_acts_on_accuracy_against_labels_once_enough_are_labelled():
    """A challenger that answers fast but wrongly is rolled back on the labels that arrive during the canary, not
    only held; too few labels hold; no labels at all leave the verdict to errors and latency."""
    cfg = CanaryConfig(min_requests=20, max_p99_ms=100, min_labelled=10, max_accuracy_drop=0.02)
    frame, labels = _canary(30, wrong=15, labelled=30)
    report = canary_report(frame, "1", "2", cfg, labels)
    assert report["verdict"] == ROLLBACK and "accuracy 0.500 < champion 1.000" in report["reason"]
    assert (report["challenger"]["labelled"], report["champion"]["accuracy"]) == (30, 1.0)
    frame, labels = _canary(30, wrong=15, labelled=5)
    assert canary_report(frame, "1", "2", cfg, labels)["verdict"] == HOLD  # 5 labelled of 10 needed
    assert canary_report(frame, "1", "2", cfg, None)["verdict"] == PROMOTE  # nothing to say: as before
    required = cfg.model_copy(update={"require_labels": True})
    assert canary_report(frame, "1", "2", required, None)["verdict"] == HOLD
    frame, labels = _canary(30, wrong=0, labelled=30)
    good = canary_report(frame, "1", "2", cfg, labels)
    assert good["verdict"] == PROMOTE and "accuracy 1.000 on 30 labelled" in good["reason"]
    floor = cfg.model_copy(update={"min_accuracy": 0.9})
    frame, labels = _canary(30, wrong=6, labelled=30)
    only_challenger = labels[labels["request_id"].isin([f"r{i}" for i in range(30, 60)])]  # no champion to compare
    assert canary_report(frame, "1", "2", cfg, only_challenger)["verdict"] == PROMOTE
    report = canary_report(frame, "1", "2", floor, only_challenger)
    assert report["verdict"] == ROLLBACK and "accuracy 0.800 < min_accuracy 0.9" in report["reason"]


def test_serve_port_blocks_are_disjoint_and_below_the_ephemeral_range() -> None:
    """Every port of a cluster's block is named at `ray start` and bound only when Serve starts: one in the kernel's
    ephemeral range could be taken in between by any outgoing connection (it once stopped a test cluster's HAProxy),
    and two blocks handed out by one process must not share a port even before either is bound."""
    from dataclasses import astuple

    from ray_app.ports import MAKE_RUN_PORTS, PORT_BLOCK, _ephemeral_start, free_serve_ports

    blocks = [free_serve_ports() for _ in range(20)]
    ports = [
        {*range(b.http, b.http + PORT_BLOCK), *range(b.grpc, b.grpc + PORT_BLOCK), *astuple(b)[2:]} for b in blocks
    ]
    assert all(len(p) == 2 * PORT_BLOCK + 4 for p in ports)
    assert len(set().union(*ports)) == sum(len(p) for p in ports)  # no port in two blocks
    assert max(max(p) for p in ports) < min(_ephemeral_start(), MAKE_RUN_PORTS.http)
    assert not set().union(*ports) & {*astuple(MAKE_RUN_PORTS), *range(30000, 30000 + PORT_BLOCK)}
