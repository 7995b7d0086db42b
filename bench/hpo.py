"""Optuna TPE + ASHA vs random search without early stopping, same trial budget and seeds; tuned vs default config.

Why: early stopping and a model-based sampler are only worth their complexity if they reach the same best val F1
with far fewer trial-epochs (goal: <= 50 % of random search's epochs). One search's best is noisy (a ~115-row val
split), so every number is a median over search seeds. Also: the tuned config against the untuned default over
training seeds (test F1, rows no search saw), and Tune's overhead (one trial vs the same training run directly).

Sizes (real fine-tunes of the full 6-layer MiniLM on the full data set): max_length 64 (cuts no row), 4 epochs per
trial, 6 trials per search, two 1-CPU trials at a time; override any of it with --set. An encoder cut to 2 layers
was tried first to save time and dropped: it barely learns in 4 epochs (epoch-1 val F1 0.01 against 0.93 for the
full model), so that search compared noise.

    .venv/bin/python bench/hpo.py [--repeats 3] [--set tune.num_samples=8]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import config, connect, median, parse, parser, report

from ray_app.config import AppConfig
from ray_app.data import Splits, prepare
from ray_app.metrics import mlflow_name

SIZES = [
    "data.max_length=64",
    "train.epochs=4",
    "train.early_stopping_patience=null",  # only the scheduler stops trials early
    "train.torch_threads=1",
    "train.keep_checkpoints=1",
    "tune.num_samples=6",
    "tune.grace_period=1",
    "tune.reduction_factor=2",
    "tune.space={lr: {kind: loguniform, low: 1.0e-5, high: 1.0e-3}, weight_decay: {kind: uniform, low: 0.0, "
    "high: 0.1}, warmup_ratio: {kind: uniform, low: 0.0, high: 0.2}}",
]
METHODS = {
    "random": ["tune.sampler=random", "tune.scheduler=none"],
    "tpe_asha": ["tune.sampler=tpe", "tune.scheduler=asha"],
}
METRIC = "val_f1_weighted"


def search(cfg: AppConfig, splits: Splits, tracking, method: str, seed: int, storage: Path) -> dict[str, Any]:
    """One real search (run_search: Ray Tune + Optuna + Ray Train + MLflow); its per-epoch val F1 timeline comes back
    from the trials' MLflow runs, ordered by when each epoch was reported."""
    from ray_app.pipeline import with_absolute_paths
    from ray_app.tune import run_search

    study = f"bench-{method}-{seed}-{uuid.uuid4().hex[:6]}"
    storage.mkdir(parents=True, exist_ok=True)  # SQLite creates the file, not its directory
    cfg = with_absolute_paths(
        _with(cfg, *METHODS[method], f"tune.seed={seed}", f"tune.study_name={study}",
              f"tune.storage=sqlite:///{storage}/optuna.db", f"train.storage_path={storage}/ray")
    )  # fmt: skip
    started = time.perf_counter()
    with mlflow.start_run(run_name=study):
        found = run_search(cfg, tracking, splits)
    wall = time.perf_counter() - started
    client = MlflowClient()
    children = client.search_runs([tracking.experiment_id], f"tags.mlflow.parentRunId = '{found.parent_run_id}'")
    timeline = sorted(
        (m.timestamp, m.value) for c in children for m in client.get_metric_history(c.info.run_id, mlflow_name(METRIC))
    )
    return {
        "method": method,
        "seed": seed,
        "wall_s": wall,
        "timeline": [v for _, v in timeline],
        "best": max(v for _, v in timeline),
        "epochs": len(timeline),
        "stopped_early": sum(t["status"] == "stopped_early" for t in found.trials),
        "failed": sum(t["status"] == "failed" for t in found.trials),
        "best_params": found.best_params,
        "trial_s": [c.data.metrics.get("train/duration_s") for c in children],  # Tune's time_total_s per trial
    }


def epochs_to_reach(timeline: list[float], target: float) -> int | None:
    """Trial-epochs spent until the running best first reaches `target`; None if it never does."""
    best = float("-inf")
    for i, value in enumerate(timeline, start=1):
        best = max(best, value)
        if best >= target - 1e-9:
            return i
    return None


