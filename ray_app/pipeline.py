"""Stages wired to MLflow runs: what the CLI, a notebook or a test calls.

A training run is keyed by the config fingerprint and the data digest. Re-running the same command after a crash
finds the unfinished MLflow run with that key and the Ray Train run of the same name, and continues both from the
last checkpoint instead of starting over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.entities import RunStatus

from ray_app.config import AppConfig
from ray_app.config_loader import dump_yaml
from ray_app.data import Splits, prepare
from ray_app.data import log_to_mlflow as log_data
from ray_app.drills import FailureDrill
from ray_app.epoch_logger import backfill_epoch_metrics
from ray_app.errors import AppError
from ray_app.evaluate import EvalResult, evaluate, plot_learning_curves
from ray_app.evaluate import log_to_mlflow as log_eval
from ray_app.model import TextClassifier, resolve_model_path
from ray_app.registry import GateDecision, Registered, aliases, log_model, promote, register
from ray_app.resources import refuse_impossible
from ray_app.runtime import Tracking, git_commit
from ray_app.train import MODEL_SUBDIR, TrainResult, train

if TYPE_CHECKING:
    from ray_app.tune import SearchResult

log = logging.getLogger("ray_app")
RESUME_TAG = "ray_app.resume_key"
REFIT_TAG = "ray_app.refit"
TRAIN_NAME_TAG = "ray_app.train_run_name"


class Timer:
    """Seconds per stage, for the results JSON."""

    def __init__(self) -> None:
        self.durations: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.durations[name] = round(time.perf_counter() - started, 2)


def source_tags() -> dict[str, str]:
    """The commit the code came from, under MLflow's own tag (the run page shows it as the source version)."""
    commit = git_commit()
    return {"mlflow.source.git.commit": commit, "git_commit": commit} if commit != "unknown" else {}


def describe(run_id: str, registered: Registered, cfg: AppConfig, splits: Splits, evaluation: EvalResult) -> None:
    """One paragraph on the run and on the version (MLflow shows it first on both pages): what was trained on what,
    how it scored on the held-out test rows beside the baseline, and where the other one is."""
    m, b = evaluation.metrics, evaluation.baseline
    what = (f"{cfg.model.name_or_path} fine-tuned on {cfg.data.path} ({len(splits.train)} training rows, data digest "
            f"{splits.report.digest}). Test: weighted F1 {m['f1_weighted']:.3f}, accuracy {m['accuracy']:.3f} on "
            f"{evaluation.n} held-out rows; the TF-IDF baseline scores {b['f1_weighted']:.3f}.")  # fmt: skip
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "mlflow.note.content", f"{what} Registered as {registered.name} version "
                   f"{registered.version} (alias challenger until the promotion gate decides).")  # fmt: skip
    client.update_model_version(registered.name, registered.version, f"{what} Trained in MLflow run {run_id}.")


def log_config(cfg: AppConfig) -> None:
    """The resolved config as params and as YAML, so the run can be repeated exactly."""
    mlflow.log_params({k: str(v)[:500] for k, v in cfg.flat().items()})  # MLflow's log_batch sends 100 at a time
    mlflow.log_text(dump_yaml(cfg), "config.yaml")
    mlflow.set_tag("config_hash", cfg.fingerprint())


