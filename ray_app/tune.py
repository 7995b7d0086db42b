"""Hyperparameter search: Ray Tune runs one function trainable per trial, which runs the project's TorchTrainer and
reports every epoch back through Ray Train's Tune callback. Optuna proposes trials from a persistent RDB study;
ASHA stops weak trials early. One MLflow parent run for the search, one nested child run per trial."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from ray_app.config import TUNABLE, AppConfig, TuneConfig
from ray_app.data import Splits
from ray_app.errors import AppError
from ray_app.runtime import Tracking

log = logging.getLogger("ray_app")
TRIAL_TAG = "ray_app.trial_id"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what ray.tune.integration.ray_train.TuneReportCallback adds


@dataclass
class SearchResult:
    parent_run_id: str
    best_trial_id: str
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    best_checkpoint_path: str
    trials: list[dict[str, Any]]
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def apply_params(cfg: AppConfig, params: dict[str, Any]) -> AppConfig:
    """A copy of the config with the trial's values written to the keys they tune (lr -> train.lr, ...)."""
    tree = cfg.model_dump()
    for name, value in params.items():
        section, key = TUNABLE[name].split(".")
        tree[section][key] = value
    return AppConfig.model_validate(tree)


def search_space(tc: TuneConfig) -> dict[str, Any]:
    from ray import tune

    makers = {
        "loguniform": lambda s: tune.loguniform(s.low, s.high),
        "uniform": lambda s: tune.uniform(s.low, s.high),
        "int": lambda s: tune.randint(int(s.low), int(s.high) + 1),
        "choice": lambda s: tune.choice(s.values),
    }
    return {name: makers[spec.kind](spec) for name, spec in tc.space.items()}


def default_point(cfg: AppConfig) -> dict[str, Any] | None:
    """The current config as the first trial, when it lies inside the space: the search starts from a known point."""
    tree, point = cfg.model_dump(), {}
    for name, spec in cfg.tune.space.items():
        section, key = TUNABLE[name].split(".")
        value = tree[section][key]
        inside = value in spec.values if spec.kind == "choice" else value is not None and spec.low <= value <= spec.high
        if not inside:
            return None
        point[name] = value
    return point


def open_storage(tc: TuneConfig):
    """The Optuna study's RDB storage; an unreachable URL fails here, before any trial starts."""
    import optuna

    try:
        return optuna.storages.RDBStorage(tc.storage)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many types; the message names the URL
        raise AppError(f"Optuna storage {tc.storage!r} cannot be opened: {str(exc).splitlines()[0]}") from None


def make_sampler(tc: TuneConfig):
    import optuna

    return optuna.samplers.TPESampler(seed=tc.seed) if tc.sampler == "tpe" else optuna.samplers.RandomSampler(tc.seed)


def run_trial(params: dict[str, Any], *, base: dict, splits: Splits, tracking: dict, parent_run_id: str) -> None:
    """One trial: the project's TorchTrainer with these values, logging to its own nested MLflow run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_app.train import build_trainer

    cfg = apply_params(AppConfig.model_validate(base), params)
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(tracking["uri"])
    child = client.create_run(
        tracking["experiment_id"],
        run_name=f"trial-{trial_id}",
        tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id},
    )
    for name, value in params.items():
        client.log_param(child.info.run_id, name, value)
    trainer = build_trainer(
        cfg, splits, f"trial-{parent_run_id[:8]}-{trial_id}", tracking["uri"], child.info.run_id,
        callbacks=[TuneReportCallback()],
    )  # fmt: skip
    trainer.fit()


def _max_concurrent(cfg: AppConfig) -> int:
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def trial_status(result, epochs: int) -> str:
    """Tune's view, since Optuna records an ASHA-stopped trial as complete."""
    if result.error is not None:
        return "failed"
    last = result.metrics or {}
    if last.get("epoch", 0) < epochs and not last.get("early_stopped"):
        return "stopped_early"
    return "completed"


