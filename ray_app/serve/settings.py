"""Typed settings of the Serve app: `args` of serve_config.yaml (fixed per deploy) and the deployment's `user_config`
(the traffic policy, changed live by re-deploying only the config)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from ray_app.config_base import DEFAULT_LABELS, MAX_TEXT_CHARS, Backend, Section
from ray_app.model_ids import parse_model_id


class BatchSettings(Section):
    """Batching in the model pool (batcher.py): a request that finds the replica idle runs at once; requests that
    queue while a forward pass runs go together in the next one. Sizes count items, so a 32-item request fills one."""

    removed: ClassVar[dict[str, str]] = {"enabled": "set max_batch_size: 1 for no batching (each request its own pass)"}

    mode: Literal["drain", "serve_batch"] = Field(
        "drain",
        description="drain: the pool's DrainBatcher; serve_batch: Ray's @serve.batch (cut when full or "
        "batch_wait_timeout_s after its first request), kept so bench/serve.py can compare the two in one run.",
    )
    max_batch_size: int = Field(
        32, ge=1, le=512, description="1 turns batching off: every request is its own forward pass, whatever its items."
    )
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        le=1,
        description="How long an idle replica waits for more requests before it runs the first; 0 runs at once "
        "(under load batches fill anyway, while the previous pass runs).",
    )
    chunk_items: int = Field(
        16,
        ge=1,
        description="A batch runs as length-sorted chunks of this many texts, so short texts are not padded to the "
        "longest of the whole batch (32 texts here: 8.4 ms per item in chunks of 16, 10.4 ms in one).",
    )


class PredictionLogSettings(Section):
    """Where every prediction goes (Parquet, written off the request path) and how long it is kept."""

    uri: str | None = Field(
        None, description="Directory or pyarrow filesystem URI (s3://, gs://); null turns the log off."
    )
    flush_rows: int = Field(256, ge=1, description="Write a file once this many rows are buffered ...")
    flush_interval_s: float = Field(5.0, gt=0, description="... or this long after the oldest buffered row.")
    store_text: bool = Field(True, description="False stores a SHA-256 of the text instead of the text.")
    retention_days: float | None = Field(30, gt=0, description="Files older than this are deleted; null keeps all.")
    max_bytes: int | None = Field(
        2_000_000_000, gt=0, description="Oldest files are deleted past this total size; null: no cap."
    )


class CacheSettings(Section):
    """Answers already given, per concrete version (NAME/VERSION, never an alias) and exact text: a repeated text
    skips the forward pass, and a promotion or rollback can never serve another version's answer."""

    enabled: bool = Field(False, description="Look every text up before predicting it, and keep what was predicted.")
    backend: Literal["local", "redis"] = Field(
        "local", description="local: an LRU in each replica; redis: one store shared by every replica (url, ttl_s)."
    )
    max_items: int = Field(10_000, ge=1, description="Most texts the local LRU keeps per replica (about 100 B each).")
    url: str | None = Field(None, description="redis://HOST:PORT/DB for backend redis.")
    ttl_s: int = Field(86_400, ge=1, description="How long Redis keeps an answer.")
    timeout_s: float = Field(
        0.05, gt=0, le=5, description="Redis connect and read timeout: past it the texts are predicted instead."
    )
    retry_s: float = Field(5.0, ge=0, description="After a Redis failure, how long texts skip it (a miss, counted).")

    @model_validator(mode="after")
    def _check(self) -> CacheSettings:
        if self.enabled and self.backend == "redis" and not self.url:
            raise ValueError("cache.backend redis needs cache.url (redis://HOST:PORT/DB)")
        return self


class StreamSettings(Section):
    """Predictions for a stream of requests on a Kafka-protocol broker (stream.py, docs/streaming.md): a consumer
    group inside the app that predicts through the same path as POST /predict and answers on another topic."""

    bootstrap_servers: str = Field(
        min_length=1,
        description="HOST:PORT of the broker (several: comma-separated); make run's local one is "
        "127.0.0.1:9092 (STREAM_PORT).",
    )
    input_topic: str = Field("predict-requests", min_length=1, description="Requests: JSON {request_id, title, ...}.")
    output_topic: str = Field("predictions", min_length=1, description="Results, keyed by the request id.")
    dead_letter_topic: str = Field(
        "predict-dead-letter",
        min_length=1,
        description="Requests that cannot be answered: original bytes, the error code and detail in headers.",
    )
    group_id: str = Field("ray-app-classifier", min_length=1, description="The consumer group: replicas share it.")
    replicas: int = Field(
        1,
        ge=1,
        description="StreamConsumer replicas (no CPU reserved); the group spreads the input topic's "
        "partitions over them, so replicas beyond the partition count idle.",
    )
    max_in_flight: int = Field(
        32,
        ge=1,
        description="Messages one consumer replica has in prediction at once (through the Classifier's "
        "handle, where batching gathers them).",
    )
    retry_for_s: float = Field(
        300,
        gt=0,
        description="How long a message that gets another 503 than `overloaded` (registry_busy, "
        "registry_unavailable, model_unavailable) or finds no Classifier replica is retried before it is "
        "dead-lettered with that code. `overloaded` is waited out for as long as it lasts (pause and resume).",
    )
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group without committed offsets starts: earliest answers the backlog."
    )
    session_timeout_ms: int = Field(
        10_000,
        ge=1_000,
        description="The group's session timeout. Tansu holds a new group's first assignment "
        "for half of it; Kafka brokers refuse less than their group.min.session.timeout.ms (6000 by default).",
    )
    producer_batch_bytes: int = Field(
        16_384,
        ge=1,
        description="aiokafka's max_batch_size for results and dead letters; 1 sends one record per "
        "batch, the only way Tansu 0.6 reports a topic's end offsets (and so a reader's lag) right.",
    )
    lag_interval_s: float = Field(5.0, gt=0, description="How often consumer lag per partition is measured.")