def train_and_test(cfg: AppConfig, splits: Splits, seed: int, storage: Path) -> dict[str, float]:
    """A plain Ray Train run (no Tune, no MLflow) and its best checkpoint's weighted F1 on the test split."""
    from ray.train import Checkpoint

    from ray_app.metrics import scores
    from ray_app.model import TextClassifier
    from ray_app.pipeline import with_absolute_paths
    from ray_app.train import MODEL_SUBDIR, train

    cfg = with_absolute_paths(cfg.replace(train={"seed": seed, "storage_path": str(storage)}))
    started = time.perf_counter()
    result = train(cfg, splits, f"bench-train-{uuid.uuid4().hex[:8]}", None, None)
    wall = time.perf_counter() - started
    with Checkpoint(result.checkpoint_path).as_directory() as ckpt:
        clf = TextClassifier.load(str(Path(ckpt) / MODEL_SUBDIR), cfg.data.max_length)
        preds = clf.predict_frame(splits.test, cfg.data.text_columns)["label"].tolist()
    return {"test_f1": scores(list(splits.test["label"]), preds)["f1_weighted"],
            "val_f1": result.best_metrics[METRIC], "wall_s": wall}  # fmt: skip


def _with(cfg: AppConfig, *overrides: str) -> AppConfig:
    """The benchmark's method presets and the user's --set strings, parsed like `ray-app --set`."""
    from ray_app.config_loader import apply_override, parse_override

    tree = cfg.model_dump()
    for item in overrides:
        apply_override(tree, *parse_override(item))
    return AppConfig.model_validate(tree)


def main() -> None:
    import os

    from ray_app.local import start_mlflow, start_ray_head, stop_mlflow, stop_ray_head
    from ray_app.ports import free_port
    from ray_app.runtime import setup_mlflow

    args = parse(parser(__doc__.splitlines()[0]))
    root = Path(tempfile.mkdtemp(prefix="bench-hpo-"))
    port = free_port()
    mlflow_pid = start_mlflow(root / "mlflow", port)
    head = None
    if not args.address:  # its own `ray start --head` (not ray.init's local instance): see local.start_ray_head
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        temp = Path(tempfile.mkdtemp(prefix="rt-"))
        args.address, _, pids = start_ray_head(temp, free_port(), free_port(), num_cpus=2)
        head = (temp, pids)
    try:
        cfg = config(args, *SIZES, f"mlflow.tracking_uri=http://127.0.0.1:{port}", "mlflow.experiment=bench-hpo")
        cfg = _with(cfg, *args.overrides)  # the user's --set wins over the sizes above
        import transformers

        transformers.logging.set_verbosity_error()
        tracking = setup_mlflow(cfg)
        init_s = connect(args.address)
        splits = prepare(cfg.data)
        print(f"train rows {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}; "
              f"{cfg.tune.num_samples} trials x <= {cfg.train.epochs} epochs per search; ray.init {init_s:.1f}s",
              flush=True)  # fmt: skip
        runs = run_all(args, cfg, splits, tracking, root)
    finally:
        if head:
            import ray

            ray.shutdown()
            stop_ray_head(*head)
        stop_mlflow(mlflow_pid, root / "mlflow")
        shutil.rmtree(root, ignore_errors=True)
    tables(args, cfg, runs)


def run_all(args, cfg: AppConfig, splits: Splits, tracking, root: Path) -> dict[str, Any]:
    searches: list[dict[str, Any]] = []
    for seed in range(args.repeats):  # alternate who goes first, so drift in machine load hits both alike
        order = ("random", "tpe_asha") if seed % 2 == 0 else ("tpe_asha", "random")
        for method in order:
            storage = root / f"{method}-{seed}"
            searches.append(search(cfg, splits, tracking, method, seed, storage))
            shutil.rmtree(storage, ignore_errors=True)
            s = searches[-1]
            print(f"seed {seed} {method}: best {s['best']:.3f} in {s['epochs']} epochs, {s['wall_s']:.0f}s, "
                  f"{s['stopped_early']} stopped early, {s['failed']} failed", flush=True)  # fmt: skip
    tpe = [s for s in searches if s["method"] == "tpe_asha"]
    tuned_params = max(tpe, key=lambda s: s["best"])["best_params"]
    tuned_cfg = _with(cfg, *[f"{_key(k)}={v}" for k, v in tuned_params.items()])
    trained: dict[str, list[dict[str, float]]] = {"default": [], "tuned": []}
    for seed in range(args.repeats):
        for name, c in (("default", cfg), ("tuned", tuned_cfg)):
            storage = root / f"train-{name}-{seed}"
            trained[name].append(train_and_test(c, splits, seed, storage))
            shutil.rmtree(storage, ignore_errors=True)
            print(f"train seed {seed} {name}: {trained[name][-1]}", flush=True)
    one = _with(cfg, "tune.num_samples=1", "tune.sampler=random", "tune.scheduler=none", "train.seed=0")
    storage = root / "overhead"
    overhead = search(one, splits, tracking, "random", 0, storage)
    shutil.rmtree(storage, ignore_errors=True)
    return {"searches": searches, "tuned_params": tuned_params, "trained": trained, "overhead": overhead}