def _unfinished_run(tracking: Tracking, key: str) -> mlflow.entities.Run | None:
    runs = mlflow.search_runs(
        experiment_ids=[tracking.experiment_id],
        filter_string=f"tags.`{RESUME_TAG}` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    if runs and runs[0].info.status != RunStatus.to_string(RunStatus.FINISHED):
        return runs[0]
    return None


@contextlib.contextmanager
def training_run(cfg: AppConfig, tracking: Tracking, splits: Splits, stage: str) -> Iterator[tuple[str, str]]:
    """Open (or re-open, to resume) the MLflow run that a training stage logs into; yields (run id, train name)."""
    key = f"{cfg.fingerprint()}-{splits.report.digest}"
    previous = _unfinished_run(tracking, key) if cfg.train.resume else None
    if previous is not None:
        name = previous.data.tags[TRAIN_NAME_TAG]
        log.warning("resuming unfinished run %s (Ray Train run %s)", previous.info.run_id, name)
        with mlflow.start_run(run_id=previous.info.run_id) as run:
            yield run.info.run_id, name
        return
    name = f"{stage}-{key}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {RESUME_TAG: key, TRAIN_NAME_TAG: name, **source_tags()}
    with mlflow.start_run(run_name=name, tags=tags) as run:
        log_config(cfg)
        log_data(splits, cfg.data)
        yield run.info.run_id, name


def run_training(
    cfg: AppConfig, tracking: Tracking, splits: Splits, run_id: str, name: str, drill: FailureDrill | None = None
) -> TrainResult:
    result = train(cfg, splits, name, tracking.uri, run_id, drill=drill)
    backfill_epoch_metrics(tracking.uri, run_id, result.history)
    log_best_epoch(result)
    if result.history:
        best_epoch = int(result.best_metrics["epoch"]) if "epoch" in result.best_metrics else None
        mlflow.log_figure(plot_learning_curves(result.history, best_epoch), "training/learning_curves.png")
    mlflow.log_dict(result.to_dict(), "training/result.json")
    mlflow.set_tag("checkpoint_path", result.checkpoint_path)
    return result


def log_best_epoch(result: TrainResult) -> None:
    """What the registered checkpoint scored (its epoch, not the last one's), the model size as a param, and whether
    early stopping ended the run, as a tag: the run page shows these first."""
    best = result.best_metrics
    metrics = {f"best/{k}": v for k, v in best.items() if k.startswith("val_") or k == "epoch"}
    metrics["train/epochs_run"] = float(len(result.history))
    mlflow.log_metrics(metrics)
    if "param_count" in best:
        mlflow.log_param("model.param_count", int(best["param_count"]))
    stopped = bool(result.history and result.history[-1].get("early_stopped"))
    mlflow.set_tags({"early_stopped": str(stopped).lower(), "best_epoch": str(int(best.get("epoch", 0)))})
    log.info(
        "train: %d epochs%s; kept epoch %d, val f1_weighted %.4f",
        len(result.history),
        " (early stop)" if stopped else "",
        int(best.get("epoch", 0)),
        best.get("val_f1_weighted", float("nan")),
    )


def evaluate_checkpoint(cfg: AppConfig, splits: Splits, model_dir: str) -> EvalResult:
    clf = TextClassifier.load(model_dir, cfg.data.max_length)
    result, artifacts = evaluate(clf, splits.test, splits.train, cfg.data.text_columns, cfg.evaluate)
    log_eval(result, artifacts, "test")
    log.info(
        "evaluate: test f1_weighted %.4f on %d rows, TF-IDF baseline %.4f",
        result.metrics["f1_weighted"],
        result.n,
        result.baseline.get("f1_weighted", float("nan")),
    )
    return result


def evaluate_model(cfg: AppConfig, model_uri: str | None, data_file: Path | None) -> dict[str, Any]:
    """`ray-app evaluate`: a registered version (default: the challenger) on the test split or another labelled CSV,
    beside the baseline trained on the training split, in its own run."""
    from ray_app.data import labelled_rows
    from ray_app.registry import load_classifier

    uri = model_uri or f"models:/{cfg.registry.model_name}@challenger"
    splits = prepare(cfg.data)  # the training split trains the baseline; its test split is the default rows
    rows = splits.test if data_file is None else labelled_rows(cfg.data, data_file)
    try:
        clf = load_classifier(uri)
    except mlflow.exceptions.MlflowException as exc:
        raise AppError(f"model {uri} could not be loaded: {exc.message.splitlines()[0]}") from None
    with mlflow.start_run(run_name="evaluate", tags={"model_uri": uri, **source_tags()}) as run:
        result, artifacts = evaluate(clf, rows, splits.train, cfg.data.text_columns, cfg.evaluate)
        log_eval(result, artifacts, "eval")
    return {"run_id": run.info.run_id, "model_uri": uri, **result.to_dict()}


def register_trained(cfg: AppConfig, checkpoint_path: str, run_id: str) -> Registered:
    """`ray-app register`: a checkpoint of an earlier `ray-app train`, logged into that training run and registered."""
    splits = prepare(cfg.data)
    with mlflow.start_run(run_id=run_id):
        return register_checkpoint(cfg, splits, checkpoint_path, run_id)


def register_checkpoint(
    cfg: AppConfig, splits: Splits, checkpoint_path: str, run_id: str, held_out: tuple[str, ...] = ("val", "test")
) -> Registered:
    from ray.train import Checkpoint

    from ray_app.reference import REFERENCE_TAG, log_reference

    with Checkpoint(checkpoint_path).as_directory() as ckpt:
        model_uri = log_model(cfg, str(Path(ckpt) / MODEL_SUBDIR), splits.test)
        # The drift reference travels with the version: its own answers on rows it never trained on (`ray-app
        # monitor`): val and test, or only test after a refit on train+val.
        reference = log_reference(cfg, str(Path(ckpt) / MODEL_SUBDIR), splits, model_uri, held_out)
    tags = {"data_digest": splits.report.digest, "git_commit": git_commit(), "config_hash": cfg.fingerprint(),
            "trained_on": "+".join(s for s in ("train", "val", "test") if s not in held_out)}  # fmt: skip
    return register(cfg, model_uri, run_id, {**tags, REFERENCE_TAG: reference})


def refit_on_train_val(
    cfg: AppConfig, tracking: Tracking, splits: Splits, found: SearchResult, parent_run_id: str
) -> dict[str, Any]:
    """`tune.refit`: the chosen trial's values trained again on train+val for as many epochs as its best checkpoint
    had, in a nested run of the search. More data for the model that ships, and test still unseen; the val rows are
    training rows now, so its val metrics are in-sample (the run says so) and the last checkpoint is the one kept.
    A re-run after a crash resumes the same Ray Train run (its name is the parent's)."""
    from ray_app.tune import apply_params

    tuned = apply_params(cfg, found.best_params)
    epochs = int(found.best_metrics.get("epoch") or tuned.train.epochs)  # a Pareto pick carries only its objectives
    refit_cfg = tuned.replace(train={"epochs": epochs, "early_stopping_patience": None})
    merged = dataclasses.replace(splits, train=pd.concat([splits.train, splits.val], ignore_index=True))
    client = mlflow.MlflowClient()
    name = f"refit-{parent_run_id[:8]}"
    runs = client.search_runs([tracking.experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}' and "
                              f"tags.`{REFIT_TAG}` = 'train+val'", max_results=1)  # fmt: skip
    if runs:
        run_id = runs[0].info.run_id
    else:
        tags = {"mlflow.parentRunId": parent_run_id, REFIT_TAG: "train+val", "val_metrics": "in-sample"}
        run_id = client.create_run(tracking.experiment_id, run_name=name, tags=tags).info.run_id
        params = {**found.best_params, "epochs": epochs, "train_rows": len(merged.train),
                  "from_trial": found.best_trial_id}  # fmt: skip
        for key, value in params.items():
            client.log_param(run_id, key, value)
    result = train(refit_cfg, merged, name, tracking.uri, run_id, keep="last")
    backfill_epoch_metrics(tracking.uri, run_id, result.history)
    client.set_terminated(run_id, "FINISHED")
    mlflow.set_tag("refit_run_id", run_id)
    return {"run_id": run_id, "epochs": epochs, "train_rows": len(merged.train), "from_trial": found.best_trial_id,
            "checkpoint_path": result.checkpoint_path, "duration_s": result.duration_s}  # fmt: skip


def with_absolute_paths(cfg: AppConfig) -> AppConfig:
    """Local model and storage paths made absolute here, so a trial's or worker's working directory cannot change them;
    a model path that does not exist fails now."""
    storage = cfg.train.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"name_or_path": resolve_model_path(cfg.model.name_or_path)}),
            "train": cfg.train.model_copy(update={"storage_path": storage}),
        }
    )


