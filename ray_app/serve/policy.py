"""Which model a request gets: the traffic policy (primary / canary / shadow) and the guard that takes a
misbehaving canary out of the split."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from ray_app.buckets import bucket
from ray_app.serve.settings import CanaryGuard, TrafficPolicy

log = logging.getLogger("ray.serve")
PRIMARY, CANARY, SHADOW, NAMED = "primary", "canary", "shadow", "named"


@dataclass(frozen=True)
class Route:
    model_id: str
    route: str
    shadow: str | None = None


def choose(policy: TrafficPolicy, caller: str | None, request_id: str, canary_enabled: bool = True) -> Route:
    """Callers without the sticky header are split by request id (still the right proportion, not sticky)."""
    if policy.canary and canary_enabled and bucket(caller or request_id) < policy.canary_weight:
        return Route(policy.canary, CANARY)
    return Route(policy.primary, PRIMARY, shadow=policy.shadow)


class Guard:
    """Recent outcomes of the canary; when they breach the limits the canary is taken out until the policy changes."""

    def __init__(self, limits: CanaryGuard) -> None:
        self.limits = limits
        self.outcomes: deque[tuple[bool, float]] = deque(maxlen=limits.window)
        self.tripped: str | None = None

    def record(self, ok: bool, latency_ms: float) -> str | None:
        """Returns the reason when this outcome trips the guard."""
        self.outcomes.append((ok, latency_ms))
        if self.tripped or len(self.outcomes) < self.limits.min_requests:
            return None
        errors = sum(1 for ok_, _ in self.outcomes if not ok_) / len(self.outcomes)
        p99 = float(np.percentile([ms for _, ms in self.outcomes], 99))
        if errors > self.limits.max_error_rate:
            self.tripped = f"error rate {errors:.3f} > {self.limits.max_error_rate}"
        elif p99 > self.limits.max_p99_ms:
            self.tripped = f"p99 {p99:.0f} ms > {self.limits.max_p99_ms} ms"
        if self.tripped:
            log.warning("canary taken out of the split: %s over its last %d requests", self.tripped, len(self.outcomes))
        return self.tripped
