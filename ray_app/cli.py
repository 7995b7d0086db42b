"""`ray-app <stage>`: each command loads the config once, connects, runs one stage and writes a results JSON."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from ray_app.cli_edges import (
    ConfigOpt,
    LabelsOpt,
    ResultsFileOpt,
    ResultsOpt,
    SetOpt,
    connect,
    run_command,
)
from ray_app.config import AppConfig
from ray_app.loop_cli import loop_app
from ray_app.results import latest_train_results, read_train_results

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Prepare, train, evaluate, register and promote the projects classifier on Ray + MLflow.\n\nExamples: "
    "ray-app pipeline -c configs/default.yaml; ray-app train -c configs/smoke.yaml -s train.epochs=1",
)
log = logging.getLogger("ray_app")


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"ray-app {version('ray_app')}")
        raise typer.Exit()


VersionOpt = Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")]


@app.callback()
def _options(version: VersionOpt = False) -> None:
    """The options before the command."""


@app.command()
def data(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    results_dir: ResultsOpt = Path("results"),
    results_file: ResultsFileOpt = None,
) -> None:
    """Read, validate and split the data set; report bad rows by reason."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        import mlflow

        from ray_app.data import log_to_mlflow, prepare

        tracking = connect(cfg)
        splits = prepare(cfg.data)
        with mlflow.start_run(run_name="data") as run:
            log_to_mlflow(splits, cfg.data)
        return {"tracking_uri": tracking.uri, "run_id": run.info.run_id, "data": splits.report.to_dict()}

    run_command("data", config, set_, results_dir, body, results_file)


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    results_dir: ResultsOpt = Path("results"),
    results_file: ResultsFileOpt = None,
) -> None:
    """Fine-tune with Ray Train; re-running after a crash resumes from the last checkpoint."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.data import prepare
        from ray_app.pipeline import run_training, training_run

        tracking = connect(cfg)
        splits = prepare(cfg.data)
        with training_run(cfg, tracking, splits, "train") as (run_id, name):
            result = run_training(cfg, tracking, splits, run_id, name)
        return {"tracking_uri": tracking.uri, "run_id": run_id, "train": result.to_dict()}

    run_command("train", config, set_, results_dir, body, results_file)


@app.command()
def register(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[
        str | None, typer.Option(help="Checkpoint path or URI (default: latest train results)")
    ] = None,
    run_id: Annotated[str | None, typer.Option(help="Training run to log the model into")] = None,
    train_results: Annotated[
        Path | None, typer.Option(help="A `ray-app train` results JSON to take both from (default: the newest)")
    ] = None,
    results_dir: ResultsOpt = Path("results"),
    results_file: ResultsFileOpt = None,
) -> None:
    """Log a training checkpoint as an MLflow model and register it as `challenger`."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.pipeline import register_trained

        ckpt, rid = checkpoint, run_id
        if ckpt is None or rid is None:
            latest = read_train_results(train_results) if train_results else latest_train_results(results_dir)
            ckpt, rid = ckpt or latest["train"]["checkpoint_path"], rid or latest["run_id"]
        tracking = connect(cfg)
        return {"tracking_uri": tracking.uri, "model": register_trained(cfg, ckpt, rid).to_dict()}

    run_command("register", config, set_, results_dir, body, results_file)


@app.command()
def evaluate(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str | None, typer.Option(help="Model URI (default: models:/NAME@challenger)")] = None,
    data_file: Annotated[Path | None, typer.Option("--data", help="Labelled CSV (default: the test split)")] = None,
    results_dir: ResultsOpt = Path("results"),
    results_file: ResultsFileOpt = None,
) -> None:
    """Evaluate a registered model on the test split or any labelled CSV, beside the TF-IDF baseline."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.pipeline import evaluate_model

        tracking = connect(cfg)
        return {"tracking_uri": tracking.uri, **evaluate_model(cfg, model, data_file)}

    run_command("evaluate", config, set_, results_dir, body, results_file)


@app.command()
def promote(config: ConfigOpt = None, set_: SetOpt = None, results_dir: ResultsOpt = Path("results")) -> None:
    """Move `champion` to the challenger if it clears the minimum and beats the champion by the margin."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.registry import aliases
        from ray_app.registry import promote as gate

        tracking = connect(cfg, ray=False)
        decision = gate(cfg.registry)
        return {"tracking_uri": tracking.uri, **decision.to_dict(), "aliases": aliases(cfg.registry)}

    run_command("promote", config, set_, results_dir, body)