def run_tune(
    cfg: AppConfig, tracking: Tracking, promote_after: bool = False, drill: FailureDrill | None = None
) -> dict[str, Any]:
    """Search in one parent run with a nested run per trial; the chosen trial's best checkpoint is evaluated on the
    test split and registered as `challenger` (no retraining), then promoted through the gate if asked.

    With `tune.resume`, a search whose driver died (parent run still RUNNING, Tune experiment on storage) is
    restored inside that same parent run; otherwise a new parent run adds `num_samples` trials to the study."""
    from ray.train import Checkpoint

    from ray_app.tune import STUDY_TAG, find_interrupted_search, run_search

    cfg = with_absolute_paths(cfg)  # Tune runs each trial in its own working directory
    refuse_impossible(cfg.train)
    timer = Timer()
    with timer.stage("data"):
        splits = prepare(cfg.data)
    interrupted = find_interrupted_search(cfg, tracking) if cfg.tune.resume else None
    if interrupted is not None:
        log.warning("resuming the interrupted search in run %s", interrupted.info.run_id)
        parent = mlflow.start_run(run_id=interrupted.info.run_id)
    else:
        tags = {"ray_app.stage": "tune", STUDY_TAG: cfg.tune.study_name, **source_tags()}
        parent = mlflow.start_run(run_name=f"tune-{cfg.tune.study_name}", tags=tags)
    with parent as run:
        if interrupted is None:
            log_config(cfg)
            log_data(splits, cfg.data)
        with timer.stage("search"):
            found = run_search(cfg, tracking, splits, drill)
        checkpoint, refit, held_out = found.best_checkpoint_path, None, ("val", "test")
        if cfg.tune.refit:
            with timer.stage("refit"):
                refit = refit_on_train_val(cfg, tracking, splits, found, run.info.run_id)
            checkpoint, held_out = refit["checkpoint_path"], ("test",)
        with timer.stage("evaluate"), Checkpoint(checkpoint).as_directory() as ckpt:
            evaluation = evaluate_checkpoint(cfg, splits, str(Path(ckpt) / MODEL_SUBDIR))
        with timer.stage("register"):
            registered = register_checkpoint(cfg, splits, checkpoint, run.info.run_id, held_out)
            describe(run.info.run_id, registered, cfg, splits, evaluation)
    decision = _promote_if(promote_after, cfg, timer)
    results = {
        **_run_summary(tracking, run.info.run_id),
        "search": found.to_dict(),
        "refit": refit,
        "model": {**registered.to_dict(), "aliases": aliases(cfg.registry)},
        "test_metrics": evaluation.metrics,
        "test_per_class": evaluation.per_class,
        "baseline_test_metrics": evaluation.baseline,
        "vs_baseline": evaluation.difference,
        "promotion": decision.to_dict() if decision else None,
        "durations_s": timer.durations,
    }
    mlflow.MlflowClient().log_dict(run.info.run_id, results, "results/tune.json")
    return results


