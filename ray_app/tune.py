"""Hyperparameter search: Ray Tune runs one function trainable per trial, which runs the project's TorchTrainer and
reports every epoch back through Ray Train's Tune callback. Optuna proposes trials from a persistent RDB study;
ASHA stops weak trials early. One MLflow parent run for the search, one nested child run per trial.

A study outlives a search: `resume` adds trials to it (and restores an interrupted Tune experiment), and a new
study can start from an earlier one's finished trials (`warm_start_from`). Each Optuna trial carries the Tune trial
id, the MLflow parent run and its best checkpoint as user attributes, so any trial of the study leads back to both.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
import optuna
from mlflow.tracking import MlflowClient
from ray.tune.search.optuna import OptunaSearch

from ray_app.config import AppConfig
from ray_app.data import Splits
from ray_app.drills import FailureDrill
from ray_app.errors import AppError
from ray_app.resources import worker_threads
from ray_app.runtime import Tracking
from ray_app.storage import checkpoint_uri
from ray_app.study import (
    CHECKPOINT_PATH_KEY,
    enqueue_first_points,
    fail_orphans,
    make_sampler,
    open_storage,
    pareto_front,
    prepare_study,
    safe_url,
    select_from_front,
)
from ray_app.tune_config import TUNABLE, TuneConfig
from ray_app.tune_results import TRIAL_TAG, log_parent, record_trials

log = logging.getLogger("ray_app")
STUDY_TAG = "ray_app.study"
EXPERIMENT_TAG = "ray_app.tune_experiment"
LATENCY = "latency_p50_ms"


@dataclass
class SearchResult:
    parent_run_id: str
    best_trial_id: str
    best_params: dict[str, Any]
    best_metrics: dict[str, float]
    best_checkpoint_path: str
    trials: list[dict[str, Any]]
    duration_s: float
    study: dict[str, Any] = field(default_factory=dict)
    experiment_path: str = ""
    restored: bool = False
    pareto_front: list[dict[str, Any]] | None = None
    selection: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrackedOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch that also writes, on each Optuna trial, the Tune trial id, the search's MLflow parent run
    and the trial's best checkpoint (by `rank_metric`) before telling the result: Optuna trials cannot be changed
    once finished, and without these a study's Pareto front or best trial cannot be traced to a model."""

    def __init__(self, *args: Any, search_run: str, rank_metric: str, rank_mode: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._search_run, self._rank_metric, self._rank_mode = search_run, rank_metric, rank_mode
        self._best_checkpoint: dict[str, tuple[float, str]] = {}

    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        self._set_attrs(trial_id, {"tune_trial_id": trial_id, "search_run": self._search_run})
        return params

    def _set_attrs(self, trial_id: str, attrs: dict[str, Any]) -> None:
        """A restored experiment can re-run a trial that Optuna already recorded as finished (it ended after the
        last experiment snapshot); that trial keeps what it has."""
        try:
            for key, value in attrs.items():
                self._ot_trials[trial_id].set_user_attr(key, value)
        except optuna.exceptions.UpdateFinishedTrialError:
            log.warning("Optuna trial of Tune trial %s already finished; keeping its record", trial_id)

    def _track(self, trial_id: str, result: dict | None) -> None:
        value, path = (result or {}).get(self._rank_metric), (result or {}).get(CHECKPOINT_PATH_KEY)
        if path and value is not None and math.isfinite(value):
            best = self._best_checkpoint.get(trial_id)
            # ties go to the later epoch: Ray Train's retention (keep the best N) drops the earlier one first
            if best is None or (value >= best[0] if self._rank_mode == "max" else value <= best[0]):
                self._best_checkpoint[trial_id] = (value, path)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self._track(trial_id, result)
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Tune hands a trial's last result (its final epoch, or the one its scheduler stopped it at) only to this
        # hook, not to on_trial_result.
        self._track(trial_id, result)
        if trial_id in self._best_checkpoint and trial_id not in self._completed_trials:
            value, path = self._best_checkpoint[trial_id]
            self._set_attrs(trial_id, {CHECKPOINT_PATH_KEY: path, f"best_{self._rank_metric}": value})
        super().on_trial_complete(trial_id, result=result, error=error)


def uri_report_callback(storage_path: str):
    """Ray's TuneReportCallback, the checkpoint reported by its URI (storage.checkpoint_uri): with S3 storage Ray
    reports `bucket/...` without the scheme, and the search's driver then finds no checkpoint to register."""
    from types import SimpleNamespace

    from ray.tune.integration.ray_train import TuneReportCallback

    class UriTuneReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            named = SimpleNamespace(path=checkpoint_uri(checkpoint.path, storage_path)) if checkpoint else None
            super().after_report(run_context, metrics, named)

    return UriTuneReportCallback()


def apply_params(cfg: AppConfig, params: dict[str, Any]) -> AppConfig:
    """A copy of the config with the trial's values written to the keys they tune (lr -> train.lr, ...)."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in params.items():
        section, key = TUNABLE[name]
        sections.setdefault(section, {})[key] = value
    return cfg.replace(**sections)


def search_space(tc: TuneConfig) -> dict[str, Any]:
    from ray import tune

    makers = {
        "loguniform": lambda s: tune.loguniform(s.low, s.high),
        "uniform": lambda s: tune.uniform(s.low, s.high),
        "int": lambda s: tune.randint(int(s.low), int(s.high) + 1),
        "choice": lambda s: tune.choice(s.values),
    }
    return {name: makers[spec.kind](spec) for name, spec in tc.space.items()}


def run_trial(
    params: dict[str, Any],
    *,
    base: AppConfig,
    splits: Splits,
    tracking: Tracking,
    parent_run_id: str,
    drill: FailureDrill | None = None,
) -> None:
    """One trial: the project's TorchTrainer with these values, logging to its own nested MLflow run (the same one
    again when a restored experiment starts this trial anew). `base` arrives validated; only the values change."""
    from ray import tune

    from ray_app.train import build_trainer

    cfg = apply_params(base, params)
    trial_id = tune.get_context().get_trial_id()
    from ray_app.registry_auth import use_node_credentials

    use_node_credentials()  # a trial's process: the node's MLflow user, as the driver has it
    client = MlflowClient(tracking.uri)
    earlier = client.search_runs(
        [tracking.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    if earlier:
        child_id = earlier[0].info.run_id
    else:
        child_id = client.create_run(
            tracking.experiment_id,
            run_name=f"trial-{trial_id}",
            tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id},
        ).info.run_id
        for name, value in params.items():
            client.log_param(child_id, name, value)
    wants_latency = LATENCY in cfg.tune.directions or cfg.tune.metric == LATENCY
    trainer = build_trainer(
        cfg, splits, f"trial-{parent_run_id[:8]}-{trial_id}", tracking.uri, child_id,
        callbacks=[uri_report_callback(cfg.train.storage_path)], measure_latency=wants_latency,
        drill=drill.for_trial(params) if drill else None,
    )  # fmt: skip
    trainer.fit()


def _max_concurrent(cfg: AppConfig) -> int:
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    # What a trial computes with, not only what it reserves: trials beside each other share the same cores.
    per_trial = cfg.train.num_workers * max(cfg.train.cpus_per_worker, worker_threads(cfg.train))
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def experiment_path(cfg: AppConfig, parent_run_id: str) -> str:
    """Where Tune keeps this search's experiment: one directory per parent run, so a re-run of an interrupted
    search finds it (Tuner.can_restore) and a later search on the same study never collides with it."""
    import os

    return os.path.join(_storage(cfg), f"tune-{cfg.tune.study_name}-{parent_run_id[:8]}")


def find_interrupted_search(cfg: AppConfig, tracking: Tracking) -> mlflow.entities.Run | None:
    """The latest parent run of this study whose driver died mid-search (still RUNNING) and whose Tune experiment
    can be restored."""
    from ray import tune

    runs = MlflowClient().search_runs(
        [tracking.experiment_id],
        f"tags.`{STUDY_TAG}` = '{cfg.tune.study_name}' and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if runs and tune.Tuner.can_restore(runs[0].data.tags.get(EXPERIMENT_TAG, "")):
        return runs[0]
    return None


def run_search(cfg: AppConfig, tracking: Tracking, splits: Splits, drill: FailureDrill | None = None) -> SearchResult:
    """Search inside the active MLflow run (the parent); returns the best trial and its best checkpoint. A parent
    run whose experiment exists already (a re-run after the driver died) restores it with Tuner.restore."""
    from ray import tune

    tc = cfg.tune
    started = time.perf_counter()
    parent = mlflow.active_run().info.run_id
    storage = open_storage(tc)
    distributions = OptunaSearch.convert_search_space(search_space(tc))
    study = prepare_study(tc, storage, distributions)
    trials_before = len(study.trials)
    path = experiment_path(cfg, parent)
    mlflow.set_tags({STUDY_TAG: tc.study_name, EXPERIMENT_TAG: path, "ray_app.optuna_storage": safe_url(tc.storage)})
    trainable = tune.with_resources(
        # The trial's own function holds no CPU, so its training workers get them all; Tune rejects an empty request,
        # hence a token amount of memory.
        tune.with_parameters(
            run_trial, base=cfg, splits=splits, tracking=tracking, parent_run_id=parent, drill=drill,
        ),
        {"cpu": 0, "memory": 64 * 2**20},
    )  # fmt: skip
    restored = tune.Tuner.can_restore(path)
    if restored:
        log.info("restoring the interrupted Tune experiment %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        queued = enqueue_first_points(study, cfg)
        log.info("study %s: %d trials so far; first points queued: %s", tc.study_name, trials_before, queued)
        tuner = _new_tuner(cfg, trainable, storage, parent, trials_before, path)
    grid = tuner.fit()
    fail_orphans(study, parent)
    trials = record_trials(grid, cfg, tracking, parent)
    if not any(t["status"] != "failed" for t in trials):
        raise AppError(f"every trial of the search failed; see the Ray job log ({trials[0]['error']})")
    study = optuna.load_study(study_name=tc.study_name, storage=storage)
    summary = {"name": tc.study_name, "storage": safe_url(tc.storage), "trials_before": trials_before,
               "trials_after": len(study.trials), "objectives": tc.directions}  # fmt: skip
    chosen = _choose(grid, study, cfg)
    log_parent(trials, chosen, study, tc)
    return SearchResult(
        parent_run_id=parent, trials=trials, duration_s=round(time.perf_counter() - started, 2), study=summary,
        experiment_path=path, restored=restored, **chosen,
    )  # fmt: skip


def _new_tuner(cfg: AppConfig, trainable, storage, parent: str, trials_before: int, path: str):
    import os

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    multi = bool(tc.objectives)
    search = TrackedOptunaSearch(
        metric=list(tc.directions) if multi else tc.metric, mode=list(tc.directions.values()) if multi else tc.mode,
        sampler=make_sampler(tc, trials_before), study_name=tc.study_name, storage=storage,
        search_run=parent, rank_metric=tc.metric, rank_mode=tc.mode,
    )  # fmt: skip
    spec = tc.space.get("epochs")
    max_epochs = cfg.train.epochs if spec is None else int(max(spec.values) if spec.kind == "choice" else spec.high)
    scheduler = (
        # ASHA ranks on tune.metric alone; in multi-objective mode a stopped trial still reports every objective at
        # its last epoch (latency and size are measured every epoch), so Optuna gets all its values.
        ASHAScheduler(time_attr="epoch", metric=tc.metric, mode=tc.mode, max_t=max_epochs,
                      grace_period=tc.grace_period, reduction_factor=tc.reduction_factor)
        if tc.scheduler == "asha" else FIFOScheduler()
    )  # fmt: skip
    return tune.Tuner(
        trainable,
        param_space=search_space(tc),
        tune_config=tune.TuneConfig(
            search_alg=search, scheduler=scheduler, num_samples=tc.num_samples,
            max_concurrent_trials=_max_concurrent(cfg),
        ),
        run_config=tune.RunConfig(name=os.path.basename(path), storage_path=os.path.dirname(path)),
    )  # fmt: skip


def _choose(grid, study: optuna.Study, cfg: AppConfig) -> dict[str, Any]:
    """The trial to register: the best by tune.metric in this search, or in multi-objective mode the Pareto-optimal
    trial that tune.select picks."""
    tc = cfg.tune
    if tc.objectives:
        return _choose_from_front(study, tc)
    best = grid.get_best_result(metric=tc.metric, mode=tc.mode, scope="all", filter_nan_and_inf=True)
    history = best.metrics_dataframe.dropna(subset=[tc.metric, CHECKPOINT_PATH_KEY])
    # Best epoch first, the later of equal epochs first; the first whose checkpoint Ray Train's retention kept.
    ranked = history.assign(_order=range(len(history))).sort_values(
        [tc.metric, "_order"], ascending=[tc.mode == "min", False]
    )
    kept = [row for _, row in ranked.iterrows() if checkpoint_exists(str(row[CHECKPOINT_PATH_KEY]))]
    if not kept:
        raise AppError(f"no checkpoint of the best trial {best.path} is left on storage; see the trials table")
    best_row = kept[0].drop("_order")
    return {
        "best_trial_id": str(best.metrics.get("trial_id")),
        "best_params": dict(best.config),
        "best_metrics": {k: float(v) for k, v in best_row.items() if isinstance(v, (int, float)) and k != "trial_id"},
        "best_checkpoint_path": str(best_row[CHECKPOINT_PATH_KEY]),
    }


def _choose_from_front(study: optuna.Study, tc: TuneConfig) -> dict[str, Any]:
    front = pareto_front(study, tc)
    usable = [r for r in front if r[CHECKPOINT_PATH_KEY] and checkpoint_exists(r[CHECKPOINT_PATH_KEY])]
    if not usable:
        raise AppError(f"no Pareto-optimal trial of study {tc.study_name!r} has a checkpoint; see the trials table")
    pick = select_from_front(usable, tc)
    rule = (f"among Pareto-optimal trials with {tc.metric} within {tc.select.within} of the best, "
            + (f"the best {tc.select.prefer}" if tc.select.prefer else f"the best {tc.metric}"))  # fmt: skip
    log.info("Pareto front: %d trials; selected trial %s (%s)", len(front), pick["number"], rule)
    return {
        "best_trial_id": str(pick["tune_trial_id"]),
        "best_params": pick["params"],
        "best_metrics": {m: float(pick[m]) for m in tc.directions},
        "best_checkpoint_path": pick[CHECKPOINT_PATH_KEY],
        "pareto_front": front,
        "selection": f"trial {pick['number']}: {rule}",
    }


def checkpoint_exists(path: str) -> bool:
    """Whether a checkpoint directory is still on storage (local or a pyarrow filesystem URI such as s3://)."""
    import pyarrow.fs

    try:
        fs, inner = pyarrow.fs.FileSystem.from_uri(path if "://" in path else f"file://{path}")
        return fs.get_file_info(inner).type == pyarrow.fs.FileType.Directory
    except (OSError, ValueError):
        return False


def _storage(cfg: AppConfig) -> str:
    from pathlib import Path

    path = cfg.train.storage_path
    return path if "://" in path else str(Path(path).expanduser().resolve())