def run_search(cfg: AppConfig, tracking: Tracking, splits: Splits) -> SearchResult:
    """Search inside the active MLflow run (the parent); returns the best trial and its best checkpoint."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    tc = cfg.tune
    started = time.perf_counter()
    parent = mlflow.active_run().info.run_id
    point = default_point(cfg)
    search = OptunaSearch(
        metric=tc.metric, mode=tc.mode, sampler=make_sampler(tc), study_name=tc.study_name,
        storage=open_storage(tc), points_to_evaluate=[point] if point else None,
    )  # fmt: skip
    spec = tc.space.get("epochs")
    max_epochs = cfg.train.epochs if spec is None else int(max(spec.values) if spec.kind == "choice" else spec.high)
    scheduler = (
        ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=tc.grace_period,
                      reduction_factor=tc.reduction_factor)
        if tc.scheduler == "asha" else FIFOScheduler()
    )  # fmt: skip
    trainable = tune.with_parameters(
        run_trial, base=cfg.model_dump(), splits=splits,
        tracking={"uri": tracking.uri, "experiment_id": tracking.experiment_id}, parent_run_id=parent,
    )  # fmt: skip
    tuner = tune.Tuner(
        # The trial's own function holds no CPU, so its training workers get them all; Tune rejects an empty request,
        # hence a token amount of memory.
        tune.with_resources(trainable, {"cpu": 0, "memory": 64 * 2**20}),
        param_space=search_space(tc),
        tune_config=tune.TuneConfig(
            metric=tc.metric, mode=tc.mode, search_alg=search, scheduler=scheduler,
            num_samples=tc.num_samples, max_concurrent_trials=_max_concurrent(cfg),
        ),
        run_config=tune.RunConfig(name=f"tune-{parent[:8]}", storage_path=_storage(cfg)),
    )  # fmt: skip
    grid = tuner.fit()
    trials = _record_trials(grid, cfg, tracking, parent)
    if not any(t["status"] != "failed" for t in trials):
        raise AppError(f"every trial of the search failed; see the Ray job log ({trials[0]['error']})")
    best = grid.get_best_result(metric=tc.metric, mode=tc.mode, scope="all", filter_nan_and_inf=True)
    history = best.metrics_dataframe
    best_row = history.loc[history[tc.metric].idxmax() if tc.mode == "max" else history[tc.metric].idxmin()]
    _log_parent(trials, best.config, best_row, tc)
    return SearchResult(
        parent_run_id=parent,
        best_trial_id=str(best.metrics.get("trial_id")),
        best_params=dict(best.config),
        best_metrics={k: float(v) for k, v in best_row.items() if isinstance(v, (int, float)) and k != "trial_id"},
        best_checkpoint_path=str(best_row[CHECKPOINT_PATH_KEY]),
        trials=trials,
        duration_s=round(time.perf_counter() - started, 2),
    )


def _storage(cfg: AppConfig) -> str:
    from pathlib import Path

    path = cfg.train.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())


def _record_trials(grid, cfg: AppConfig, tracking: Tracking, parent: str) -> list[dict[str, Any]]:
    """Status, params, best metric and duration per trial, also written to each nested run."""
    client = MlflowClient()
    children = {
        r.data.tags.get(TRIAL_TAG): r.info.run_id
        for r in client.search_runs([tracking.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    }
    rows = []
    for result in grid:
        trial_id = str((result.metrics or {}).get("trial_id") or result.path.rsplit("_", 2)[-2])
        epochs = int(result.config.get("epochs", cfg.train.epochs))
        status = trial_status(result, epochs)
        frame = result.metrics_dataframe if result.metrics_dataframe is not None else pd.DataFrame()
        best = frame[cfg.tune.metric].max() if cfg.tune.metric in frame else float("nan")
        row = {"trial_id": trial_id, "status": status, **result.config, "best_" + cfg.tune.metric: best,
               "epochs_run": int(frame["epoch"].max()) if "epoch" in frame else 0,
               "duration_s": float((result.metrics or {}).get("time_total_s", 0.0)),
               "error": str(result.error).splitlines()[0] if result.error else ""}  # fmt: skip
        rows.append(row)
        run_id = children.get(trial_id)
        if run_id:
            client.set_tag(run_id, "trial_status", status)
            client.log_metric(run_id, "duration_s", row["duration_s"])
            client.set_terminated(run_id, {"failed": "FAILED", "stopped_early": "KILLED"}.get(status, "FINISHED"))
    return rows


def _log_parent(trials: list[dict], best_params: dict, best_row: pd.Series, tc: TuneConfig) -> None:
    """Best params and metrics, the trials table, and Optuna's own plots of the persistent study."""
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    mlflow.log_params({f"best.{k}": v for k, v in best_params.items()})
    mlflow.log_metrics({f"best_{k}": float(v) for k, v in best_row.items()
                        if isinstance(v, (int, float)) and k.startswith(("val_", "train_"))})  # fmt: skip
    mlflow.log_text(pd.DataFrame(trials).to_csv(index=False), "tune/trials.csv")
    counts = pd.Series([t["status"] for t in trials]).value_counts().to_dict()
    mlflow.log_metrics({f"trials_{status}": n for status, n in counts.items()})
    study = optuna.load_study(study_name=tc.study_name, storage=tc.storage)
    plots = {"optimization_history": ovm.plot_optimization_history, "parallel_coordinate": ovm.plot_parallel_coordinate}
    if len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) >= 2 and len(tc.space) >= 2:
        plots["param_importances"] = ovm.plot_param_importances
    for name, plot in plots.items():
        try:
            ax = plot(study)
        except (ValueError, RuntimeError) as exc:  # e.g. too few finished trials for importances
            log.warning("skipped the %s plot: %s", name, exc)
            continue
        fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
        fig.set_size_inches(9, 5)
        mlflow.log_figure(fig, f"tune/{name}.png")
        plt.close(fig)
