"""The SLA rules and the Grafana dashboard against real Prometheus tools: `promtool check rules` and
`promtool test rules`, then every PromQL expression of the rules and the dashboard run on a real `prometheus` that
scrapes Ray-shaped series (the app's metric names with the labels Ray adds) and evaluates the rules."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from ray_app.ports import free_port
from tests.prom import (
    DASHBOARD,
    PROM_DIR,
    RULES,
    Prometheus,
    example_config,
    finite,
    need,
    running_prometheus,
    wait_for,
)

ALERTS = ["RayAppLatencyP99High", "RayAppErrorRateHigh", "RayAppAccuracyLow", "RayAppDataDrift"]
# Health of the monitoring and of Serve: quiet while all is well (the example exporter is), so their expressions
# find nothing; the series each one reads must exist, or it could never fire.
HEALTH = {
    "RayAppNoMetricsTargets": 'up{job="ray"}',
    "RayAppMetricsTargetDown": 'up{job="ray"}',
    "RayAppNoHealthyReplica": "ray_serve_deployment_replica_healthy",
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([need("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


# ---- promtool -----------------------------------------------------------------------------------------------------


def test_rules_pass_promtool_check():
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert sorted(r["alert"] for r in rules if "alert" in r) == sorted([*ALERTS, *HEALTH])


def test_rules_unit_tests_pass():
    out = promtool("test", "rules", str(PROM_DIR / "alerts_test.yml"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_unit_tests_cover_each_sla_firing_and_not_firing():
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    for alert in [*ALERTS, *HEALTH]:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"no case where {alert} fires"
        assert any(not c["exp_alerts"] for c in mine), f"no case where {alert} stays quiet"


def test_broken_rule_file_fails_check(tmp_path):
    broken = tmp_path / "broken.yml"
    rule = {"alert": "X", "expr": "sum by (model (rate(ray_app_requests_total[5m]))"}  # a parenthesis short
    broken.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [rule]}]}))
    out = promtool("check", "rules", str(broken))
    assert out.returncode != 0
    assert "parse error" in out.stdout + out.stderr


def test_unit_test_with_a_wrong_expectation_fails(tmp_path):
    """The unit tests can fail: expect the drift alert to stay quiet where it fires."""
    (tmp_path / "alerts.yml").write_text(RULES.read_text())
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    for t in tests["tests"]:
        for case in t.get("alert_rule_test", []):
            if case["alertname"] == "RayAppDataDrift":
                case["exp_alerts"] = []
    (tmp_path / "t.yml").write_text(yaml.safe_dump(tests))
    out = promtool("test", "rules", "t.yml", cwd=tmp_path)
    assert out.returncode != 0
    assert "RayAppDataDrift" in out.stdout + out.stderr


# ---- the dashboard's shape ----------------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> Iterator[dict]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def test_dashboard_is_importable_grafana_json():
    dash = dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["version"]["multi"] and variables["version"]["includeAll"]
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dash):
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert "$version" in target["expr"] or "version" not in target["expr"] or "ALERTS" in target["expr"]
    titles = " ".join(p["title"] for p in panels(dash)).lower()
    for shown in ("request rate", "p50 / p99", "error rate", "batch", "cache", "loads", "drift share", "accuracy"):
        assert shown in titles


def test_grafana_provisioning_points_at_the_dashboard_and_a_prometheus():
    """The provisioning files Grafana reads from GF_PATHS_PROVISIONING: a Prometheus data source of the type the
    dashboard's data-source variable asks for, and a file provider whose path holds the dashboard."""
    root = DASHBOARD.parent / "provisioning"
    sources = yaml.safe_load((root / "datasources" / "ray_app.yml").read_text())
    providers = yaml.safe_load((root / "dashboards" / "ray_app.yml").read_text())
    assert sources["apiVersion"] == providers["apiVersion"] == 1
    (source,) = sources["datasources"]
    ds_var = next(v for v in dashboard()["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    assert source["type"] == ds_var["query"] and source["url"] == "${PROMETHEUS_URL}"
    paths = {p["name"]: p["options"]["path"] for p in providers["providers"]}
    assert paths["ray_app"] == "${RAY_APP_DASHBOARDS}"  # documented as monitoring/grafana, where the JSON is
    assert paths["ray"].endswith("/metrics/grafana/dashboards")


# ---- every expression on a real Prometheus ------------------------------------------------------------------------

# What Grafana puts in place of its variables: `version` is multi-value, which Grafana formats as a regex group.
GRAFANA_VALUES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m", "model": "clf", "version": "(1|2)"}


def grafana_expr(expr: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in GRAFANA_VALUES, f"unknown dashboard variable ${name} in {expr}"
        return GRAFANA_VALUES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(f"{p['title']}/{t['refId']}", t["expr"]) for p in panels(dashboard()) for t in p.get("targets", [])]


def rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [
        (r.get("record") or r["alert"], r["expr"]) for g in groups for r in g["rules"] if r.get("alert") not in HEALTH
    ]


# Series shaped like Ray's export of the app's metrics: `ray_` prefix, the app's tags, and Ray's own labels.
# (as scraped from Ray 2.60: note Ray's own `Version`, its release, beside the app's `version`, the model's)
RAY_LABELS = {
    "Component": "core_worker",
    "NodeAddress": "192.0.2.2",
    "SessionName": "session_2026-11-23_17-24-18_777217_25866",
    "Version": "2.60.0",
    "otel_scope_name": "ray._private.telemetry.open_telemetry_metric_recorder",
}
LATENCY_LE = [5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000]


class RayShapedSeries:
    """Counters that grow with each scrape: version 1 is healthy; version 2 breaches every SLA."""

    def __init__(self) -> None:
        self.n = 0

    def text(self) -> str:
        self.n += 1
        n, out = self.n, []

        def put(name: str, value: float, **labels: str) -> None:
            body = ",".join(f'{k}="{v}"' for k, v in {**RAY_LABELS, **labels}.items())
            out.append(f"ray_app_{name}{{{body}}} {value}")

        def histogram(name: str, share_under, count: float, **labels: str) -> None:
            for le in LATENCY_LE:
                put(f"{name}_bucket", count * share_under(le), le=f"{float(le)}", **labels)
            put(f"{name}_bucket", count, le="+Inf", **labels)
            put(f"{name}_sum", count * 20, **labels)
            put(f"{name}_count", count, **labels)

        for version, route, slow, errors, accuracy, drift in (
            ("1", "primary", 0, 0, 0.93, 0.05),
            ("2", "canary", 0.05, 1, 0.8, 0.35),
        ):
            tags = {"model": "clf", "version": version, "application": "classifier", "deployment": "Classifier"}
            for replica in ("a", "b"):
                put("requests_total", 10 * n, route=route, status="200", replica=replica, **tags)
                put("requests_total", n, route=route, status="422", replica=replica, **tags)
                put("requests_total", errors * n, route=route, status="500", replica=replica, **tags)
                histogram(
                    "request_latency_ms",
                    lambda le, s=slow: 1.0 if le > 100 else 1 - s,
                    11 * n,
                    route=route,
                    replica=replica,
                    **tags,
                )
            pool = {
                "model_id": f"clf/{version}",
                "application": "classifier",
                "deployment": "Classifier",
                "replica": "p",
            }
            histogram("batch_items", lambda le: 1.0 if le >= 8 else 0.5, 4 * n, **pool)
            put("model_cache_total", 5 * n, result="hit", **pool)
            put("model_cache_total", 1, result="miss", **pool)
            put("model_loads_total", 1, outcome="ok", **pool)
            put("int8_total", 1, outcome="used", **pool)
            gauges = {"model": "clf", "version": version, "WorkerId": "4962"}
            put("feedback_accuracy", accuracy, **gauges)
            put("drift_share", drift, **gauges)
            put("drift_detected", float(drift > 0.2), **gauges)
        histogram("model_load_ms", lambda le: 1.0 if le >= 500 else 0.0, 2 + n, application="classifier")
        put("canary_taken_out_total", 1, application="classifier", deployment="Classifier", replica="a")
        # Serve's own gauge (its count of healthy replicas), under Ray's prefix like every series here
        out.append('ray_serve_deployment_replica_healthy{application="classifier",deployment="Classifier"} 2')
        return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def exporter() -> Iterator[str]:
    series = RayShapedSeries()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = series.text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def prom(exporter: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    with running_prometheus(example_config(static=[exporter]), tmp_path_factory.mktemp("prom")) as p:
        # two scrapes for rate(), then a rule evaluation; every alert of version 2 becomes pending
        wait_for(lambda: finite(p.values("model_version:ray_app_request_latency_ms:p99_5m"), "1", "2"), 60, "p99")
        wait_for(lambda: len(p.query('ALERTS{alertname=~"RayApp.*"}')) == len(ALERTS), 60, "the four alerts")
        yield p


@pytest.mark.parametrize(("where", "expr"), dashboard_exprs(), ids=[w for w, _ in dashboard_exprs()])
def test_dashboard_query_runs_and_finds_series(prom, where, expr):
    query = grafana_expr(expr)
    assert "$" not in query
    assert series(prom, query), f"{where}: no series for {query}"


@pytest.mark.parametrize(("name", "expr"), rule_exprs(), ids=[n for n, _ in rule_exprs()])
def test_rule_expression_runs_and_finds_series(prom, name, expr):
    assert series(prom, expr), f"{name}: no series for {expr}"


@pytest.mark.parametrize("alert", sorted(HEALTH))
def test_health_alert_reads_real_series_and_is_quiet_while_healthy(prom, alert):
    assert series(prom, HEALTH[alert]), f"{alert} reads {HEALTH[alert]}, which has no series"
    expr = next(
        r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if r.get("alert") == alert
    )
    assert prom.query(expr) == [], f"{alert} would fire on a healthy exporter"


def series(prom: Prometheus, query: str, timeout: float = 15) -> list[dict]:
    """The query's result: a PromQL error fails at once; an empty result is asked again for a while, because
    Prometheus marks every series of a target stale when one scrape fails (a 1 s scrape on a busy machine)."""
    deadline = time.monotonic() + timeout
    while not (result := prom.query(query)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return result


def test_dashboard_variable_queries_list_the_versions(prom):
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert found, variable["definition"]
        selector, label = grafana_expr(found.group(1)), found.group(2)
        values = prom.api(f"label/{label}/values", **{"match[]": selector})
        assert values == (["1", "2"] if label == "version" else ["clf"])


def test_rules_evaluate_cleanly_and_alert_on_the_breaching_version_only(prom):
    for rule in prom.rules():
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"

    def alerting() -> list[tuple[str, str]]:
        return sorted((a["metric"]["alertname"], a["metric"]["version"]) for a in series(prom, "ALERTS"))

    expected = sorted((a, "2") for a in ALERTS)
    wait_for(lambda: alerting() == expected, 20, f"alerts {expected} (a failed scrape can reset a pending one)")
    p99 = prom.values("model_version:ray_app_request_latency_ms:p99_5m")
    assert p99["1"] < 20 < 100 < p99["2"] <= 250
    errors = prom.values("model_version:ray_app_request_error_ratio:rate5m")
    assert errors["1"] == 0 and errors["2"] == pytest.approx(2 / 24)


@pytest.mark.slow
def test_make_prometheus_scrapes_the_running_head_and_make_stop_stops_it(ray_cluster, tmp_path):
    """`make prometheus` (ray_app.local.start_prometheus) on a head started like `make run`'s: its target is found
    through the head's own service-discovery file, and the pid recorded in the services state is what `down` stops."""
    import httpx

    from ray_app.local import Services, start_prometheus, stop_pids

    need("prometheus")
    state_file = tmp_path / "services.json"
    state_file.write_text(json.dumps(Services("", "", "", ray_cluster["temp_dir"], "", 0, []).__dict__))
    url = start_prometheus(state_file, tmp_path, free_port(), PROM_DIR / "prometheus.yml")
    pid = json.loads(state_file.read_text())["prometheus_pid"]
    port = ray_cluster["metrics"].removesuffix("/metrics").rsplit(":", 1)[1]  # Ray lists it at the node's own IP

    def head_is_up() -> bool:
        targets = httpx.get(f"{url}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
        return any(t["health"] == "up" and t["labels"]["instance"].endswith(f":{port}") for t in targets)

    try:
        wait_for(head_is_up, 120, "the head's metrics endpoint as an up target")
        assert start_prometheus(state_file, tmp_path, free_port(), PROM_DIR / "prometheus.yml") == url  # reused
    finally:
        stop_pids([pid])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/-/ready", timeout=2)
