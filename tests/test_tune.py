"""Hyperparameter search: config checks at load time, the study rules (objectives, resume, warm start), and real
searches (Ray Tune + Optuna on a temp SQLite study + ASHA) with nested MLflow runs: smoke, statuses (ASHA stop,
failure), resume, multi-objective, and a driver killed mid-search then restored."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from ray.tune.search.optuna import OptunaSearch

from ray_app.config_loader import load_config
from ray_app.drills import FailureDrill
from ray_app.errors import AppError
from ray_app.study import default_point, enqueue_first_points, open_storage, prepare_study, select_from_front
from ray_app.tune import apply_params, search_space
from ray_app.tune_config import TuneConfig

from .conftest import SMOKE, smoke_config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tune.space={lr: {kind: loguniform, low: 0.01, high: 0.001}}", "needs low < high"),
        ("tune.space={lr: {kind: loguniform, low: 0, high: 0.001}}", "needs low > 0"),
        ("tune.space={lr: {kind: choice, values: []}}", "non-empty 'values'"),
        ("tune.space={learning_rate: {kind: uniform, low: 0, high: 1}}", "unknown parameter(s) ['learning_rate']"),
        ("tune.sampler=cmaes", "tune.sampler"),
        ("tune.scheduler=hyperband", "tune.scheduler"),
        ("tune.space={lr: {kind: loguniform, low: 0.1, high: 5}}", "value 5.0 is not valid for train.lr"),
        ("tune.space={num_layers: {kind: int, low: 0, high: 3}}", "value 0 is not valid for model.num_layers"),
        ("tune.metric=val_f1", "unknown metric(s) ['val_f1']"),
        ("tune.objectives={val_f1_weighted: max}", "two or more metrics"),
        ("tune.objectives={val_loss: min, latency_p50_ms: min}", "must be one of tune.objectives"),
        ("tune.points_to_evaluate=[{lr: 0.5}]", "must name exactly the space's parameters"),
    ],
)
def test_bad_search_config_fails_at_load(override: str, message: str) -> None:
    with pytest.raises(AppError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_params_land_on_their_config_keys() -> None:
    cfg = apply_params(load_config(None), {"lr": 3e-4, "dropout": 0.2, "max_length": 64, "batch_size": 16})
    assert (cfg.train.lr, cfg.model.dropout, cfg.data.max_length, cfg.train.batch_size) == (3e-4, 0.2, 64, 16)
    assert default_point(load_config(None)) == {"lr": 1e-4, "weight_decay": 0.01, "warmup_ratio": 0.1}
    assert default_point(load_config(None, ["train.lr=0.5"])) is None  # outside the space: no first point


def test_unreachable_storage_is_named() -> None:
    with pytest.raises(AppError, match=re.escape("postgresql://nobody@127.0.0.1:1/none")):
        open_storage(TuneConfig(storage="postgresql://nobody@127.0.0.1:1/none"))


@pytest.mark.slow
def test_smoke_search_end_to_end(mlflow_server, ray_cluster, tiny_model, storage, tmp_path) -> None:
    from ray_app.pipeline import run_tune
    from ray_app.runtime import setup_mlflow

    name = f"smoke-tune-{uuid.uuid4().hex[:6]}"
    cfg = smoke_config(
        mlflow_server, ray_cluster["address"], tiny_model, storage,
        "tune.num_samples=2", f"tune.storage=sqlite:///{tmp_path}/optuna.db", f"tune.study_name={name}",
        "tune.space={lr: {kind: loguniform, low: 1.0e-4, high: 1.0e-2}, "
        "warmup_ratio: {kind: uniform, low: 0, high: 0.2}}",
        f"registry.model_name={name}",
    )  # fmt: skip
    results = run_tune(cfg, setup_mlflow(cfg))
    search = results["search"]
    assert len(search["trials"]) == 2  # the current config as the first point, then one from TPE
    assert {t["status"] for t in search["trials"]} <= {"completed", "stopped_early"}
    parent = results["run_id"]
    client = MlflowClient()
    children = client.search_runs([mlflow.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 2 and all(c.data.tags["trial_status"] in {"completed", "stopped_early"} for c in children)
    assert all(c.data.metrics.get("val/f1_weighted") is not None for c in children)
    files = {f.path for f in client.list_artifacts(parent, "tune")}
    assert {"tune/trials.csv", "tune/optimization_history.png"} <= files
    version = client.get_model_version_by_alias(name, "challenger")
    assert version.run_id == parent
    assert search["best_checkpoint_path"].startswith(str(storage))


def test_tpe_startup_trials_reach_the_sampler() -> None:
    """tune.tpe_startup_trials is Optuna's n_startup_trials: with 2, TPE closes in on a 1-D optimum within 12 trials;
    with 12, the same seed samples at random throughout (Optuna's default of 10 would do that to a 6-trial search)."""
    from ray_app.study import make_sampler

    def distances(startup: int) -> list[float]:
        tc = TuneConfig(tpe_startup_trials=startup, seed=3)
        study = optuna.create_study(sampler=make_sampler(tc))
        study.optimize(lambda t: (t.suggest_float("x", 0.0, 1.0) - 0.9) ** 2, n_trials=12)
        return sorted(abs(t.params["x"] - 0.9) for t in study.trials[2:])

    guided, random = distances(2), distances(12)
    assert guided[len(guided) // 2] < random[len(random) // 2], (guided, random)


def _sqlite(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/optuna.db"


def test_select_fastest_within_tolerance_of_best() -> None:
    tc = load_config(None, ["tune.objectives={val_f1_weighted: max, latency_p50_ms: min}",
                            "tune.select={within: 0.01, prefer: latency_p50_ms}"]).tune  # fmt: skip
    front = [
        {"number": 0, "val_f1_weighted": 0.95, "latency_p50_ms": 90.0},
        {"number": 1, "val_f1_weighted": 0.945, "latency_p50_ms": 40.0},
        {"number": 2, "val_f1_weighted": 0.90, "latency_p50_ms": 10.0},
    ]
    assert select_from_front(front, tc)["number"] == 1  # the fastest of those within 0.01 F1 of the best
    best_only = tc.model_copy(update={"select": tc.select.model_copy(update={"prefer": None})})
    assert select_from_front(front, best_only)["number"] == 0


def test_study_with_other_objectives_is_refused(tmp_path) -> None:
    """Named, before any trial: a study created for val_loss (minimize) cannot take a val F1 (maximize) search."""
    storage_url = _sqlite(tmp_path)
    existing = optuna.create_study(storage=storage_url, study_name="s1", direction="minimize")
    existing.set_metric_names(["val_loss"])
    tc = load_config(None, [f"tune.storage={storage_url}", "tune.study_name=s1", "tune.resume=true"]).tune
    storage = open_storage(tc)
    with pytest.raises(AppError, match=r"study 's1' .* optimizes val_loss \(minimize\), but this search optimizes "
                                       r"val_f1_weighted \(maximize\)"):  # fmt: skip
        prepare_study(tc, storage, {})
    multi = load_config(None, [f"tune.storage={storage_url}", "tune.study_name=s1", "tune.resume=true",
                               "tune.objectives={val_f1_weighted: max, latency_p50_ms: min}"]).tune  # fmt: skip
    with pytest.raises(AppError, match="latency_p50_ms"):
        prepare_study(multi, storage, {})


def _finished(study: optuna.Study, lr: float, value: float) -> None:
    dists = {"lr": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)}
    study.add_trial(optuna.trial.create_trial(params={"lr": lr}, distributions=dists, value=value))


def test_existing_study_needs_resume_and_warm_start_copies_trials(tmp_path) -> None:
    storage_url = _sqlite(tmp_path)
    space = "tune.space={lr: {kind: loguniform, low: 1.0e-5, high: 1.0e-3}}"
    cfg = load_config(None, [f"tune.storage={storage_url}", "tune.study_name=old", space, "train.lr=1.0e-4"])
    old = optuna.create_study(storage=storage_url, study_name="old", direction="maximize")
    for lr, value in [(1e-4, 0.9), (3e-4, 0.92), (5e-3, 0.5)]:  # the last lies outside the new space
        _finished(old, lr, value)
    storage = open_storage(cfg.tune)
    dists = OptunaSearch.convert_search_space(search_space(cfg.tune))
    with pytest.raises(AppError, match=r"study 'old' .* already has 3 trials; pass --resume"):
        prepare_study(cfg.tune, storage, dists)
    resumed = prepare_study(cfg.tune.model_copy(update={"resume": True}), storage, dists)
    assert enqueue_first_points(resumed, cfg) == []  # the current config (lr 1e-4) was tried: not repeated

    new = cfg.tune.model_copy(update={"study_name": "new", "warm_start_from": "old"})
    study = prepare_study(new, storage, dists)
    copied = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert sorted(t.params["lr"] for t in copied) == [1e-4, 3e-4]
    assert {t.user_attrs["warm_start_from"] for t in copied} == {"old#0", "old#1"}
    assert study.best_value == 0.92
    with pytest.raises(AppError, match=r"no study 'nope'.*studies there: \['old', 'new'\]"):
        prepare_study(new.model_copy(update={"study_name": "new2", "warm_start_from": "nope"}), storage, dists)


def test_num_layers_truncates_bert_and_refuses_others(tiny_model, tmp_path) -> None:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from ray_app.model import TextClassifier, keep_layers, load_for_training

    model = load_for_training(str(tiny_model), ["a", "b"], num_layers=1)
    assert len(model.bert.encoder.layer) == 1 and model.config.num_hidden_layers == 1
    model.save_pretrained(tmp_path / "m")
    assert len(TextClassifier.load(str(tmp_path / "m")).model.bert.encoder.layer) == 1  # reads back as saved
    with pytest.raises(AppError, match=re.escape("has 2 encoder layers; choose 1..2")):
        load_for_training(str(tiny_model), ["a", "b"], num_layers=3)
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=100))
    with pytest.raises(AppError, match="needs a BERT-like encoder"):
        keep_layers(gpt2, 1)


