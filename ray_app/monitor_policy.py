"""The policy in `monitor:`: what makes a check a breach, and the retrain a breach may submit.

Kept apart from the check so the rule (drift share, feedback accuracy) and the job it submits (`ray-app pipeline` as
a Ray job, the way `make run` submits it) read in one place and change without touching how a check measures.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Any

from ray_app.config import AppConfig, MonitorConfig
from ray_app.drift import Drift
from ray_app.errors import AppError

log = logging.getLogger("ray_app")


def breaches(drift: Drift, feedback: dict[str, Any] | None, mcfg: MonitorConfig) -> list[str]:
    """Why this check breaches the policy, one reason per rule broken; empty when it does not."""
    reasons = []
    if drift.detected:
        reasons.append(f"drift share {drift.share:.3f} > monitor.drift_share {mcfg.drift_share}")
    if feedback is not None and feedback["accuracy"] < mcfg.min_feedback_accuracy:
        reasons.append(
            f"feedback accuracy {feedback['accuracy']:.3f} < monitor.min_feedback_accuracy {mcfg.min_feedback_accuracy}"
        )
    return reasons


def retrain_command(cfg: AppConfig, tracking_uri: str, name: str) -> list[str]:
    """`ray-app pipeline` on `monitor.retrain.config`, pointed at this check's tracking server, experiment, model
    name and feedback store, plus `monitor.retrain.overrides`."""
    retrain = cfg.monitor.retrain
    sets = [
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment={cfg.mlflow.experiment}",
        f"registry.model_name={name}",
        f"pipeline.promote={str(retrain.promote).lower()}",
    ]
    if cfg.data.feedback_uri:
        uri = cfg.data.feedback_uri
        sets.append(f"data.feedback_uri={uri if '://' in uri else Path(uri).expanduser().resolve()}")
    sets += retrain.overrides
    return ["ray-app", "pipeline", "--config", retrain.config, *[a for s in sets for a in ("--set", s)]]


def submit_retrain(cfg: AppConfig, tracking_uri: str, name: str, version: str, submission_id: str | None = None) -> str:
    """Submit the training pipeline as a Ray job (as `make run` does); its pipeline registers a new challenger. A
    caller that must not submit twice (the loop, resuming) chooses the `submission_id` and records it first."""
    from ray.job_submission import JobSubmissionClient

    from ray_app.runtime import git_commit

    retrain = cfg.monitor.retrain
    address = retrain.dashboard_address or cfg.ray.address
    runtime_env: dict[str, Any] = {"env_vars": {"RAY_APP_GIT_COMMIT": git_commit()}}
    if retrain.working_dir:
        runtime_env["working_dir"] = str(Path(retrain.working_dir).expanduser().resolve())
    entrypoint = shlex.join(retrain_command(cfg, tracking_uri, name))
    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            # named in the Jobs tab
            submission_id=submission_id or f"retrain-{name}-v{version}-{time.strftime('%Y%m%d-%H%M%S')}",
            metadata={"ray_app": "retrain", "model": name, "drifted_version": version},
        )
    except (OSError, RuntimeError, ValueError) as exc:  # requests' ConnectionError is an OSError
        raise AppError(
            f"the retrain job could not be submitted to the Ray cluster at {address or 'RAY_ADDRESS'}: "
            f"{str(exc).splitlines()[0]}; set monitor.retrain.dashboard_address or ray.address"
        ) from None
    log.warning("breach: submitted retrain job %s: %s", job_id, entrypoint)
    return job_id
