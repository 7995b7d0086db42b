"""Change the served traffic policy (the Ingress deployment's `user_config.traffic`) on a running cluster, the way
`serve deploy` does: a PUT of `/api/serve/applications/` through Ray's own Serve client, which sends the Ray token
(`~/.ray/auth_token` or RAY_AUTH_TOKEN) as `serve deploy` does.

That PUT is declarative for the whole cluster: an application left out of it is deleted. So the body is the config
every application was deployed with (`deployed_app_config` of each, read back from the same API) plus the cluster's
HTTP and gRPC options, with only the one deployment's `user_config.traffic` changed. Serve then calls `reconfigure`
on the running replicas: nothing restarts, no model is loaded again.
"""

from __future__ import annotations

import copy
import time
from typing import Any

from ray_app.errors import AppError
from ray_app.serve.settings import TrafficPolicy

CHAMPION_ONLY = {"canary": None, "canary_weight": 0.0, "shadow": None}


def _client(dashboard: str):
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        return ServeSubmissionClient(dashboard)
    except Exception as exc:  # noqa: BLE001 - connection, version and auth failures come as several types
        raise AppError(f"Serve's REST API at {dashboard} cannot be reached: {str(exc).splitlines()[0]}") from None


def deployed_config(details: dict[str, Any]) -> dict[str, Any]:
    """The body that re-deploys what runs now: every application's deployed config and the cluster options."""
    apps = [a["deployed_app_config"] for a in details.get("applications", {}).values() if a.get("deployed_app_config")]
    body: dict[str, Any] = {"applications": copy.deepcopy(apps)}
    for key in ("proxy_location", "http_options", "grpc_options", "target_capacity"):
        if details.get(key) is not None:
            body[key] = copy.deepcopy(details[key])
    return body


def _deployment(body: dict[str, Any], app: str, deployment: str) -> dict[str, Any]:
    apps = [a for a in body["applications"] if a.get("name") == app]
    if not apps:
        raise AppError(f"no Serve application named {app!r} runs (loop.app_name); `serve deploy serve_config.yaml`")
    found = [d for d in apps[0].get("deployments", []) if d.get("name") == deployment]
    if not found:
        raise AppError(f"application {app!r} has no deployment {deployment!r} in its config (loop.deployment)")
    return found[0]


def with_traffic(body: dict[str, Any], app: str, deployment: str, change: dict[str, Any]) -> dict[str, Any]:
    """`body` with the deployment's traffic updated by `change`, validated as the replicas will validate it."""
    out = copy.deepcopy(body)
    target = _deployment(out, app, deployment)
    user_config = target.setdefault("user_config", {}) or {}
    current = user_config.get("traffic", {})
    user_config["traffic"] = TrafficPolicy.model_validate({**current, **change}).model_dump()
    target["user_config"] = user_config
    return out


def current_traffic(dashboard: str, app: str, deployment: str) -> dict[str, Any]:
    body = deployed_config(_client(dashboard).get_serve_details())
    traffic = (_deployment(body, app, deployment).get("user_config") or {}).get("traffic", {})
    return TrafficPolicy.model_validate(traffic).model_dump()


def set_traffic(dashboard: str, app: str, deployment: str, change: dict[str, Any], timeout_s: float = 60) -> dict:
    """Apply `change` (e.g. {"canary": "7", "canary_weight": 0.25}) and wait until Serve reports the application
    RUNNING with it; returns the policy now served. Applying the policy already served changes nothing."""
    client = _client(dashboard)
    body = deployed_config(client.get_serve_details())
    wanted = with_traffic(body, app, deployment, change)
    policy = _deployment(wanted, app, deployment)["user_config"]["traffic"]
    if wanted == body:
        return policy
    try:
        client.deploy_applications(wanted)
    except Exception as exc:  # noqa: BLE001 - the client raises RuntimeError with the server's message
        raise AppError(f"Serve refused the traffic change {change}: {str(exc).splitlines()[0]}") from None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        details = client.get_serve_details()
        status = details.get("applications", {}).get(app, {}).get("status")
        served = (_deployment(deployed_config(details), app, deployment).get("user_config") or {}).get("traffic")
        if status == "RUNNING" and served == policy:
            return policy
        time.sleep(0.5)
    raise AppError(f"Serve did not report {app} RUNNING with traffic {policy} within {timeout_s:.0f} s")