@pytest.fixture(scope="module")
def status_search(mlflow_server, ray_cluster, storage, tmp_path_factory):
    """One sequential search built so that its statuses are certain: the current config (MiniLM, lr 2e-4) first,
    then lr 1e-8 (cannot learn: ASHA must stop it at epoch 1), then a trial whose worker raises after epoch 1."""
    from ray_app.pipeline import run_tune
    from ray_app.runtime import setup_mlflow

    name = f"status-{uuid.uuid4().hex[:6]}"
    db = tmp_path_factory.mktemp("optuna") / "optuna.db"
    cfg = smoke_config(
        mlflow_server, ray_cluster["address"], Path("bundled:all-MiniLM-L6-v2"), storage,
        "model.name_or_path=bundled:all-MiniLM-L6-v2", "data.max_rows=100", "train.torch_threads=2",
        "train.lr=2.0e-4", "train.max_failures=0", "tune.max_concurrent_trials=1", "tune.num_samples=3",
        "tune.space={lr: {kind: loguniform, low: 1.0e-8, high: 1.0e-3}}",
        "tune.points_to_evaluate=[{lr: 1.0e-8}, {lr: 3.0e-4}]",
        f"tune.storage=sqlite:///{db}", f"tune.study_name={name}", f"registry.model_name={name}",
    )  # fmt: skip
    results = run_tune(cfg, setup_mlflow(cfg), drill=FailureDrill(after_epoch=1, trial_params={"lr": 3.0e-4}))
    return cfg, results, {t["lr"]: t for t in results["search"]["trials"]}


