"""Rate limits: the generic cell rate algorithm (GCRA), exact, and the RateLimiter protocol.

GCRA (as in redis-cell and throttled) keeps one number per key, the
theoretical arrival time (TAT). With `limit` requests per `period` the
emission interval is T = period / limit; `burst` requests may arrive at once
(the tolerance is burst * T; the default burst is the limit: a full period's
quota at once, then one request every T). A request of cost c at time `now`
conforms when max(TAT, now) + c*T - now <= burst * T; then the TAT moves there.

Exact, not approximately right: T is rarely a whole number of milliseconds
(60 s / 7), and float TATs drift. Time is counted in whole milliseconds and the
TAT kept as `tat_ms + frac / limit` milliseconds (RateState), so every
comparison is between integers scaled by `limit`; the Redis script does the
same integer arithmetic (below 2**53, where its doubles are exact). A burst of
B from a full bucket admits exactly B, and the long-run rate is exactly
limit / period.

Reported times are rounded *up* to the millisecond: a client that waits
`retry_after` seconds and asks again is admitted (and `now` is floored to the
millisecond, so a request is never early by rounding).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..store.counters import RateState

MAX_LIMIT = 10_000_000  # requests per period, and burst
MAX_SCALED = 2**53 - 1  # (burst + cost) * period_ms must stay below this (exact in Redis' Lua doubles)


@dataclass(frozen=True)
class RateDecision:
    """What a limiter decided for one request; enough for 429 + Retry-After and the IETF RateLimit fields."""

    allowed: bool
    remaining: int  # requests (quota units) that could pass right now, after this one
    limit: int  # quota per period (RateLimit-Policy q)
    period_seconds: float  # (RateLimit-Policy w)
    burst: int  # most requests admitted at once
    reset_after: float  # seconds until the full burst is available again (0: it is)
    retry_after: float  # seconds until a request of this cost would pass (0 when allowed; inf: never, cost > burst)
    refill_after: float  # seconds until `remaining` grows by one (0 when full): RateLimit t


@dataclass(frozen=True)
class Gcra:
    """A validated rate: `limit` per `period_ms` milliseconds, at most `burst` at once."""

    limit: int
    period_ms: int
    burst: int

    @classmethod
    def of(cls, limit: int, period_seconds: float, burst: int | None = None) -> Gcra:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"a rate limit is 1 to {MAX_LIMIT} requests per period, not {limit!r}")
        if (isinstance(period_seconds, bool) or not isinstance(period_seconds, (int, float))
                or not math.isfinite(period_seconds) or period_seconds <= 0):
            raise ValueError(f"a rate-limit period is a positive number of seconds, not {period_seconds!r}")
        period_ms = round(period_seconds * 1000)
        if period_ms < 1 or abs(period_ms - period_seconds * 1000) > 1e-6 * max(1.0, period_seconds):
            raise ValueError(f"a rate-limit period is a whole number of milliseconds, not {period_seconds!r} s")
        b = limit if burst is None else burst
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_LIMIT:
            raise ValueError(f"a burst is 1 to {MAX_LIMIT} requests, not {burst!r}")
        g = cls(limit=limit, period_ms=period_ms, burst=b)
        g._check_cost(1)
        return g

    @property
    def period_seconds(self) -> float:
        return self.period_ms / 1000

    def _check_cost(self, cost: int) -> None:
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ValueError(f"a request's cost is a whole number >= 0, not {cost!r}")
        if (self.burst + cost) * self.period_ms > MAX_SCALED:
            raise ValueError("rate limit out of range: (burst + cost) x period in ms must stay below 2**53")

    def decide(self, state: RateState | None, now: float, cost: int = 1) -> tuple[RateState | None, RateDecision]:
        """The decision for a request of `cost` at `now` given the key's state (None: no state),
        and the state to store (None: leave it; a refused request or cost 0 changes nothing)."""
        self._check_cost(cost)
        allowed, new, diff_after, retry_scaled = gcra_step(state, now_ms(now), cost, self.limit, self.period_ms,
                                                          self.burst)
        return new, self.decision(allowed, diff_after, retry_scaled)

    def decision(self, allowed: bool, diff_after: int, retry_scaled: int) -> RateDecision:
        """The decision from the scaled integers of `gcra_step` (or the Redis script)."""
        L, P, B = self.limit, self.period_ms, self.burst
        tau = B * P
        remaining = max(0, min(B, (tau - diff_after) // P))
        refill = 0 if remaining >= B else diff_after - (tau - (remaining + 1) * P)
        return RateDecision(
            allowed=allowed,
            remaining=remaining,
            limit=L,
            period_seconds=self.period_seconds,
            burst=B,
            reset_after=_seconds_up(max(0, diff_after), L),
            retry_after=math.inf if retry_scaled < 0 else _seconds_up(retry_scaled, L),
            refill_after=_seconds_up(max(0, refill), L),
        )


def now_ms(now: float) -> int:
    """Epoch seconds as whole milliseconds, floored (after rounding to the microsecond the float stands for)."""
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now) or now < 0:
        raise ValueError(f"time must be finite epoch seconds >= 0, not {now!r}")
    return round(now * 1_000_000) // 1000


def _seconds_up(scaled: int, limit: int) -> float:
    """`scaled` (units of 1/limit ms) in seconds, rounded up to the millisecond."""
    return -(-scaled // limit) / 1000


def gcra_step(state: RateState | None, now: int, cost: int, limit: int, period_ms: int,
              burst: int) -> tuple[bool, RateState | None, int, int]:
    """The GCRA step in integers scaled by `limit` (1 unit = 1/limit ms; T = period_ms units).

    Returns (allowed, state to store or None, diff_after, retry_scaled): diff_after = TAT - now
    after the decision (scaled), retry_scaled = how long until this cost conforms (0 when
    allowed, -1 never). The Redis script (redis_backend.py) is this function in Lua."""
    tat_ms, frac = now, 0
    if state is not None:
        f = state.frac if state.den == limit else (state.frac * limit) // state.den
        if state.tat_ms > now or (state.tat_ms == now and f > 0):
            tat_ms, frac = state.tat_ms, f
    diff = (tat_ms - now) * limit + frac
    new = diff + cost * period_ms
    tau = burst * period_ms
    if new <= tau:
        stored = None if cost == 0 else RateState(now + new // limit, new % limit, limit)
        return True, stored, new, 0
    return False, None, diff, (new - tau) if cost <= burst else -1


def decide(state: RateState | None, now: float, cost: int = 1, *, limit: int, period_seconds: float,
           burst: int | None = None) -> tuple[RateState | None, RateDecision]:
    """Gcra.of(limit, period_seconds, burst).decide(state, now, cost): pure."""
    return Gcra.of(limit, period_seconds, burst).decide(state, now, cost)


@runtime_checkable
class RateLimiter(Protocol):
    """A GCRA limiter over some backend; each `hit` is one atomic decision, exact across processes.

    `cost=0` asks without spending (for the RateLimit fields of a response). Raises
    CounterUnavailable when the backend cannot answer, ValueError for bad arguments."""

    backend: str

    async def hit(self, key: str, limit: int, period_seconds: float, now: float, cost: int = 1,
                  burst: int | None = None) -> RateDecision: ...

    async def sweep(self, now: float) -> int:
        """Delete state that says nothing any more (backends with TTLs: nothing to do, 0)."""
        ...
