"""The Serve application builder that serve_config.yaml names: `import_path: ray_app.serve.app:build_app`.

No `from __future__ import annotations` here: Serve reads the builder's parameter annotation at run time and
validates the YAML `args` into `ServeArgs` only when the annotation is the class itself, not a string.
"""

from ray import serve
from ray.serve import Application

from ray_app.serve.ingress import Ingress
from ray_app.serve.settings import ServeArgs, TrafficPolicy
from ray_app.serve.stream import StreamConsumer

DEPLOYMENT = "Classifier"
STREAM_DEPLOYMENT = "StreamConsumer"


def build_app(args: ServeArgs) -> Application:
    """One serving deployment: FastAPI routes and the multiplexed model pool in each replica (the traffic policy in
    its user_config). docs/serving.md says why one and not an ingress calling a pool deployment. With `stream` set,
    a second one, the stream consumer (stream.py): a fixed number of replicas that reserve no CPU (they wait on the
    broker and on the Classifier, which does the work), bound into the Classifier so the app deploys it.

    Defaults here suit one laptop; serve_config.yaml overrides replicas, autoscaling and queue limits per cluster.
    Serve's own limits sit above the app's `max_queued_items` plus a running batch, so overload is answered by
    the app, in JSON (Serve's own refusal is plain text).
    """
    stream = None
    if args.stream is not None:
        stream = serve.deployment(
            StreamConsumer,
            name=STREAM_DEPLOYMENT,
            num_replicas=args.stream.replicas,
            ray_actor_options={"num_cpus": 0},
            health_check_period_s=10,
        ).bind(args.stream, DEPLOYMENT)
    return serve.deployment(
        Ingress,
        name=DEPLOYMENT,
        max_ongoing_requests=512,
        max_queued_requests=512,
        ray_actor_options={"num_cpus": 0.5},
        health_check_period_s=10,
        user_config={"traffic": TrafficPolicy(primary=args.default_model).model_dump()},
    ).bind(
        args, stream
    )  # the validated settings themselves: each replica gets them typed, not a dict to validate again
