"""The Serve application builder that serve_config.yaml names: `import_path: ray_app.serve.app:build_app`.

No `from __future__ import annotations` here: Serve reads the builder's parameter annotation at run time and
validates the YAML `args` into `ServeArgs` only when the annotation is the class itself, not a string.
"""

from ray import serve
from ray.serve import Application

from ray_app.serve.ingress import Ingress
from ray_app.serve.pool import ModelPool
from ray_app.serve.settings import ServeArgs, TrafficPolicy


def build_app(args: ServeArgs) -> Application:
    """Two deployments: the FastAPI ingress (traffic policy in its user_config) and the multiplexed model pool.

    Defaults here suit one laptop; serve_config.yaml overrides replicas, autoscaling and queue limits per cluster.
    """
    batch = args.batch.max_batch_size
    pool = serve.deployment(
        ModelPool,
        name="ModelPool",
        # At least a full batch of single-item requests must be able to wait on one replica (the default of 5 would
        # cap every batch at 5), and a bounded queue beyond that answers overload fast instead of queueing forever.
        max_ongoing_requests=max(2 * batch, 8),
        max_queued_requests=4 * batch,
        ray_actor_options={"num_cpus": 0.5},
        health_check_period_s=10,
    ).bind(args.model_dump())
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        max_ongoing_requests=256,
        max_queued_requests=512,
        ray_actor_options={"num_cpus": 0.25},
        user_config={"traffic": TrafficPolicy(primary=args.default_model).model_dump()},
    ).bind(pool, args.model_dump())
    return ingress