@app.command()
def rollback(config: ConfigOpt = None, set_: SetOpt = None, results_dir: ResultsOpt = Path("results")) -> None:
    """Move `champion` back to the `previous` version."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.registry import aliases
        from ray_app.registry import rollback as back

        tracking = connect(cfg, ray=False)
        return {"tracking_uri": tracking.uri, **back(cfg.registry), "aliases": aliases(cfg.registry)}

    run_command("rollback", config, set_, results_dir, body)


@app.command("canary-report")
def canary_report(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    results_dir: ResultsOpt = Path("results"),
    labels: LabelsOpt = None,
) -> None:
    """Challenger vs champion on live traffic and the labels for it: promote, hold or roll back, with the numbers."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.canary_report import compare_aliases, format_report

        tracking = connect(cfg, ray=False)
        result = compare_aliases(cfg, labels)
        typer.echo(format_report(result))
        return {"tracking_uri": tracking.uri, "model": cfg.registry.model_name, "log_uri": cfg.canary.log_uri, **result}

    run_command("canary-report", config, set_, results_dir, body)


@app.command()
def replay(
    url: Annotated[str, typer.Option(help="The Serve app's base URL")] = "http://127.0.0.1:8000",
    labels_out: Annotated[Path, typer.Option(help="Where to write request_id,item,label")] = Path(
        "results/replay-labels.csv"
    ),
    concurrency: Annotated[int, typer.Option(min=1, max=64)] = 4,
    api_key_env: Annotated[str, typer.Option(help="Env var holding the app's API key")] = "RAY_APP_API_KEY",
    settle_s: Annotated[
        float, typer.Option(help="Wait this long at the end: the app writes its log every flush_interval_s (5 s)")
    ] = 6.0,
    shift: Annotated[
        str, typer.Option(help="none, or titles-only: send titles without descriptions (a drift to see)")
    ] = "none",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    results_dir: ResultsOpt = Path("results"),
    results_file: ResultsFileOpt = None,
) -> None:
    """Send the champion's frozen test rows through the served app: a real prediction log and its labels file."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.replay import replay as send
        from ray_app.runtime import secret_from_env

        tracking = connect(cfg, ray=False)
        result = send(cfg, url, labels_out, secret_from_env(api_key_env), concurrency, shift)
        time.sleep(settle_s)  # so a `ray-app monitor` right after sees every replayed row in the log
        typer.echo(f"replayed {result.sent} rows to {url}: statuses {result.statuses}, accuracy {result.accuracy}")
        return {"tracking_uri": tracking.uri, **result.to_dict()}

    run_command("replay", config, set_, results_dir, body, results_file)


@app.command()
def monitor(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[str, typer.Option(help="Version: NAME/VERSION, NAME@ALIAS, VERSION or @ALIAS")] = "@champion",
    labels: LabelsOpt = None,
    last_n: Annotated[int | None, typer.Option(help="Window: the newest N served rows (monitor.last_n)")] = None,
    minutes: Annotated[float | None, typer.Option(help="Window: the last N minutes (monitor.minutes)")] = None,
    results_dir: ResultsOpt = Path("results"),
) -> None:
    """Drift of served traffic against the version's reference (Evidently -> MLflow, Prometheus gauges), feedback
    accuracy with --labels, and the breach policy (monitor.on_breach). Exits 1 on a breach, after the results JSON."""
    outcome: dict[str, Any] = {}

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.monitor import check, format_summary

        tracking = connect(cfg)
        outcome.update(check(cfg, tracking.uri, model, labels))
        typer.echo(format_summary(outcome))
        return outcome

    window = {k: v for k, v in {"last_n": last_n, "minutes": minutes}.items() if v}
    run_command("monitor", config, set_, results_dir, body, updates={"monitor": window})
    if outcome.get("breach"):
        raise typer.Exit(1)


@app.command()
def feedback(
    file: Annotated[Path, typer.Argument(help="Labels: CSV or JSONL with request_id, label and optional item")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    results_dir: ResultsOpt = Path("results"),
) -> None:
    """Join labelled feedback to the prediction log, check it like training rows and append it to the feedback store
    (data.feedback_uri) that later training runs add to the training split."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.feedback import add_feedback
        from ray_app.runtime import connect_ray

        connect_ray(cfg)  # the prediction log is read with Ray Data
        result = add_feedback(cfg, file)
        typer.echo(f"feedback: {result['stored']} of {result['rows']} rows stored in {result['store']}; "
                   f"not stored: {result['bad'] or 'none'}")  # fmt: skip
        return result

    run_command("feedback", config, set_, results_dir, body)


