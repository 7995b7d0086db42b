"""The closed loop (`ray-app loop`, docs/loop.md) on real services: the session's Ray head and MLflow server, a real
`serve deploy` of serve_config.yaml, the retrain as a real Ray job, labels arriving in the real feedback store.

The champion is the smoke model trained on the data set with its labels permuted (natural-language-processing ->
mlops, ...): a model that answers, fast and wrongly, by construction. Shifted traffic breaches its drift check; the
loop retrains on the true labels, and the new version must win on the labels and at the gate. The same permuted
version, put through the loop again against the new champion, is the challenger that is rolled back on quality.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import uuid

import httpx
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ray_app.config import AppConfig, LoopConfig
from ray_app.errors import AppError
from ray_app.local import BIN
from ray_app.loop_state import Cycle
from ray_app.ports import free_port
from ray_app.traffic import deployed_config, with_traffic
from tests.conftest import ROOT, smoke_config
from tests.serving import deploy_config, serve_deploy, wait_until

KEY = "loop-key-" + uuid.uuid4().hex[:6]


# ---- units -----------------------------------------------------------------------------------------------------------


def _details() -> dict:
    deployment = {"name": "Classifier", "user_config": {"traffic": {"primary": "@champion", "sticky_header": "X-U"}}}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "controller_info": {"node_id": "x"},
        "applications": {
            "classifier": {
                "status": "RUNNING",
                "deployed_app_config": {"name": "classifier", "deployments": [deployment]},
            },
            "other": {"status": "RUNNING", "deployed_app_config": {"name": "other", "import_path": "m:app"}},
        },
    }


def test_a_traffic_change_redeploys_every_app_as_it_is_with_only_the_traffic_changed() -> None:
    body = deployed_config(_details())
    assert [a["name"] for a in body["applications"]] == ["classifier", "other"]  # the PUT deletes what it leaves out
    assert set(body) == {"applications", "proxy_location", "http_options"}  # status fields are not config
    changed = with_traffic(body, "classifier", "Classifier", {"canary": "7", "canary_weight": 0.25})
    traffic = changed["applications"][0]["deployments"][0]["user_config"]["traffic"]
    assert traffic["canary"] == "7" and traffic["canary_weight"] == 0.25 and traffic["sticky_header"] == "X-U"
    assert changed["applications"][1] == body["applications"][1] and body != changed
    with pytest.raises(ValueError, match="canary_weight > 0 needs a canary"):
        with_traffic(body, "classifier", "Classifier", {"canary_weight": 0.5})
    with pytest.raises(AppError, match=r"loop\.app_name"):
        with_traffic(body, "nope", "Classifier", {})


def test_the_ramp_must_rise_and_a_cycle_names_its_step() -> None:
    with pytest.raises(ValueError, match=r"loop\.ramp must rise"):
        AppConfig(loop={"ramp": [0.5, 0.25]})
    with pytest.raises(ValueError, match=r"loop\.ramp must rise"):
        LoopConfig(ramp=[0.0, 0.5])
    cycle = Cycle(run_id="r", model="m", champion="1", state="canary", ramp=[0.05, 0.25], step=1)
    assert cycle.label == "canary 25 %" and cycle.weight == 0.25
    assert Cycle(run_id="r", model="m", champion="1", state="shadow", ramp=[0.5]).weight == 0.0


# ---- drills on the real thing ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loop_env(mlflow_server, ray_cluster, tiny_model, storage, tmp_path_factory):
    from ray import serve

    from bench.loop import loop_settings, permuted_copy
    from ray_app.pipeline import run_pipeline
    from ray_app.runtime import connect_ray, setup_mlflow

    work = tmp_path_factory.mktemp("loop")
    tag = uuid.uuid4().hex[:6]
    data = pd.read_csv(ROOT / "data" / "projects" / "dataset.csv")
    log_dir = work / "predlog"
    retrain = [f"model.name_or_path={tiny_model}", f"train.storage_path={storage}", "data.max_rows=null"]
    sets = [
        f"registry.model_name=loop-{tag}", *loop_settings(work, ray_cluster["dashboard"], tag, smoke=True),
        "monitor.retrain.config=configs/smoke.yaml", f"monitor.retrain.overrides={json.dumps(retrain)}",
    ]  # fmt: skip
    cfg = smoke_config(mlflow_server, ray_cluster["address"], tiny_model, storage, *sets)
    permuted = permuted_copy(data, work / "permuted.csv")
    tracking = setup_mlflow(cfg)
    connect_ray(cfg)
    wrong = cfg.replace(data={"path": str(permuted)})
    champion = run_pipeline(wrong, tracking)["model"]["version"]  # first champion: the gate's floor is 0 in smoke
    port = free_port()
    conf = dict(port=port, tracking_uri=mlflow_server, model_name=cfg.registry.model_name, log_dir=log_dir, api_key=KEY)
    serve_deploy(deploy_config(path=work / "s.yaml", **conf), ray_cluster["dashboard"])
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, headers={"X-API-Key": KEY}, timeout=60)
    wait_until(lambda: http.get("/ready").status_code == 200, 240, "/ready")
    yield {"cfg": cfg, "http": http, "base": base, "data": data, "permuted_version": champion, "work": work}
    http.close()
    _kill_loop(cfg)
    serve.shutdown()


def _kill_loop(cfg: AppConfig) -> None:
    import ray

    from ray_app.loop_names import NAMESPACE, actor_name

    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(actor_name(cfg.registry.model_name), namespace=NAMESPACE), no_restart=True)


def _cli(cfg: AppConfig, *args: str) -> subprocess.CompletedProcess:
    keys = ("mlflow.tracking_uri", "ray.address", "registry.model_name", "loop.experiment", "loop.dashboard_address",
            "canary.log_uri", "canary.min_requests", "canary.min_labelled", "canary.max_p99_ms", "data.feedback_uri",
            "loop.tick_s", "loop.ramp")  # fmt: skip
    sets = [a for k in keys for a in ("--set", f"{k}={json.dumps(_get(cfg, k))}")]
    return subprocess.run(
        [str(BIN / "ray-app"), "loop", *args, "-c", "configs/smoke.yaml", *sets],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={**os.environ, "RAY_AUTH_MODE": "token"},
    )  # fmt: skip


def _get(cfg: AppConfig, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _resumed(status: dict) -> dict | None:
    """The status once a restarted controller has resumed its cycle (or already finished it)."""
    return status if 1 in (status.get("resumed"), status.get("last", {}).get("resumed")) else None


def _loop(http: httpx.Client) -> dict:
    return http.get("/models").json()["loop"]


def _steps(cfg: AppConfig, cycle_run_id: str) -> list[str]:
    from bench.loop import step_runs

    return [s["step"] for s in step_runs(cfg.loop.experiment, cycle_run_id)]


def _gauge(metrics_url: str, model: str, state: str) -> float | None:
    for line in httpx.get(metrics_url, timeout=10).text.splitlines():
        if line.startswith("ray_app_loop_state{") and f'model="{model}"' in line and f'state="{state}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def _replica_ids(dashboard: str) -> set[str]:
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    app = ServeSubmissionClient(dashboard).get_serve_details()["applications"]["classifier"]
    return {r["replica_id"] for d in app["deployments"].values() for r in d["replicas"]}


@pytest.mark.slow
def test_drill_shifted_traffic_drives_the_loop_to_a_promotion_through_a_killed_controller(loop_env, ray_cluster):
    """Breach -> retrain (a Ray job) -> shadow -> canary 25 % -> (controller SIGKILLed; Ray restarts it; it resumes
    the recorded step) -> canary 50 % -> gate -> promoted: every step once in MLflow, the served version changed
    with no replica restarted, every request answered."""
    import ray

    from bench.loop import Traffic, send_shifted
    from ray_app.loop_actor import start, with_explicit_paths
    from ray_app.loop_names import NAMESPACE, actor_name

    env, cfg, http = loop_env, loop_env["cfg"], loop_env["http"]
    name, v1 = cfg.registry.model_name, env["permuted_version"]
    send_shifted(env["base"], env["data"], cfg.data.text_columns, 60, KEY)
    replicas = _replica_ids(ray_cluster["dashboard"])
    assert _loop(http) == {"state": "off"}
    started = time.monotonic()
    with Traffic(env["base"], cfg, env["data"], KEY) as traffic:
        start(with_explicit_paths(cfg))
        refused = _cli(cfg, "start")
        assert refused.returncode == 2 and "a loop already runs for model" in refused.stderr, refused.stderr[-2000:]
        wait_until(lambda: _loop(http)["state"] == "canary 25 %", 900, "the loop at canary 25 %", interval=0.2)
        killed_at = time.monotonic() - started
        ray.kill(ray.get_actor(actor_name(name), namespace=NAMESPACE), no_restart=False)  # a crash: Ray restarts it
        resumed = wait_until(lambda: _resumed(_loop(http)), 120, "the restarted controller", interval=0.5)
        # where it was or further (the step's evidence from before the kill still counts), never back at the top
        assert resumed["state"] in ("canary 25 %", "canary 50 %", "gate", "promoted"), resumed
        final = wait_until(lambda: (s := _loop(http))["state"] == "promoted" and s, 600, "promoted", interval=1)
    took = time.monotonic() - started
    last = final["last"]
    v2 = last["challenger"]
    print(f"DRILL loop: breach to promoted in {took:.0f} s (killed at {killed_at:.0f} s): {last['reason']}")
    assert last["outcome"] == "promoted" and last["reason"].startswith("gate: challenger") and v2 != v1, last
    assert MlflowClient().get_model_version_by_alias(name, "champion").version == v2
    assert _steps(cfg, last["cycle_run_id"]) == ["check", "retrain", "shadow", "canary 25 %", "canary 50 %", "gate"]
    run = MlflowClient().get_run(last["cycle_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "promoted"
    assert json.loads(run.data.tags["loop.cycle"])["resumed"] == 1
    policy = http.get("/models").json()["policy"]
    assert policy["canary"] is None and policy["shadow"] is None and policy["primary"] == "@champion"
    wait_until(lambda: http.post("/predict", json={"title": "x"}).json()["version"] == v2, 30, "the new champion")
    assert _replica_ids(ray_cluster["dashboard"]) == replicas  # no redeploy of the pool
    assert set(traffic.codes) == {200}, traffic.codes
    wait_until(lambda: _gauge(ray_cluster["metrics"], name, "promoted") == 1.0, 90, "ray_app_loop_state", interval=2)
    assert _gauge(ray_cluster["metrics"], name, "canary") == 0.0
    stopped = _cli(cfg, "stop")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert _loop(http) == {"state": "off"}


@pytest.mark.slow
def test_drill_a_challenger_trained_on_permuted_labels_is_rolled_back_on_the_labels(loop_env, ray_cluster):
    """The permuted-label version put through the loop by hand (`loop start --challenger`) against the retrained
    champion: it passes shadow (fast, no errors), then the canary's labelled answers roll it back; the champion
    answers every request throughout."""
    from bench.loop import Traffic

    env, cfg, http = loop_env, loop_env["cfg"], loop_env["http"]
    name, bad = cfg.registry.model_name, env["permuted_version"]
    champion = MlflowClient().get_model_version_by_alias(name, "champion").version
    assert champion != bad, "runs after the promotion drill"
    with Traffic(env["base"], cfg, env["data"], KEY) as traffic:
        started = _cli(cfg, "start", "--challenger", bad)
        assert started.returncode == 0, started.stderr[-3000:]
        final = wait_until(lambda: (s := _loop(http))["state"] == "rolled back" and s, 300, "rollback", interval=1)
    last = final["last"]
    print(f"DRILL loop: permuted-label challenger: {last['reason']}")
    assert last["challenger"] == bad and "accuracy" in last["reason"] and last["reason"].startswith("canary"), last
    assert MlflowClient().get_model_version_by_alias(name, "champion").version == champion
    assert MlflowClient().get_model_version(name, bad).tags["loop"].startswith("rolled back")
    assert _steps(cfg, last["cycle_run_id"]) == ["shadow", "canary 25 %"]
    policy = http.get("/models").json()["policy"]
    assert policy["canary"] is None and policy["canary_weight"] == 0 and policy["shadow"] is None
    assert set(traffic.codes) == {200}, traffic.codes
    assert _cli(cfg, "stop").returncode == 0
