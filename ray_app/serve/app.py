"""The Serve application builder that serve_config.yaml names: `import_path: ray_app.serve.app:build_app`.

No `from __future__ import annotations` here: Serve reads the builder's parameter annotation at run time and
validates the YAML `args` into `ServeArgs` only when the annotation is the class itself, not a string.
"""

from ray import serve
from ray.serve import Application

from ray_app.serve.ingress import Ingress
from ray_app.serve.settings import ServeArgs, TrafficPolicy

DEPLOYMENT = "Classifier"


def build_app(args: ServeArgs) -> Application:
    """One deployment: FastAPI routes and the multiplexed model pool in each replica (the traffic policy in its
    user_config). docs/serving.md says why one and not an ingress calling a pool deployment.

    Defaults here suit one laptop; serve_config.yaml overrides replicas, autoscaling and queue limits per cluster.
    Serve's own limits sit above the app's `max_queued_items` plus a running batch, so overload is answered by
    the app, in JSON (Serve's own refusal is plain text).
    """
    return serve.deployment(
        Ingress,
        name=DEPLOYMENT,
        max_ongoing_requests=512,
        max_queued_requests=512,
        ray_actor_options={"num_cpus": 0.5},
        health_check_period_s=10,
        user_config={"traffic": TrafficPolicy(primary=args.default_model).model_dump()},
    ).bind(args)  # the validated settings themselves: each replica gets them typed, not a dict to validate again