@app.command()
def pipeline(config: ConfigOpt = None, set_: SetOpt = None, results_dir: ResultsOpt = Path("results")) -> None:
    """data -> train -> evaluate -> register -> promote, in one MLflow run."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.pipeline import run_pipeline

        return run_pipeline(cfg, connect(cfg))

    run_command("pipeline", config, set_, results_dir, body)


@app.command()
def tune(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the study (restoring a search whose driver died).")
    ] = False,
    results_dir: ResultsOpt = Path("results"),
    results_file: ResultsFileOpt = None,
) -> None:
    """Ray Tune + Optuna search with ASHA; the best trial is evaluated and registered as `challenger`."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.pipeline import run_tune

        return run_tune(cfg, connect(cfg))

    run_command(
        "tune", config, set_, results_dir, body, results_file, updates={"tune": {"resume": True}} if resume else None
    )


@app.command()
def batch(
    model: Annotated[str, typer.Option(help="NAME/VERSION, NAME@ALIAS, VERSION or @ALIAS (as in serving)")],
    input_: Annotated[str, typer.Option("--input", help="A CSV, Parquet or JSON Lines file, a directory, or a glob")],
    output: Annotated[str, typer.Option(help="Directory for predictions/ (Parquet) and the errors file")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace results already in --output")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    results_dir: ResultsOpt = Path("results"),
) -> None:
    """Ray Data batch inference with a registered version; bad rows go to an errors file with their reason."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.batch import run_batch

        tracking = connect(cfg)
        result = run_batch(cfg, model, input_, output, tracking.uri, overwrite=overwrite)
        typer.echo(result.summary())
        return {"tracking_uri": tracking.uri, **result.to_dict()}

    run_command("batch", config, set_, results_dir, body)


@app.command("make-tiny-model")
def make_tiny_model(out: Annotated[Path, typer.Option(help="Directory to write the model to")]) -> None:
    """A tiny random BERT with the bundled tokenizer, for smoke runs and tests (configs/smoke.yaml)."""
    from ray_app.model import make_tiny_model as make

    typer.echo(f"tiny model: {make(out)}")


@app.command()
def kuberay(
    serve_config: Annotated[Path, typer.Option(help="The Serve config to derive from")] = Path("serve_config.yaml"),
    out: Annotated[Path, typer.Option(help="The RayService to update")] = Path("deploy/kuberay/rayservice.yaml"),
) -> None:
    """Regenerate serveConfigV2 of the KubeRay RayService from serve_config.yaml (only pod-specific values differ)."""
    from ray_app.deploy import write_rayservice

    changed = write_rayservice(serve_config, out)
    typer.echo(f"{out}: {'updated' if changed else 'up to date'}")


app.add_typer(loop_app, name="loop")


def main() -> None:
    from ray_app.registry_auth import use_node_credentials

    try:
        use_node_credentials()  # a protected registry: the node's MLflow user, read once, before any client exists
    except (OSError, KeyError) as exc:
        typer.echo(f"error: MLflow credentials from $RAY_APP_MLFLOW_CREDENTIALS: {exc}", err=True)
        sys.exit(2)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
