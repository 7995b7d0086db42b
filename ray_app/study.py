"""The Optuna side of a search: the persistent study (open, check, resume, warm start, first points), the sampler,
the Pareto front and its selection rule, and Optuna's own plots of the study. `tune.py` runs trials against it.
"""

from __future__ import annotations

import logging
from typing import Any

import optuna

from ray_app.config import AppConfig
from ray_app.errors import AppError
from ray_app.tune_config import TUNABLE, TuneConfig

log = logging.getLogger("ray_app")
CHECKPOINT_PATH_KEY = "checkpoint_path"  # what ray.tune.integration.ray_train.TuneReportCallback adds


def default_point(cfg: AppConfig) -> dict[str, Any] | None:
    """The current config as the first trial, when it lies inside the space: the search starts from a known point."""
    point = {}
    for name, spec in cfg.tune.space.items():
        section, key = TUNABLE[name]
        value = getattr(getattr(cfg, section), key)
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
        raise AppError(f"Optuna storage {safe_url(tc.storage)!r} cannot be opened: {first_line}") from None


def safe_url(url: str) -> str:
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
            f"Optuna study {study.study_name!r} in {safe_url(storage_url)} optimizes {_describe(study)}, but this "
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
                f"Optuna study {tc.study_name!r} in {safe_url(tc.storage)} already has {len(study.trials)} trials; "
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
        raise AppError(f"tune.warm_start_from: no study {tc.warm_start_from!r} in {safe_url(tc.storage)}; "
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
    log.info("warm start: copied %d finished trials of %s into %s", copied, source.study_name, study.study_name)
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


def fail_orphans(study: optuna.Study, parent: str) -> None:
    """Optuna trials this search asked for but Tune never finished (the driver died between the two): FAIL, so the
    study holds no trial that stays RUNNING forever."""
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("search_run") == parent:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


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


def plots(study: optuna.Study, tc: TuneConfig) -> dict[str, Any]:
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
