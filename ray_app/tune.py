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
import pandas as pd
from mlflow.tracking import MlflowClient
from ray.tune.search.optuna import OptunaSearch

from ray_app.config import TUNABLE, AppConfig, TuneConfig
from ray_app.data import Splits
from ray_app.errors import AppError
from ray_app.runtime import Tracking

log = logging.getLogger("ray_app")
TRIAL_TAG = "ray_app.trial_id"
STUDY_TAG = "ray_app.study"
EXPERIMENT_TAG = "ray_app.tune_experiment"
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what ray.tune.integration.ray_train.TuneReportCallback adds
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
        if not spec.contains(value):
            return None
        point[name] = value
    return point


def open_storage(tc: TuneConfig):
    """The Optuna study's RDB storage; an unreachable URL fails here, before any trial starts."""
    try:
        return optuna.storages.RDBStorage(tc.storage)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many types; the message names the URL
        first_line = str(exc).splitlines()[0]
        raise AppError(f"Optuna storage {_safe_url(tc.storage)!r} cannot be opened: {first_line}") from None


def _safe_url(url: str) -> str:
    """The storage URL with any password hidden, for messages and MLflow."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy can parse; it has no password part to hide either
        return url


def make_sampler(tc: TuneConfig, offset: int = 0):
    """Seeded by tune.seed plus the trials the study already has: a resumed study must not replay the same draws."""
    seed = tc.seed + offset
    if tc.sampler == "random":
        return optuna.samplers.RandomSampler(seed)
    return optuna.samplers.TPESampler(n_startup_trials=tc.tpe_startup_trials, seed=seed)


def _describe(study: optuna.Study) -> str:
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    return ", ".join(f"{n} ({d.name.lower()})" for n, d in zip(names, study.directions, strict=True))


def _check_objectives(study: optuna.Study, tc: TuneConfig, storage_url: str) -> None:
    """A study keeps the objectives it was created with; mixing others in would rank trials on different things."""
    wanted = [("maximize" if m == "max" else "minimize") for m in tc.directions.values()]
    same_directions = [d.name.lower() for d in study.directions] == wanted
    same_names = study.metric_names is None or list(study.metric_names) == list(tc.directions)
    if not (same_directions and same_names):
        this = ", ".join(f"{m} ({'maximize' if d == 'max' else 'minimize'})" for m, d in tc.directions.items())
        raise AppError(
            f"Optuna study {study.study_name!r} in {_safe_url(storage_url)} optimizes {_describe(study)}, but this "
            f"search optimizes {this}; set tune.study_name to a new study, or set tune.metric/tune.objectives back "
            "to the study's objectives"
        )


def _load_study(storage, name: str) -> optuna.Study | None:
    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        return None


def prepare_study(tc: TuneConfig, storage, distributions: dict[str, Any]) -> optuna.Study:
    """The study this search adds to, checked before any trial starts: the same objectives, and trials only with
    `resume`; a new study can start from an earlier study's finished trials."""
    study = _load_study(storage, tc.study_name)
    if study is not None:
        _check_objectives(study, tc, tc.storage)
        if study.trials and not tc.resume:
            raise AppError(
                f"Optuna study {tc.study_name!r} in {_safe_url(tc.storage)} already has {len(study.trials)} trials; "
                f"pass --resume (tune.resume=true) to continue it, or set tune.study_name to a new name "
                f"(tune.warm_start_from={tc.study_name} starts the new study from its trials)"
            )
        return study
    source = _warm_start_source(tc, storage) if tc.warm_start_from else None  # checked before creating anything
    directions = [("maximize" if m == "max" else "minimize") for m in tc.directions.values()]
    study = optuna.create_study(storage=storage, study_name=tc.study_name, directions=directions)
    study.set_metric_names(list(tc.directions))
    if source is not None:
        warm_start(study, source, tc, distributions)
    return study


def _warm_start_source(tc: TuneConfig, storage) -> optuna.Study:
    source = _load_study(storage, tc.warm_start_from)
    if source is None:
        names = optuna.study.get_all_study_names(storage)
        raise AppError(f"tune.warm_start_from: no study {tc.warm_start_from!r} in {_safe_url(tc.storage)}; "
                       f"studies there: {names}")  # fmt: skip
    _check_objectives(source, tc, tc.storage)
    return source


def warm_start(study: optuna.Study, source: optuna.Study, tc: TuneConfig, distributions: dict[str, Any]) -> int:
    """Copy the earlier study's finished trials that lie inside this space, so the sampler starts from its history
    (TPE counts them towards its random start-up trials) and no point it tried is tried again."""
    copied = 0
    for t in source.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        params = {k: t.params.get(k) for k in distributions}
        if not all(k in t.params and tc.space[k].contains(v) for k, v in params.items()):
            continue
        attrs = {**t.user_attrs, "warm_start_from": f"{source.study_name}#{t.number}"}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, values=t.values,
                                                  user_attrs=attrs))  # fmt: skip
        copied += 1
    log.warning("warm start: copied %d finished trials of %s into %s", copied, source.study_name, study.study_name)
    return copied