def _promote_if(wanted: bool, cfg: AppConfig, timer: Timer) -> GateDecision | None:
    if not wanted:
        return None
    with timer.stage("promote"):
        return promote(cfg.registry)


def _run_summary(tracking: Tracking, run_id: str) -> dict[str, str]:
    return {
        "tracking_uri": tracking.uri,
        "experiment": tracking.experiment_name,
        "experiment_id": tracking.experiment_id,
        "run_id": run_id,
    }


def run_pipeline(cfg: AppConfig, tracking: Tracking) -> dict[str, Any]:
    """data -> train -> evaluate -> register -> promote, all in one MLflow run; returns the results JSON. With
    `pipeline.search`, the training step is the hyperparameter search (`run_tune`) and the chosen trial's checkpoint
    goes on to evaluation, registration and promotion."""
    from ray.train import Checkpoint

    resolve_model_path(cfg.model.name_or_path)  # a wrong model path fails now, not after the data stage
    refuse_impossible(cfg.train)  # and so does a training request the cluster can never hold
    if cfg.pipeline.search:
        return run_tune(cfg, tracking, promote_after=cfg.pipeline.promote)
    timer = Timer()
    with timer.stage("data"):
        splits = prepare(cfg.data)
    with training_run(cfg, tracking, splits, "pipeline") as (run_id, name):
        with timer.stage("train"):
            trained = run_training(cfg, tracking, splits, run_id, name)
        with timer.stage("evaluate"), Checkpoint(trained.checkpoint_path).as_directory() as ckpt:
            evaluation = evaluate_checkpoint(cfg, splits, str(Path(ckpt) / MODEL_SUBDIR))
        with timer.stage("register"):
            registered = register_checkpoint(cfg, splits, trained.checkpoint_path, run_id)
            describe(run_id, registered, cfg, splits, evaluation)
    decision = _promote_if(cfg.pipeline.promote, cfg, timer)
    results = {
        **_run_summary(tracking, run_id),
        "model": {**registered.to_dict(), "aliases": aliases(cfg.registry)},
        "data": splits.report.to_dict() | {"bad_examples": len(splits.report.bad_examples)},
        "train": {k: v for k, v in trained.to_dict().items() if k != "history"},
        "test_metrics": evaluation.metrics,
        "test_per_class": evaluation.per_class,
        "test_slices": evaluation.slices,
        "baseline_test_metrics": evaluation.baseline,
        "vs_baseline": evaluation.difference,
        "promotion": decision.to_dict() if decision else None,
        "durations_s": timer.durations,
    }
    mlflow.MlflowClient().log_dict(run_id, results, "results/pipeline.json")  # found there when the job ran remotely
    return results
