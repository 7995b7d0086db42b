"""The closed loop (`ray-app loop start`): for one registered model, drift check → retrain → shadow → canary ramp →
gate, with no human in between, every step an MLflow run (loop_state.py) and the state a gauge and `GET /models`'s
`loop` field.

The controller runs in a named, detached Ray actor per model (loop_actor.py: why an actor, and the lock).
Traffic changes go through traffic.py (Serve's REST API, the whole deployed config with one field changed); the
primary route stays `@champion`, so a promotion changes the served version without a redeploy of the pool.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd

from ray_app.canary_report import HOLD, PROMOTE, ROLLBACK, canary_report, window_labels
from ray_app.config import AppConfig, CanaryConfig
from ray_app.errors import AppError
from ray_app.loop_names import (
    CANARY,
    CHECKING,
    FAILED,
    GATE,
    HELD,
    IDLE,
    PROMOTED,
    RETRAINING,
    ROLLED_BACK,
    SHADOW,
    STOPPED,
)
from ray_app.loop_state import Cycle, LoopRecord
from ray_app.traffic import CHAMPION_ONLY, set_traffic

log = logging.getLogger("ray_app")


class Controller:
    """The loop's decisions, one `tick` at a time; the actor below only runs it in a thread."""

    def __init__(self, cfg: AppConfig) -> None:
        import mlflow
        from ray.data import DataContext

        from ray_app.runtime import quiet_progress_bars

        quiet_progress_bars()  # an actor has no terminal: every redraw would be a line in its log
        DataContext.get_current().enable_progress_bars = False
        mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
        self.cfg = cfg
        self.model = cfg.registry.model_name
        self.record = LoopRecord.for_config(cfg)
        self.cycle: Cycle | None = self.record.open_cycle()
        if self.cycle is not None and self.cycle.step_run_id is not None:  # a step had begun: this is a restart
            self.cycle.resumed += 1
            self.record.save(self.cycle)
        if self.cycle is not None:
            log.warning("loop %s: resuming cycle %s at %s", self.model, self.cycle.run_id, self.cycle.label)
            self._apply_traffic(self.cycle)  # the same policy again changes nothing; a half-done change completes
        self.state = self.cycle.label if self.cycle else IDLE
        self.last: dict[str, Any] = {}
        self.next_check = time.time()

    @property
    def phase(self) -> str:
        """The state without its canary weight."""
        return self.cycle.state if self.cycle else self.state

    # ---- what others see ---------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.cycle
        return {
            "state": self.state,
            "model": self.model,
            "champion": c.champion if c else None,
            "challenger": c.challenger if c else None,
            "canary_weight": c.weight if c else 0.0,
            "cycle_run_id": c.run_id if c else None,
            "step_started": c.step_started if c else None,
            "resumed": c.resumed if c else 0,
            "last": self.last,
            "next_check_in_s": None if c else max(0.0, round(self.next_check - time.time(), 1)),
        }

    # ---- one look ----------------------------------------------------------------------------------------------------

    def tick(self) -> None:
        if self.cycle is None:
            if time.time() >= self.next_check:
                self._check()
            return
        if self.cycle.step_run_id is None:  # killed between recording the step and opening its run
            self.cycle.step_run_id = self.record.step_run(self.cycle, _step_name(self.cycle))
            self.record.save(self.cycle)
        step = {RETRAINING: self._retraining, SHADOW: self._judge, CANARY: self._judge, GATE: self._gate}
        step[self.cycle.state](self.cycle)

    def _check(self) -> None:
        from ray_app.monitor import check

        self.state = CHECKING
        self.next_check = time.time() + self.cfg.loop.check_every_s
        cfg = self.cfg.replace(monitor={"on_breach": "report"})  # the loop submits the retrain itself, and waits
        try:
            checked_at = time.time()
            results = check(cfg, self.cfg.mlflow.tracking_uri, "@champion")
        except AppError as exc:
            self.last = {"check": "skipped", "reason": str(exc)}
            self.state = IDLE
            return
        self.last = {"check": results["run_id"], "breach": results["breach"], "drift_share": results["drift"]["share"]}
        if not results["breach"]:
            self.state = IDLE
            return
        self._begin_cycle(results, checked_at)

    def _begin_cycle(self, results: dict[str, Any], checked_at: float) -> None:
        from ray_app.registry import aliases

        reasons = "; ".join(results["breach_reasons"])
        cycle = self.record.new_cycle(results["model"]["version"], RETRAINING, list(self.cfg.loop.ramp), reasons)
        cycle.old_challenger = aliases(self.cfg.registry).get("challenger")
        cycle.job_id = f"loop-retrain-{self.model}-{cycle.run_id[:12]}"  # recorded before it is submitted
        self.record.save(cycle)
        check_run = self.record.step_run(cycle, "check", {"monitoring_run_id": results["run_id"]}, checked_at)
        self.record.log(check_run, {"drift_share": results["drift"]["share"], "rows": results["window"]["rows"]})
        self.record.end_step(check_run, "breach", reasons)
        self._enter(cycle, RETRAINING, {"job_id": cycle.job_id})
        log.warning("loop %s: breach on version %s (%s): retraining as job %s", self.model, cycle.champion,
                    reasons, cycle.job_id)  # fmt: skip

    # ---- the steps ---------------------------------------------------------------------------------------------------

    def _enter(self, cycle: Cycle, state: str, tags: dict[str, str] | None = None, step: int = 0, ended=None) -> None:
        """Record the next step first (one write), then close the step that ended (`ended`: its verdict and reason),
        open the new step's run and apply its traffic: a restart at any point redoes only idempotent work."""
        previous = cycle.step_run_id
        cycle.state, cycle.step, cycle.step_started, cycle.step_run_id = state, step, time.time(), None
        self.record.save(cycle)
        if previous and ended:
            self.record.end_step(previous, *ended)
        cycle.step_run_id = self.record.step_run(cycle, _step_name(cycle), tags)
        self.record.save(cycle)
        self.cycle, self.state = cycle, cycle.label
        self._apply_traffic(cycle)

    def _apply_traffic(self, cycle: Cycle) -> None:
        if cycle.state == SHADOW:
            change = {**CHAMPION_ONLY, "shadow": cycle.challenger}
        elif cycle.state == CANARY:
            change = {**CHAMPION_ONLY, "canary": cycle.challenger, "canary_weight": cycle.weight}
        else:
            change = CHAMPION_ONLY
        lc = self.cfg.loop
        set_traffic(lc.dashboard_address, lc.app_name, lc.deployment, change)

    def _retraining(self, cycle: Cycle) -> None:
        from ray.job_submission import JobStatus, JobSubmissionClient

        from ray_app.monitor_policy import submit_retrain
        from ray_app.registry import aliases

        jobs = JobSubmissionClient(self.cfg.loop.dashboard_address)
        if not any(j.submission_id == cycle.job_id for j in jobs.list_jobs()):
            submit_retrain(self.cfg, self.cfg.mlflow.tracking_uri, self.model, cycle.champion, cycle.job_id)
            return
        status = jobs.get_job_status(cycle.job_id)
        if status in (JobStatus.PENDING, JobStatus.RUNNING):
            if time.time() - cycle.step_started > self.cfg.loop.retrain_timeout_s:
                jobs.stop_job(cycle.job_id)
                self._finish(cycle, FAILED, f"retrain job {cycle.job_id} ran past loop.retrain_timeout_s")
            return
        if status != JobStatus.SUCCEEDED:
            self._finish(cycle, FAILED, f"retrain job {cycle.job_id} ended {status.value}; see its logs")
            return
        challenger = aliases(self.cfg.registry).get("challenger")
        if challenger in (None, cycle.old_challenger, cycle.champion):
            self._finish(cycle, FAILED, f"retrain job {cycle.job_id} registered no new challenger")
            return
        self.record.log(cycle.step_run_id, {"retrain_s": time.time() - cycle.step_started})
        cycle.challenger = challenger
        self.record.client.set_tag(cycle.run_id, "challenger", challenger)
        ended = ("trained", f"job {cycle.job_id} registered version {challenger}")
        self._enter(cycle, SHADOW, {"challenger": challenger}, ended=ended)

    def _bar(self, cycle: Cycle) -> CanaryConfig:
        """The canary bar of this step: in shadow only errors, the shadow agreement and `loop.shadow_max_p99_ms` judge
        (labels name the champion's answers, and shadow latency is the replica's load); at a canary step labels are
        required (`loop.require_labels`)."""
        if cycle.state == SHADOW:
            lc = self.cfg.loop
            update = {
                "require_labels": False,
                "min_agreement": lc.shadow_min_agreement,
                "max_p99_ms": lc.shadow_max_p99_ms,
            }
            return self.cfg.canary.model_copy(update=update)
        # agreement was shadow's question; shadow answers still in flight when the canary began must not hold it
        return self.cfg.canary.model_copy(update={"require_labels": self.cfg.loop.require_labels, "min_agreement": 0.0})

    def _evidence(self, cycle: Cycle) -> dict[str, Any] | None:
        """The canary report over the traffic served since this step began."""
        from ray_app.prediction_log import read_recent

        try:
            frame = read_recent(self.cfg.canary.log_uri, self.cfg.canary.window_minutes)
        except AppError:
            return None
        frame = frame[frame["timestamp"] >= pd.Timestamp(cycle.step_started, unit="s", tz="UTC")]
        labels = window_labels(self.cfg, None)
        return canary_report(frame, cycle.champion, cycle.challenger, self._bar(cycle), labels)

    def _judge(self, cycle: Cycle) -> None:
        report = self._evidence(cycle)
        waited = time.time() - cycle.step_started
        verdict, reason = (report["verdict"], report["reason"]) if report else (HOLD, "no prediction log yet")
        self.last = {"step": cycle.label, "verdict": verdict, "reason": reason, "waited_s": round(waited, 1)}
        if report:
            self.record.log(cycle.step_run_id, _numbers(report, cycle.weight), step=int(waited))
        if verdict == ROLLBACK:
            self._finish(cycle, ROLLED_BACK, f"{cycle.label}: {reason}", verdict)
        elif verdict == PROMOTE:
            following = 0 if cycle.state == SHADOW else cycle.step + 1
            if following < len(cycle.ramp):
                tags = {"weight": str(cycle.ramp[following])}
                self._enter(cycle, CANARY, tags, step=following, ended=(verdict, reason))
            else:
                self._enter(cycle, GATE, ended=(verdict, reason))
        elif waited > self.cfg.loop.step_timeout_s:
            self._finish(cycle, HELD, f"{cycle.label} held {waited:.0f} s > loop.step_timeout_s: {reason}", verdict)

    def _gate(self, cycle: Cycle) -> None:
        from ray_app.registry import aliases, promote

        current = aliases(self.cfg.registry)
        if current.get("champion") == cycle.challenger:  # promoted before a restart: do not ask the gate again
            self._finish(cycle, PROMOTED, f"version {cycle.challenger} is champion (resumed after the promotion)")
            return
        if current.get("challenger") != cycle.challenger:
            self._finish(cycle, FAILED, f"the challenger alias moved to {current.get('challenger')} during the cycle")
            return
        decision = promote(self.cfg.registry)
        scores = {"challenger_score": decision.challenger_score, "champion_score": decision.champion_score}
        self.record.log(cycle.step_run_id, {**scores, "rows": decision.n_rows})
        verdict = PROMOTE if decision.promoted else HOLD
        self._finish(cycle, PROMOTED if decision.promoted else HELD, f"gate: {decision.reason}", verdict)

    def _finish(
        self, cycle: Cycle, outcome: str, reason: str, verdict: str | None = None, traffic: bool = True
    ) -> None:
        """Traffic back to the champion alone (which, after a promotion, is the challenger), the outcome recorded."""
        if cycle.step_run_id:
            self.record.end_step(cycle.step_run_id, verdict or outcome, reason)
        if traffic:
            cycle.state = outcome
            self._apply_traffic(cycle)
        if outcome == ROLLED_BACK and cycle.challenger:
            self.record.client.set_model_version_tag(self.model, cycle.challenger, "loop", f"rolled back: {reason}")
        self.record.close(cycle, outcome, reason)
        self.record.describe(cycle, f"{outcome}: {reason}")
        log.warning("loop %s: %s: %s", self.model, outcome, reason)
        self.last = {"outcome": outcome, "reason": reason, "cycle_run_id": cycle.run_id, "challenger": cycle.challenger,
                     "resumed": cycle.resumed}  # fmt: skip
        self.cycle, self.state = None, outcome
        self.next_check = time.time() + self.cfg.loop.check_every_s

    def stop(self, keep_traffic: bool) -> None:
        if self.cycle is not None:
            self._finish(self.cycle, STOPPED, "stopped by `ray-app loop stop`", traffic=not keep_traffic)
        self.state = STOPPED


