"""Rate limits from the config and the manifests, with their counters backend (server.py builds it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .rate import RateLimiter
from .table import LimitTable, build_table


@dataclass
class RateLimits:
    """The compiled limits and the counters they count in (None when nothing is limited)."""

    table: LimitTable
    counters: RateLimiter
    sweep_interval_seconds: float = 60.0

    @property
    def backend(self) -> str:
        return self.counters.backend

    async def close(self) -> None:
        close = getattr(self.counters, "close", None)
        if close is not None:
            await close()


def build_rate_limits(config: Any, manifests: Iterable[Any], workflow_actions: frozenset[str],
                      store: Any) -> RateLimits | None:
    """`config` is the ProctorConfig. Raises LimitConfigError (a ValueError) for declarations
    that cannot work, ValueError for a counters section that cannot (an unset redis_url_env)."""
    table = build_table(config.rate_limits, manifests, workflow_actions)
    if not table:
        return None
    c = config.counters
    counters: RateLimiter
    if c.backend == "redis":
        from .redis_backend import RedisCounters

        counters = RedisCounters(config.counters_redis_url, prefix=c.prefix, timeout=c.timeout_seconds)
    else:
        from .store_backend import StoreCounters

        counters = StoreCounters(store)
    return RateLimits(table, counters, c.sweep_interval_seconds)