def enqueue_first_points(study: optuna.Study, cfg: AppConfig) -> list[dict[str, Any]]:
    """The current config, then tune.points_to_evaluate, as the first trials, each only if the study has not tried
    it (a resumed or warm-started study must not repeat a trial)."""
    candidates = [p for p in [default_point(cfg), *cfg.tune.points_to_evaluate] if p]
    queued = []
    for point in candidates[: cfg.tune.num_samples]:
        before = len(study.trials)
        study.enqueue_trial(point, skip_if_exists=True)
        if len(study.trials) > before:
            queued.append(point)
    return queued


def run_trial(params: dict[str, Any], *, base: dict, splits: Splits, tracking: dict, parent_run_id: str) -> None:
    """One trial: the project's TorchTrainer with these values, logging to its own nested MLflow run (the same one
    again when a restored experiment starts this trial anew)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ray_app.train import build_trainer

    cfg = apply_params(AppConfig.model_validate(base), params)
    trial_id = tune.get_context().get_trial_id()
    client = MlflowClient(tracking["uri"])
    earlier = client.search_runs(
        [tracking["experiment_id"]],
        f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    if earlier:
        child_id = earlier[0].info.run_id
    else:
        child_id = client.create_run(
            tracking["experiment_id"],
            run_name=f"trial-{trial_id}",
            tags={"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id},
        ).info.run_id
        for name, value in params.items():
            client.log_param(child_id, name, value)
    wants_latency = LATENCY in cfg.tune.directions or cfg.tune.metric == LATENCY
    trainer = build_trainer(
        cfg, splits, f"trial-{parent_run_id[:8]}-{trial_id}", tracking["uri"], child_id,
        callbacks=[TuneReportCallback()], measure_latency=wants_latency,
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


def run_search(cfg: AppConfig, tracking: Tracking, splits: Splits) -> SearchResult:
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
    mlflow.set_tags({STUDY_TAG: tc.study_name, EXPERIMENT_TAG: path, "ray_app.optuna_storage": _safe_url(tc.storage)})
    trainable = tune.with_resources(
        # The trial's own function holds no CPU, so its training workers get them all; Tune rejects an empty request,
        # hence a token amount of memory.
        tune.with_parameters(
            run_trial, base=cfg.model_dump(), splits=splits,
            tracking={"uri": tracking.uri, "experiment_id": tracking.experiment_id}, parent_run_id=parent,
        ),
        {"cpu": 0, "memory": 64 * 2**20},
    )  # fmt: skip
    restored = tune.Tuner.can_restore(path)
    if restored:
        log.warning("restoring the interrupted Tune experiment %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        queued = enqueue_first_points(study, cfg)
        log.warning("study %s: %d trials so far; first points queued: %s", tc.study_name, trials_before, queued)
        tuner = _new_tuner(cfg, trainable, storage, parent, trials_before, path)
    grid = tuner.fit()
    _fail_orphans(study, parent)
    trials = _record_trials(grid, cfg, tracking, parent)
    if not any(t["status"] != "failed" for t in trials):
        raise AppError(f"every trial of the search failed; see the Ray job log ({trials[0]['error']})")
    study = optuna.load_study(study_name=tc.study_name, storage=storage)
    summary = {"name": tc.study_name, "storage": _safe_url(tc.storage), "trials_before": trials_before,
               "trials_after": len(study.trials), "objectives": tc.directions}  # fmt: skip
    chosen = _choose(grid, study, cfg)
    _log_parent(trials, chosen, study, tc)
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


def _fail_orphans(study: optuna.Study, parent: str) -> None:
    """Optuna trials this search asked for but Tune never finished (the driver died between the two): FAIL, so the
    study holds no trial that stays RUNNING forever."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("search_run") == parent:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


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


def pareto_front(study: optuna.Study, tc: TuneConfig) -> list[dict[str, Any]]:
    """Optuna's Pareto-optimal trials of the whole study (each trial's values are its last reported epoch)."""
    rows = []
    for t in sorted(study.best_trials, key=lambda t: t.number):
        rows.append({"number": t.number, "tune_trial_id": t.user_attrs.get("tune_trial_id"),
                     "search_run": t.user_attrs.get("search_run"), "params": dict(t.params),
                     **dict(zip(tc.directions, t.values, strict=True)),
                     CHECKPOINT_PATH_KEY: t.user_attrs.get(CHECKPOINT_PATH_KEY)})  # fmt: skip
    return rows


def select_from_front(front: list[dict[str, Any]], tc: TuneConfig) -> dict[str, Any]:
    """tune.select: among front trials whose tune.metric is within `within` of the best, the best by `prefer`."""
    sign = 1 if tc.mode == "max" else -1
    best = max(sign * r[tc.metric] for r in front)
    near = [r for r in front if sign * r[tc.metric] >= best - tc.select.within]
    if tc.select.prefer is None:
        return max(near, key=lambda r: sign * r[tc.metric])
    prefer_sign = 1 if tc.objectives[tc.select.prefer] == "max" else -1
    return max(near, key=lambda r: (prefer_sign * r[tc.select.prefer], sign * r[tc.metric]))


