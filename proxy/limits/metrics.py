"""`proctor_rate_limited_total{limit,outcome}` (docs/metrics.md): one count per counter a
request was counted against. Labels stay few: the limit's name, never its keys."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .stage import OUTCOMES


class RateLimitMetrics:
    def __init__(self, registry: Any, limits: Iterable[str] = ()) -> None:
        from prometheus_client import Counter

        self.counter = Counter(
            "proctor_rate_limited",
            "Requests counted against a rate limit, by limit and outcome: allowed, throttled (429), "
            "shadow_throttled (a shadow limit would have refused it; forwarded), unavailable (the counters could "
            "not answer: 503, or passed unchecked when the limit fails open).",
            ["limit", "outcome"],
            registry=registry,
        )
        for name in limits:  # every declared limit shows from the start, at 0
            for outcome in OUTCOMES:
                self.counter.labels(name, outcome)

    def count(self, limit: str, outcome: str) -> None:
        self.counter.labels(limit, outcome).inc()
