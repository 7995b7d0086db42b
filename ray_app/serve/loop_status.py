"""`GET /models`'s `loop` field: asks the model's loop controller (a named actor, loop_names.py) for its state,
without importing it. No controller is `off`; one that does not answer within a second is `unknown`, so the route
never waits on the loop."""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from ray_app.loop_names import NAMESPACE, actor_name


async def loop_status(model_name: str, timeout_s: float = 1.0) -> dict[str, Any]:
    try:
        actor = ray.get_actor(actor_name(model_name), namespace=NAMESPACE)
    except ValueError:
        return {"state": "off"}
    try:
        return await asyncio.wait_for(actor.status.remote(), timeout_s)
    except (asyncio.TimeoutError, ray.exceptions.RayError) as exc:
        return {"state": "unknown", "error": type(exc).__name__}