class ServeArgs(Section):
    """`args` of the application in serve_config.yaml."""

    tracking_uri: str | None = Field(None, description="MLflow server; null: MLFLOW_TRACKING_URI or 127.0.0.1:5000.")
    model_name: str = Field("projects-classifier", description="The registered model a bare version or alias means.")
    default_model: str = Field("@champion", description="What a request that names no model gets (and /ready).")
    alias_ttl_s: float = Field(5.0, ge=0, description="How long an alias -> version answer is cached.")
    labels: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LABELS),
        min_length=2,
        description="The labels the API promises (the enum of /openapi.json); a version trained on another set is "
        "not served (503 model_unavailable). The training config's data.labels.",
    )
    max_models_per_replica: int = Field(3, ge=1)
    max_items: int = Field(32, ge=1, description="Most items in one /predict request.")
    max_text_chars: int = Field(MAX_TEXT_CHARS, ge=1, description="Most characters in one title or description.")
    max_body_bytes: int = Field(
        1_000_000, ge=1_000, description="Larger request bodies get 413, counted as they arrive (chunked too)."
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="A body that has not fully arrived this long after the request started gets 408."
    )
    text_columns: list[str] = Field(default_factory=lambda: ["title", "description"], min_length=1)
    torch_threads: int = Field(2, ge=1, description="Torch threads per replica.")
    max_queued_items: int = Field(
        256,
        ge=1,
        description="Items that may wait for a forward pass in one replica; a request beyond them is refused at once "
        "with a JSON 503 `overloaded` and Retry-After.",
    )
    max_queue_wait_s: float = Field(
        1.0,
        gt=0,
        description="Seconds of work (at the rate of recent forward passes) that may wait in one replica; a request "
        "beyond them gets the same 503. This bound is what keeps admitted requests fast under overload.",
    )
    batch: BatchSettings = Field(default_factory=BatchSettings)
    prediction_log: PredictionLogSettings = Field(default_factory=PredictionLogSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    api_key_env: str | None = Field(
        "RAY_APP_API_KEY", description="Env var holding the API key; when it is set, every route but /health needs it."
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 503 on overload.")
    require_lineage: bool = Field(
        True,
        description="Serve only versions the pipeline registered: its lineage tags and a test evaluation on the "
        "version's run (registry_auth.LINEAGE_TAGS); any other version is 403 model_refused. False serves any "
        "registered version (models registered by hand).",
    )
    registry_credentials: str | None = Field(
        None,
        description="A file on each node (mode 0600, MLflow's credentials format) with the MLflow user serving "
        "reads the registry as (the reader, on a protected registry); null: the file RAY_APP_MLFLOW_CREDENTIALS "
        "names, or no user.",
    )
    backend: Backend = Field(
        "fp32",
        description="How pool replicas run a version: fp32 (torch, as trained; on the replica's GPU when it has "
        "one), torch-int8, onnx-fp32 or onnx-int8 (ONNX Runtime) on CPU, or cuda-fp16 (half precision; a replica "
        "with num_gpus). Used for a version only when its weighted F1 on the version's frozen test rows is within "
        "backend_max_f1_drop of fp32 (checked once per version, stored with it); fp32 otherwise.",
    )
    backend_max_f1_drop: float = Field(0.005, ge=0, le=1, description="Largest weighted-F1 drop a backend may have.")
    stream: StreamSettings | None = Field(
        None, description="A Kafka-protocol stream of requests answered beside HTTP (docs/streaming.md); null: off."
    )

    @model_validator(mode="after")
    def _check(self) -> ServeArgs:
        parse_model_id(self.default_model, self.model_name)
        batching = self.batch.max_batch_size > 1 or self.batch.mode == "serve_batch"
        if batching and self.max_items > self.batch.max_batch_size:
            raise ValueError(
                f"max_items {self.max_items} exceeds batch.max_batch_size {self.batch.max_batch_size}: "
                "one request must fit in one batch (or set max_batch_size: 1, no batching)"
            )
        if self.max_items > self.max_queued_items:
            raise ValueError(
                f"max_items {self.max_items} exceeds max_queued_items {self.max_queued_items}: "
                "a full request must fit in an empty queue"
            )
        return self


class CanaryGuard(Section):
    """Limits that take a canary out of the split on their own, judged on its recent requests in each replica: looser
    than the promotion bar of `ray-app canary-report` (config.CanaryConfig), which a canary must meet to be promoted."""

    max_error_rate: float = Field(0.05, ge=0, le=1)
    max_p99_ms: float = Field(500, gt=0)
    min_requests: int = Field(20, ge=1, description="Requests the canary must have served before it is judged.")
    window: int = Field(200, ge=10, description="Recent canary requests the limits look at.")


class TrafficPolicy(Section):
    """The deployment's `user_config`. A request that names a model bypasses all of it."""

    primary: str = Field("@champion", description="Model id most traffic gets.")
    canary: str | None = Field(None, description="Model id that gets `canary_weight` of callers.")
    canary_weight: float = Field(0.0, ge=0, le=1)
    shadow: str | None = Field(None, description="Model id that also predicts every primary request, logged only.")
    sticky_header: str = Field("X-User-Id", description="Callers with the same value always get the same model.")
    guard: CanaryGuard = Field(default_factory=CanaryGuard)

    @model_validator(mode="after")
    def _check(self) -> TrafficPolicy:
        for ref in (self.primary, self.canary, self.shadow):
            if ref is not None:
                parse_model_id(ref, "default")
        if self.canary_weight > 0 and self.canary is None:
            raise ValueError("canary_weight > 0 needs a canary model id")
        return self
