"""The results JSON each `ray-app` command writes (what a script, DVC or the next command reads), and finding the
training run a later `ray-app register` continues from."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from ray_app.errors import AppError


def write_results(stage: str, payload: dict[str, Any], results_dir: Path, results_file: Path | None = None) -> Path:
    """A new timestamped file per run in `results_dir`, or exactly `results_file` (a fixed name, e.g. a DVC out)."""
    path = results_file or results_dir / f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    typer.echo(f"results: {path}")
    return path


def read_train_results(path: Path) -> dict[str, Any]:
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AppError(f"train results {path} cannot be read ({exc}); pass the JSON `ray-app train` wrote") from None
    if not isinstance(results, dict) or "run_id" not in results or "checkpoint_path" not in results.get("train", {}):
        raise AppError(f"{path} is not a `ray-app train` results JSON (it needs run_id and train.checkpoint_path)")
    return results


def latest_train_results(results_dir: Path) -> dict[str, Any]:
    files = sorted(results_dir.glob("train-*.json")) + sorted(results_dir.glob("pipeline-*.json"))
    if not files:
        raise AppError(
            f"no train results in {results_dir}; run `ray-app train` first or pass --checkpoint and --run-id"
        )
    return json.loads(max(files, key=lambda p: p.stat().st_mtime).read_text())
