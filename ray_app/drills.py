"""Failure drills: a Train worker that fails on purpose, so the tests can prove that a crash resumes from the last
checkpoint and that a failed trial is recorded while the search goes on.

A drill is passed by code (`pipeline.run_training(..., drill=)`, `pipeline.run_tune(..., drill=)`), never through a
run's configuration: a production config cannot switch one on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FailureDrill:
    """A worker raises once, right after checkpointing epoch `after_epoch` (not again when the run resumes)."""

    after_epoch: int
    trial_params: dict[str, Any] = field(default_factory=dict)  # in a search: only the trials with these values

    def for_trial(self, params: dict[str, Any]) -> FailureDrill | None:
        """This drill when a trial with `params` is one it targets, else None."""
        return self if all(params.get(k) == v for k, v in self.trial_params.items()) else None

    def fires(self, epoch: int, resumed_from: int) -> bool:
        """True once: at `after_epoch` of a run that started from scratch (a resumed one goes on)."""
        return epoch == self.after_epoch and resumed_from == 0
