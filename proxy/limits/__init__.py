"""Counters for rate limits and budgets (issue 14; docs/limits.md, "Counters").

- `windows`: calendar windows (minute .. year in a time zone) and fixed windows, pure;
- `rate`: GCRA, exact in integers (`Gcra`, `decide`), `RateDecision` and the `RateLimiter` protocol;
- `headers`: the IETF `RateLimit` / `RateLimit-Policy` fields and `Retry-After`;
- `ledger`: budget spend with reservations (`ReserveResult`, `Settlement`, the `BudgetLedger` protocol);
- backends, each a RateLimiter and a BudgetLedger, exact across processes and replicas:
  `StoreCounters(store)` (SQLite or PostgreSQL, the state store), `RedisCounters(url)`,
  and `memory_counters()` (unit tests only);
- `CounterUnavailable`: the only error a backend raises for its own failure;
- `limit_key(*parts)`: an unambiguous counter key from request values.

Rate limits on the request path (imported by their users, not from here):
`spec` (the `rate_limits:` / route `rate_limit:` / `counters:` declarations),
`table` (checked against the connectors; which limits a request counts against),
`stage` (the `rate-limit` stage), `setup` (table + counters backend, built by
server.py) and `metrics` (`proctor_rate_limited_total`).
"""

from __future__ import annotations

from .errors import CounterUnavailable
from .headers import ratelimit, ratelimit_policy, retry_after
from .keys import limit_key
from .ledger import BudgetLedger, ReserveResult, Settlement, Usage
from .memory import memory_counters
from .rate import Gcra, RateDecision, RateLimiter, decide
from .store_backend import StoreCounters
from .windows import PERIODS, Window, fixed_window, window_for

__all__ = [
    "PERIODS",
    "BudgetLedger",
    "CounterUnavailable",
    "Gcra",
    "RateDecision",
    "RateLimiter",
    "ReserveResult",
    "Settlement",
    "StoreCounters",
    "Usage",
    "Window",
    "decide",
    "fixed_window",
    "limit_key",
    "memory_counters",
    "ratelimit",
    "ratelimit_policy",
    "retry_after",
    "window_for",
]