def _step_name(cycle: Cycle) -> str:
    return {RETRAINING: "retrain", GATE: GATE}.get(cycle.state, cycle.label)


def _numbers(report: dict[str, Any], weight: float) -> dict[str, float | None]:
    ch, champ = report["challenger"], report["champion"]
    return {
        "canary_weight": weight,
        "challenger_requests": ch["requests"],
        "challenger_error_rate": ch["error_rate"],
        "challenger_p99_ms": ch["p99_ms"],
        "challenger_accuracy": ch["accuracy"],
        "challenger_labelled": ch["labelled"],
        "champion_requests": champ["requests"],
        "champion_accuracy": champ["accuracy"],
        "shadow_agreement": report["shadow_agreement"],
    }


def hand_cycle(cfg: AppConfig, challenger: str) -> Cycle:
    """A cycle started by a person with a version of their own (`ray-app loop start --challenger V`): recorded as an
    open cycle at shadow, which the controller then resumes like any other; no check, no retrain."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ray_app.registry import aliases

    name = cfg.registry.model_name
    try:
        MlflowClient().get_model_version(name, challenger)
    except MlflowException:
        raise AppError(f"model {name} has no version {challenger!r} to put through the loop") from None
    champion = aliases(cfg.registry).get("champion")
    if champion is None or champion == challenger:
        raise AppError(f"model {name}: version {challenger} needs a champion other than itself to be compared with")
    record = LoopRecord.for_config(cfg)
    if record.open_cycle() is not None:
        raise AppError(f"model {name} has an open loop cycle; `ray-app loop start` without --challenger resumes it")
    cycle = record.new_cycle(champion, SHADOW, list(cfg.loop.ramp), f"started by hand with version {challenger}")
    cycle.challenger = challenger
    record.save(cycle)
    record.client.set_tag(cycle.run_id, "challenger", challenger)
    return cycle