def _choose_from_front(study: optuna.Study, tc: TuneConfig) -> dict[str, Any]:
    front = pareto_front(study, tc)
    usable = [r for r in front if r[CHECKPOINT_PATH_KEY] and checkpoint_exists(r[CHECKPOINT_PATH_KEY])]
    if not usable:
        raise AppError(f"no Pareto-optimal trial of study {tc.study_name!r} has a checkpoint; see the trials table")
    pick = select_from_front(usable, tc)
    rule = (f"among Pareto-optimal trials with {tc.metric} within {tc.select.within} of the best, "
            + (f"the best {tc.select.prefer}" if tc.select.prefer else f"the best {tc.metric}"))  # fmt: skip
    log.warning("Pareto front: %d trials; selected trial %s (%s)", len(front), pick["number"], rule)
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


def _record_trials(grid, cfg: AppConfig, tracking: Tracking, parent: str) -> list[dict[str, Any]]:
    """Status, params, best metric, last objective values and duration per trial, also written to each nested run."""
    tc = cfg.tune
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
        best = (frame[tc.metric].max() if tc.mode == "max" else frame[tc.metric].min()) if tc.metric in frame else None
        last = {f"last_{m}": (result.metrics or {}).get(m) for m in tc.directions} if tc.objectives else {}
        last["param_count"] = (result.metrics or {}).get("param_count")
        row = {"trial_id": trial_id, "status": status, **result.config, "best_" + tc.metric: best, **last,
               "epochs_run": int(frame["epoch"].max()) if "epoch" in frame else 0,
               "duration_s": float((result.metrics or {}).get("time_total_s", 0.0)),
               "error": _error_line(result.error)}  # fmt: skip
        rows.append(row)
        run_id = children.get(trial_id)
        if run_id:
            client.set_tag(run_id, "trial_status", status)
            client.log_metric(run_id, "duration_s", row["duration_s"])
            client.set_terminated(run_id, {"failed": "FAILED", "stopped_early": "KILLED"}.get(status, "FINISHED"))
    return rows


def _error_line(error: BaseException | None) -> str:
    """The line of a trial's error that says what went wrong: Ray's first lines name the actor, its last the cause."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error or "").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def _log_parent(trials: list[dict], chosen: dict[str, Any], study: optuna.Study, tc: TuneConfig) -> None:
    """Best params and metrics, the trials table, and Optuna's own plots of the persistent study (the Pareto front
    in multi-objective mode)."""
    mlflow.log_params({f"best.{k}": v for k, v in chosen["best_params"].items()})
    prefixes = ("val_", "train_", "latency", "param")
    mlflow.log_metrics({f"best_{k}": float(v) for k, v in chosen["best_metrics"].items()
                        if isinstance(v, (int, float)) and k.startswith(prefixes)})  # fmt: skip
    mlflow.log_text(pd.DataFrame(trials).to_csv(index=False), "tune/trials.csv")
    counts = pd.Series([t["status"] for t in trials]).value_counts().to_dict()
    mlflow.log_metrics({f"trials_{status}": n for status, n in counts.items()})
    mlflow.log_metric("study_trials", len(study.trials))
    if chosen.get("pareto_front") is not None:
        mlflow.log_dict({"selection": chosen["selection"], "front": chosen["pareto_front"]}, "tune/pareto_front.json")
    for name, plot in _plots(study, tc).items():
        try:
            ax = plot()
        except (ValueError, RuntimeError) as exc:  # e.g. too few finished trials for importances
            log.warning("skipped the %s plot: %s", name, exc)
            continue
        _log_axes(ax, f"tune/{name}.png")


def _plots(study: optuna.Study, tc: TuneConfig) -> dict[str, Any]:
    """Name -> a call that draws one of Optuna's matplotlib plots; per objective in multi-objective mode."""
    from optuna.visualization import matplotlib as ovm

    complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    importances = complete >= 2 and len(tc.space) >= 2
    if not tc.objectives:
        plots = {"optimization_history": lambda: ovm.plot_optimization_history(study),
                 "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study)}  # fmt: skip
        if importances:
            plots["param_importances"] = lambda: ovm.plot_param_importances(study)
        return plots
    names = list(tc.directions)
    plots = {"pareto_front": lambda: ovm.plot_pareto_front(study, target_names=names)} if len(names) <= 3 else {}
    for i, name in enumerate(names):
        target = _objective(i)
        plots[f"optimization_history_{name}"] = lambda t=target, n=name: ovm.plot_optimization_history(
            study, target=t, target_name=n
        )
        if importances:
            plots[f"param_importances_{name}"] = lambda t=target, n=name: ovm.plot_param_importances(
                study, target=t, target_name=n
            )
    return plots


def _objective(i: int):
    """Optuna's plots take one target; in multi-objective mode, objective i of each trial."""
    return lambda t: t.values[i]


def _log_axes(ax, artifact: str) -> None:
    import matplotlib.pyplot as plt

    fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
    fig.set_size_inches(9, 5)
    mlflow.log_figure(fig, artifact)
    plt.close(fig)
