"""Serving logic without a cluster: model-id grammar, alias cache, traffic split, canary guard, prediction log,
canary verdicts."""

from __future__ import annotations

import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from ray_app.config import CanaryConfig
from ray_app.serve.ids import BadModelId, ModelRef, Resolver, parse_model_id
from ray_app.serve.policy import Guard, bucket, choose
from ray_app.serve.predlog import PredictionLog, text_fields
from ray_app.serve.report import HOLD, PROMOTE, ROLLBACK, canary_report
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
    ],
)
def test_openapi_schema_of_a_request_agrees_with_the_server(body):
    """The request schema published in /openapi.json (title or items, never both) accepts exactly what the server's
    own validation accepts, so a client or a fuzzer generating from the schema sends requests the server takes."""
    import jsonschema
    from pydantic import ValidationError

    from ray_app.serve.ingress import PredictRequest

    schema_ok = jsonschema.Draft202012Validator(PredictRequest.model_json_schema()).is_valid(body)
    try:
        request = PredictRequest.model_validate(body)
        if request.model is not None:
            parse_model_id(request.model, "m")  # the server's next check (a 422 too)
        server_ok = True
    except (ValidationError, BadModelId):
        server_ok = False
    assert schema_ok == server_ok, (body, schema_ok, server_ok)


def _shipped_app_and_deployment() -> tuple[ServeArgs, dict]:
    import yaml

    from tests.conftest import ROOT

    (app,) = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"]
    (deployment,) = app["deployments"]
    return ServeArgs.model_validate(app["args"]), deployment


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
