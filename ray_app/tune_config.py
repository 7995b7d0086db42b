"""The search's settings (`tune` section): the space, the objectives, the study and the scheduler.

`TUNABLE` names what a search may change and where it lands in the configuration; a trial's values are applied to
a validated `AppConfig` with `model_copy(update=...)` (tune.apply_params), never re-parsed from a dict.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ray_app.config_base import Section

# What a search may change: its name in tune.space -> (section, key) of the configuration.
TUNABLE = {
    "lr": ("train", "lr"),
    "weight_decay": ("train", "weight_decay"),
    "warmup_ratio": ("train", "warmup_ratio"),
    "dropout": ("model", "dropout"),
    "batch_size": ("train", "batch_size"),
    "epochs": ("train", "epochs"),
    "max_length": ("data", "max_length"),
    "num_layers": ("model", "num_layers"),
}
# What the training loop reports each epoch, so a metric or objective name can be checked at load time.
METRICS = {
    "val_f1_weighted": "max", "val_f1_macro": "max", "val_accuracy": "max", "val_loss": "min", "train_loss": "min",
    "latency_p50_ms": "min", "param_count": "min",
}  # fmt: skip


class ParamSpec(Section):
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


class SelectConfig(Section):
    """Which Pareto-optimal trial is registered in multi-objective mode: among those whose `tune.metric` is within
    `within` of the best, the best by `prefer` (e.g. the fastest within 0.01 F1 of the best)."""

    within: float = Field(0.01, ge=0)
    prefer: str | None = Field(None, description="An objective; null: the best by tune.metric alone.")


class TuneConfig(Section):
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