@pytest.mark.slow
def test_asha_stops_the_clearly_worse_trial(status_search) -> None:
    _, results, by_lr = status_search
    assert len(by_lr) == 3
    good, hopeless = by_lr[2e-4], by_lr[1e-8]
    assert (good["status"], good["epochs_run"]) == ("completed", 2)
    assert (hopeless["status"], hopeless["epochs_run"]) == ("stopped_early", 1), hopeless
    assert hopeless["best_val_f1_weighted"] < good["best_val_f1_weighted"]
    child = _child(results["run_id"], hopeless["trial_id"])
    assert (child.data.tags["trial_status"], child.info.status) == ("stopped_early", "KILLED")


@pytest.mark.slow
def test_failed_trial_is_recorded_and_the_search_completes(status_search) -> None:
    cfg, results, by_lr = status_search
    failed = by_lr[3e-4]
    assert failed["status"] == "failed" and "failure drill" in failed["error"], failed
    child = _child(results["run_id"], failed["trial_id"])
    assert (child.data.tags["trial_status"], child.info.status) == ("failed", "FAILED")
    study = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
    states = {t.params["lr"]: t.state.name for t in study.trials}
    assert states == {2e-4: "COMPLETE", 1e-8: "COMPLETE", 3e-4: "FAIL"}  # ASHA's stop is COMPLETE to Optuna
    version = MlflowClient().get_model_version_by_alias(cfg.registry.model_name, "challenger")
    assert version.run_id == results["run_id"] and results["search"]["best_params"]["lr"] == 2e-4


