"""What a search leaves in MLflow: each trial's final status on its nested run, the trials table, the chosen trial's
params and metrics on the parent run, and Optuna's plots of the whole study."""

from __future__ import annotations

import logging
import re
from typing import Any

import mlflow
import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

from ray_app.config import AppConfig
from ray_app.runtime import Tracking
from ray_app.study import plots
from ray_app.tune_config import TuneConfig

log = logging.getLogger("ray_app")
TRIAL_TAG = "ray_app.trial_id"


def trial_status(result, epochs: int) -> str:
    """Tune's view, since Optuna records an ASHA-stopped trial as complete."""
    if result.error is not None:
        return "failed"
    last = result.metrics or {}
    if last.get("epoch", 0) < epochs and not last.get("early_stopped"):
        return "stopped_early"
    return "completed"


def record_trials(grid, cfg: AppConfig, tracking: Tracking, parent: str) -> list[dict[str, Any]]:
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
            client.log_metric(run_id, "train/duration_s", row["duration_s"])
            client.set_terminated(run_id, {"failed": "FAILED", "stopped_early": "KILLED"}.get(status, "FINISHED"))
    return rows


def _error_line(error: BaseException | None) -> str:
    """The line of a trial's error that says what went wrong: Ray's first lines name the actor, its last the cause."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error or "").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else ""


def log_parent(trials: list[dict], chosen: dict[str, Any], study: optuna.Study, tc: TuneConfig) -> None:
    """Best params and metrics, the trials table, and Optuna's own plots of the persistent study (the Pareto front
    in multi-objective mode)."""
    mlflow.log_params({f"best.{k}": v for k, v in chosen["best_params"].items()})
    prefixes = ("val_", "train_", "latency", "param")
    mlflow.log_metrics({f"best/{k}": float(v) for k, v in chosen["best_metrics"].items()
                        if isinstance(v, (int, float)) and k.startswith(prefixes)})  # fmt: skip
    mlflow.log_text(pd.DataFrame(trials).to_csv(index=False), "tune/trials.csv")
    counts = pd.Series([t["status"] for t in trials]).value_counts().to_dict()
    mlflow.log_metrics({f"tune/trials_{status}": n for status, n in counts.items()})
    mlflow.log_metric("tune/study_trials", len(study.trials))
    if chosen.get("pareto_front") is not None:
        mlflow.log_dict({"selection": chosen["selection"], "front": chosen["pareto_front"]}, "tune/pareto_front.json")
    for name, plot in plots(study, tc).items():
        try:
            ax = plot()
        except (ValueError, RuntimeError) as exc:  # e.g. too few finished trials for importances
            log.warning("skipped the %s plot: %s", name, exc)
            continue
        _log_axes(ax, f"tune/{name}.png")


def _log_axes(ax, artifact: str) -> None:
    import matplotlib.pyplot as plt

    fig = (ax[0] if hasattr(ax, "__len__") else ax).figure
    fig.set_size_inches(9, 5)
    mlflow.log_figure(fig, artifact)
    plt.close(fig)
