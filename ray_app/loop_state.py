"""The loop's record in MLflow, which is also what a restarted controller resumes from.

One run per cycle (breach to outcome) in the `loop.experiment` experiment, tagged `loop_model`, with a nested run per
step (check, retrain, shadow, canary N %, gate) holding that step's numbers, verdict and reason. The cycle's whole
state is one JSON tag (`loop.cycle`), written with a single call before the step it names acts, so a controller
killed at any point finds the step it was in and re-applies it (every action is idempotent: the same traffic policy
again changes nothing, a recorded job id is looked up before anything is submitted) instead of repeating or
skipping one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from ray_app.config import AppConfig
from ray_app.loop_names import CANARY, STOPPED

CYCLE_TAG = "loop.cycle"


@dataclass
class Cycle:
    run_id: str
    model: str
    champion: str
    state: str
    ramp: list[float]
    challenger: str | None = None
    old_challenger: str | None = None
    step: int = 0
    step_run_id: str | None = None
    step_started: float = field(default_factory=time.time)
    job_id: str | None = None
    resumed: int = 0

    @property
    def weight(self) -> float:
        return self.ramp[self.step] if self.state == CANARY else 0.0

    @property
    def label(self) -> str:
        return f"{CANARY} {self.weight * 100:g} %" if self.state == CANARY else self.state


class LoopRecord:
    """Reads and writes cycles and their steps with MlflowClient (thread-safe, no active-run stack)."""

    def __init__(self, experiment_id: str, model: str) -> None:
        self.client = MlflowClient()
        self.experiment_id = experiment_id
        self.model = model

    @classmethod
    def for_config(cls, cfg: AppConfig) -> LoopRecord:
        """The record of `registry.model_name` in `loop.experiment` (created on first use)."""
        from ray_app.runtime import experiment_id

        return cls(experiment_id(cfg.loop.experiment, cfg.mlflow.artifact_location), cfg.registry.model_name)

    def open_cycle(self) -> Cycle | None:
        """The newest cycle of this model whose run is still RUNNING: the one a restarted controller continues."""
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.loop_model = '{self.model}' and tags.loop_role = 'cycle' and attributes.status = 'RUNNING'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs or CYCLE_TAG not in runs[0].data.tags:
            return None
        return Cycle(**json.loads(runs[0].data.tags[CYCLE_TAG]))

    def new_cycle(self, champion: str, state: str, ramp: list[float], reason: str) -> Cycle:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"loop-{self.model}-v{champion}-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={"loop_model": self.model, "loop_role": "cycle", "champion": champion, "breach_reasons": reason},
        )
        cycle = Cycle(run_id=run.info.run_id, model=self.model, champion=champion, state=state, ramp=ramp)
        self.save(cycle)
        return cycle

    def save(self, cycle: Cycle) -> None:
        """One tag write: the state a restart resumes from (plus a readable copy of the state)."""
        self.client.set_tag(cycle.run_id, CYCLE_TAG, json.dumps(asdict(cycle)))
        self.client.set_tag(cycle.run_id, "loop_state", cycle.label)

    def step_run(self, cycle: Cycle, name: str, tags: dict[str, str] | None = None, began: float | None = None) -> str:
        """The nested run of the cycle's current step: the recorded one when it is still running (a resumed step),
        else a new one; a step run left RUNNING by a controller killed between two writes is closed first."""
        if cycle.step_run_id:
            current = self.client.get_run(cycle.step_run_id)
            if current.info.status == "RUNNING" and current.data.tags.get(MLFLOW_RUN_NAME) == name:
                return cycle.step_run_id
        for run in self._running_steps(cycle):
            self.client.set_terminated(run, "KILLED")
        run = self.client.create_run(
            self.experiment_id,
            start_time=int((began or time.time()) * 1000),  # a check's run is opened once it has found the breach
            run_name=name,
            tags={MLFLOW_PARENT_RUN_ID: cycle.run_id, "loop_model": self.model, "loop_role": "step", **(tags or {})},
        )
        return run.info.run_id

    def _running_steps(self, cycle: Cycle) -> list[str]:
        runs = self.client.search_runs(
            [self.experiment_id],
            f"tags.mlflow.parentRunId = '{cycle.run_id}' and attributes.status = 'RUNNING'",
        )
        return [r.info.run_id for r in runs]

    def log(self, run_id: str, metrics: dict[str, float | None], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def end_step(self, run_id: str, verdict: str, reason: str) -> None:
        self.client.set_tag(run_id, "verdict", verdict)
        self.client.set_tag(run_id, "reason", reason)
        self.client.set_terminated(run_id, "FINISHED")

    def close(self, cycle: Cycle, outcome: str, reason: str) -> None:
        """The cycle's outcome; its run ends FINISHED, or KILLED when a human stopped it."""
        for run in self._running_steps(cycle):
            self.client.set_terminated(run, "KILLED")
        self.client.set_tag(cycle.run_id, "loop_state", outcome)
        self.client.set_tag(cycle.run_id, "outcome", outcome)
        self.client.set_tag(cycle.run_id, "reason", reason)
        status = RunStatus.to_string(RunStatus.KILLED if outcome == STOPPED else RunStatus.FINISHED)
        self.client.set_terminated(cycle.run_id, status)

    def describe(self, cycle: Cycle, text: str) -> None:
        self.client.set_tag(cycle.run_id, "mlflow.note.content", text)
