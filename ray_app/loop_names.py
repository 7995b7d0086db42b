"""What the loop's controller and the Serve app both know of it: the named actor that is the loop of one model (its
name is also the lock: Ray's GCS registers a name once per namespace, so two loops never act on one model) and the
states it reports. The app asks that actor for `GET /models`'s `loop` field without importing the controller."""

from __future__ import annotations

NAMESPACE = "ray_app"
IDLE, CHECKING, RETRAINING, SHADOW, CANARY, GATE = "idle", "checking", "retraining", "shadow", "canary", "gate"
PROMOTED, ROLLED_BACK, HELD, FAILED, STOPPED = "promoted", "rolled back", "held", "failed", "stopped"
ACTIVE = (RETRAINING, SHADOW, CANARY, GATE)
OUTCOMES = (PROMOTED, ROLLED_BACK, HELD, FAILED, STOPPED)
STATES = (IDLE, CHECKING, *ACTIVE, *OUTCOMES)


def actor_name(model_name: str) -> str:
    return f"loop:{model_name}"