@pytest.mark.slow
def test_resume_grows_the_study_without_repeating_a_trial(status_search) -> None:
    from ray_app.pipeline import run_tune
    from ray_app.runtime import setup_mlflow

    cfg, first, _ = status_search
    again = cfg.replace(tune={"num_samples": 1})
    with pytest.raises(AppError, match="already has 3 trials; pass --resume"):
        run_tune(again, setup_mlflow(again))
    resumed = again.replace(tune={"resume": True})
    results = run_tune(resumed, setup_mlflow(resumed))
    assert results["run_id"] != first["run_id"] and not results["search"]["restored"]
    assert (results["search"]["study"]["trials_before"], results["search"]["study"]["trials_after"]) == (3, 4)
    study = optuna.load_study(study_name=cfg.tune.study_name, storage=cfg.tune.storage)
    points = [tuple(sorted(t.params.items(), key=str)) for t in study.trials]
    assert len(set(points)) == len(points) == 4, points
    assert study.trials[-1].user_attrs["search_run"] == results["run_id"]


def _child(parent: str, trial_id: str):
    exp = mlflow.get_run(parent).info.experiment_id
    runs = MlflowClient().search_runs(
        [exp], f"tags.mlflow.parentRunId = '{parent}' and tags.`ray_app.trial_id` = '{trial_id}'"
    )
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
def test_refit_trains_the_chosen_values_on_train_and_val(mlflow_server, ray_cluster, tiny_model, storage, tmp_path):
    """tune.refit: the registered model is a new run on train+val for the chosen trial's best epoch count, nested in
    the search; its drift reference holds only the test rows, which it never saw."""
    import pandas as pd

    from ray_app.pipeline import REFIT_TAG, run_tune
    from ray_app.reference import REFERENCE_TAG
    from ray_app.runtime import setup_mlflow

    name = f"refit-{uuid.uuid4().hex[:6]}"
    cfg = smoke_config(
        mlflow_server, ray_cluster["address"], tiny_model, storage,
        "tune.num_samples=1", "tune.refit=true", f"tune.storage=sqlite:///{tmp_path}/optuna.db",
        f"tune.study_name={name}", f"registry.model_name={name}",
    )  # fmt: skip
    results = run_tune(cfg, setup_mlflow(cfg))
    refit, search = results["refit"], results["search"]
    assert refit["epochs"] == int(search["best_metrics"]["epoch"])
    client = MlflowClient()
    run = client.get_run(refit["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == results["run_id"] and run.data.tags[REFIT_TAG] == "train+val"
    assert run.info.status == "FINISHED" and run.data.params["train_rows"] == str(refit["train_rows"])
    steps = [m.step for m in client.get_metric_history(refit["run_id"], "train/loss")]
    assert steps == list(range(1, refit["epochs"] + 1))
    assert refit["checkpoint_path"] != search["best_checkpoint_path"]
    version = client.get_model_version_by_alias(name, "challenger")
    assert version.run_id == results["run_id"] and version.tags["trained_on"] == "train+val"
    reference = pd.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=version.run_id, artifact_path=version.tags[REFERENCE_TAG], dst_path=str(tmp_path / "ref")))  # fmt: skip
    assert set(reference["split"]) == {"test"}


@pytest.mark.slow
def test_multi_objective_search_reports_and_logs_a_pareto_front(
    mlflow_server, ray_cluster, tiny_model, storage, tmp_path
) -> None:
    from ray_app.pipeline import run_tune
    from ray_app.runtime import setup_mlflow

    name = f"multi-{uuid.uuid4().hex[:6]}"
    cfg = smoke_config(
        mlflow_server, ray_cluster["address"], tiny_model, storage,
        "tune.num_samples=2", f"tune.storage=sqlite:///{tmp_path}/optuna.db", f"tune.study_name={name}",
        "tune.objectives={val_f1_weighted: max, latency_p50_ms: min}",
        "tune.select={within: 0.01, prefer: latency_p50_ms}",
        "tune.space={lr: {kind: loguniform, low: 1.0e-4, high: 1.0e-2}, num_layers: {kind: int, low: 1, high: 2}}",
        "model.num_layers=2", f"registry.model_name={name}",
    )  # fmt: skip
    results = run_tune(cfg, setup_mlflow(cfg))
    search = results["search"]
    assert search["pareto_front"], search
    for row in search["pareto_front"]:
        assert row["val_f1_weighted"] >= 0 and row["latency_p50_ms"] > 0 and row["checkpoint_path"]
    assert search["selection"].startswith("trial ") and "the best latency_p50_ms" in search["selection"]
    assert search["best_checkpoint_path"] in {r["checkpoint_path"] for r in search["pareto_front"]}
    parent = results["run_id"]
    client = MlflowClient()
    files = {f.path for f in client.list_artifacts(parent, "tune")}
    assert {"tune/pareto_front.png", "tune/pareto_front.json", "tune/trials.csv"} <= files
    trial = search["trials"][0]
    history = client.get_metric_history(_child(parent, trial["trial_id"]).info.run_id, "val/latency_p50_ms")
    assert [m.step for m in history] == list(range(1, trial["epochs_run"] + 1))  # measured every epoch
    sizes = {t["num_layers"]: t["param_count"] for t in search["trials"] if t["param_count"]}
    if len(sizes) == 2:  # fewer layers really is a smaller model
        assert sizes[1] < sizes[2]
    assert client.get_model_version_by_alias(name, "challenger").run_id == parent


