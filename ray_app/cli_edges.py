"""What every `ray-app` command shares: its options, and the edge that loads the config once, handles errors and
writes the results JSON. Kept apart from cli.py so command groups in their own modules (loop_cli.py) import it
without importing each other."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from ray_app.config import AppConfig
from ray_app.config_loader import load_config
from ray_app.errors import AppError
from ray_app.results import write_results

log = logging.getLogger("ray_app")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", metavar="FILE", help="YAML config (configs/).")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", metavar="KEY=VALUE", help="Override, repeatable: -s train.lr=3e-4")
]
ResultsOpt = Annotated[Path, typer.Option("--results-dir", metavar="DIR", help="Where the results JSON goes.")]
ResultsFileOpt = Annotated[
    Path | None, typer.Option("--results-file", metavar="FILE", help="The results JSON at exactly this path.")
]
LabelsOpt = Annotated[Path | None, typer.Option(help="Labels for served requests (CSV/JSONL: request_id, item, label)")]


def run_command(
    stage: str,
    config: Path | None,
    overrides: list[str] | None,
    results_dir: Path,
    body: Callable[[AppConfig], dict[str, Any]],
    results_file: Path | None = None,
    updates: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Shared edges: config (file, --set, then the command's own flags as typed `updates`), logging, error handling
    and the results file."""
    from ray_app.runtime import quiet_ray_data_console

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    quiet_ray_data_console()
    started = time.perf_counter()
    try:
        cfg = load_config(config, overrides, updates)
        payload = body(cfg)
    except AppError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    payload.setdefault("duration_s", round(time.perf_counter() - started, 2))
    write_results(stage, payload, results_dir, results_file)


def connect(cfg: AppConfig, ray: bool = True):
    from ray_app.runtime import connect_ray, setup_mlflow

    tracking = setup_mlflow(cfg)
    if ray:
        connect_ray(cfg)
    return tracking