def _key(name: str) -> str:
    from ray_app.tune_config import TUNABLE

    return ".".join(TUNABLE[name])


def tables(args, cfg: AppConfig, runs: dict[str, Any]) -> None:
    searches = runs["searches"]
    by = {m: [s for s in searches if s["method"] == m] for m in METHODS}
    reach = []
    for seed in range(args.repeats):
        rnd = next(s for s in by["random"] if s["seed"] == seed)
        tpe = next(s for s in by["tpe_asha"] if s["seed"] == seed)
        reach.append({"seed": seed, "random_best": rnd["best"], "tpe_best": tpe["best"],
                      "random_epochs_to_own_best": epochs_to_reach(rnd["timeline"], rnd["best"]),
                      "tpe_epochs_to_random_best": epochs_to_reach(tpe["timeline"], rnd["best"])})  # fmt: skip
    reached = [r for r in reach if r["tpe_epochs_to_random_best"] is not None]

    def med(method: str, key: str) -> float:
        return median([float(s[key]) for s in by[method]])

    rows = [
        {"metric": "best val F1 reached", "random": med("random", "best"), "tpe_asha": med("tpe_asha", "best")},
        {"metric": "total trial-epochs spent", "random": med("random", "epochs"),
         "tpe_asha": med("tpe_asha", "epochs")},
        {"metric": "trial-epochs to reach random's best (random: to its own best)",
         "random": median([float(r["random_epochs_to_own_best"]) for r in reach]),
         "tpe_asha": median([float(r["tpe_epochs_to_random_best"]) for r in reached]) if reached else None},
        {"metric": f"seeds where TPE+ASHA reached random's best (of {args.repeats})", "random": None,
         "tpe_asha": float(len(reached))},
        {"metric": "trials stopped early", "random": med("random", "stopped_early"),
         "tpe_asha": med("tpe_asha", "stopped_early")},
        {"metric": "search wall s", "random": med("random", "wall_s"), "tpe_asha": med("tpe_asha", "wall_s")},
    ]  # fmt: skip
    print("per seed:", *reach, sep="\n  ")
    report("hpo", "random", "tpe_asha", rows, args, {"sizes": SIZES, "per_seed": reach, "searches": searches})
    trained = runs["trained"]

    def tmed(name: str, key: str) -> float:
        return median([r[key] for r in trained[name]])

    rows = [
        {"metric": f"test F1 weighted (median of {args.repeats} training seeds)", "default": tmed("default", "test_f1"),
         "tuned": tmed("tuned", "test_f1")},
        {"metric": "best val F1 weighted", "default": tmed("default", "val_f1"), "tuned": tmed("tuned", "val_f1")},
        {"metric": "min..max test F1 over seeds", "default": None, "tuned": None},
    ]  # fmt: skip
    spread = {n: (min(r["test_f1"] for r in trained[n]), max(r["test_f1"] for r in trained[n])) for n in trained}
    rows[-1]["metric"] += f" (default {spread['default'][0]:.3f}..{spread['default'][1]:.3f}, " + (
        f"tuned {spread['tuned'][0]:.3f}..{spread['tuned'][1]:.3f})"
    )
    report("hpo_tuned", "default", "tuned", rows, args, {"tuned_params": runs["tuned_params"], "trained": trained})
    over = runs["overhead"]
    direct = trained["default"][0]["wall_s"]  # the same config and seed 0, trained directly
    rows = [
        {"metric": "one training run, wall s (Tune: the trial's time_total_s)", "direct": direct,
         "tune": over["trial_s"][0]},
        {"metric": "whole 1-trial search, wall s (Tuner.fit + study + MLflow parent, plots)", "direct": direct,
         "tune": over["wall_s"]},
    ]  # fmt: skip
    report("hpo_overhead", "direct", "tune", rows, args, {"overhead": over})


if __name__ == "__main__":
    main()
