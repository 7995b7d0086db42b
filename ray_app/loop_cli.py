"""`ray-app loop start|status|stop`: the closed loop's controller for `registry.model_name` (docs/loop.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ray_app.cli_edges import ConfigOpt, ResultsOpt, SetOpt, connect, run_command
from ray_app.config import AppConfig

loop_app = typer.Typer(
    no_args_is_help=True,
    help="The closed loop: drift check, retrain, shadow, canary ramp and promotion of one model, with no human.",
)


def _show(status: dict[str, Any]) -> None:
    typer.echo(json.dumps(status, indent=2, default=str))


@loop_app.command()
def start(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    results_dir: ResultsOpt = Path("results"),
    challenger: Annotated[
        str | None, typer.Option(help="A version of your own to shadow, canary and gate now (no check, no retrain).")
    ] = None,
) -> None:
    """Start the model's controller on the cluster (one per model: a second start is refused). It checks the
    champion for drift every loop.check_every_s and, on a breach, retrains and takes the new version through shadow,
    the canary ramp and the gate; or, with --challenger, takes that version through them now."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.loop_actor import start as start_loop
        from ray_app.loop_actor import with_explicit_paths

        tracking = connect(cfg)
        status = start_loop(with_explicit_paths(cfg), challenger)
        _show(status)
        return {"tracking_uri": tracking.uri, **status}

    run_command("loop-start", config, set_, results_dir, body)


@loop_app.command()
def status(config: ConfigOpt = None, set_: SetOpt = None, results_dir: ResultsOpt = Path("results")) -> None:
    """Where the model's loop is: its state, the versions in the cycle, the last verdict and why."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        import ray

        from ray_app.loop_actor import handle

        connect(cfg, ray=True)
        current = ray.get(handle(cfg.registry.model_name).status.remote(), timeout=60)
        _show(current)
        return current

    run_command("loop-status", config, set_, results_dir, body)


@loop_app.command()
def stop(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    results_dir: ResultsOpt = Path("results"),
    keep_traffic: Annotated[bool, typer.Option(help="Leave shadow/canary traffic as it is.")] = False,
) -> None:
    """Stop the loop at whatever step it is in: its cycle is recorded as stopped, traffic goes back to the champion
    (unless --keep-traffic), and the controller ends. `ray-app rollback` is always there too."""

    def body(cfg: AppConfig) -> dict[str, Any]:
        from ray_app.loop_actor import stop as stop_loop

        connect(cfg, ray=True)
        final = stop_loop(cfg.registry.model_name, keep_traffic)
        _show(final)
        return final

    run_command("loop-stop", config, set_, results_dir, body)