@pytest.mark.slow
def test_search_whose_driver_is_killed_is_restored(mlflow_server, ray_cluster, tiny_model, storage, tmp_path) -> None:
    """`ray-app tune` killed with SIGKILL mid-search; `ray-app tune --resume` restores the Tune experiment in the same
    parent run: every trial ends once, none is repeated, and the study keeps no trial RUNNING."""
    trials = 3  # kept small: the restore, not the search, is under test
    name = f"killed-{uuid.uuid4().hex[:6]}"
    db = f"sqlite:///{tmp_path}/optuna.db"
    args = [
        sys.executable, "-m", "ray_app.cli", "tune", "--config", str(SMOKE), "--results-dir", str(tmp_path),
        *[f"--set={s}" for s in [
            f"model.name_or_path={tiny_model}", f"mlflow.tracking_uri={mlflow_server}", f"mlflow.experiment={name}",
            f"ray.address={ray_cluster['address']}", f"train.storage_path={storage}", "train.epochs=2",
            f"tune.num_samples={trials}", f"tune.storage={db}", f"tune.study_name={name}",
            f"registry.model_name={name}",
        ]],
    ]  # fmt: skip
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.log", "wb"))  # noqa: SIM115
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        done = _count(db, name, "COMPLETE")
        if done >= 1:
            break
        time.sleep(1)
    assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    done_at_kill = _count(db, name, "COMPLETE")
    assert 1 <= done_at_kill < trials, "not mid-search: cannot test the restore"
    complete_before = {
        t.number for t in optuna.load_study(study_name=name, storage=db).trials if t.state.name == "COMPLETE"
    }
    killed_at = time.monotonic()
    driver.send_signal(signal.SIGKILL)
    driver.wait(30)
    mlflow.set_tracking_uri(mlflow_server)
    parent = mlflow.search_runs(
        experiment_names=[name], filter_string=f"tags.`ray_app.study` = '{name}'", output_format="list"
    )
    assert len(parent) == 1 and parent[0].info.status == "RUNNING"

    resumed = subprocess.run([*args[:4], "--resume", *args[4:]], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    restore_s = time.monotonic() - killed_at
    results = json.loads(max(tmp_path.glob("tune-*.json")).read_text())  # the killed run wrote none
    search = results["search"]
    assert search["restored"] and results["run_id"] == parent[0].info.run_id
    assert len(search["trials"]) == trials and all(t["status"] != "failed" for t in search["trials"]), search["trials"]
    study = optuna.load_study(study_name=name, storage=db)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == trials and not {"RUNNING", "WAITING"} & set(states), states
    points = [tuple(sorted(t.params.items())) for t in study.trials if t.state.name == "COMPLETE"]
    print(
        f"DRILL tune-driver-kill: killed with {done_at_kill}/{trials} trials complete; "
        f"restored={search['restored']} in the same parent run; after --resume "
        f"{states.count('COMPLETE')}/{trials} complete, {len(set(points))} distinct points, "
        f"study trials by state {dict(Counter(states))}; the {done_at_kill} done before the kill kept "
        f"({complete_before <= {t.number for t in study.trials if t.state.name == 'COMPLETE'}}); "
        f"restore to finish {restore_s:.0f} s; best {search['best_metrics'].get('val_f1_weighted', float('nan')):.3f}"
    )
    assert len(set(points)) == trials
    children = MlflowClient().search_runs([parent[0].info.experiment_id],
                                          f"tags.mlflow.parentRunId = '{results['run_id']}'")  # fmt: skip
    assert sorted(c.data.tags["ray_app.trial_id"] for c in children) == sorted(t["trial_id"] for t in search["trials"])
    assert mlflow.get_run(results["run_id"]).info.status == "FINISHED"


def _count(db: str, name: str, state: str) -> int:
    try:
        study = optuna.load_study(study_name=name, storage=db)
    except KeyError:
        return 0
    return sum(t.state.name == state for t in study.trials)
