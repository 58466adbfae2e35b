"""Budget ledgers: spend per (budget, calendar window) with reservations (docs/limits.md, "Counters").

A call is *reserved* when it is decided (its estimated cost held against the
budget window), *settled* when its response arrives (the reservation becomes
spend, with the actual cost, which may differ), or *released* when it fails.
A reservation nobody settles or releases (the agent hung up, the process died)
*expires*: from `ttl_seconds` after it was made it no longer counts, and the
next reserve on that window (or a sweep) reclaims it. Its record is kept for
`grace_seconds` more, so a settle that arrives late still books the actual
spend, once; after that settle answers None and the caller books the cost with
`charge` (it knows the budget and window: see `Settlement`).

Amounts are Decimals, exact end to end (SQLite text, PostgreSQL NUMERIC, Redis
decimal text added digit by digit in Lua): 0.1 + 0.2 is 0.3. Floats are refused.

`reserve` answers ok=False when spent + reserved + amount would exceed the
limit; it holds nothing then, unless `force=True` (a call let through anyway,
e.g. after a human approved a budget extension), which holds the amount and
still answers ok=False with how far over the budget is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol, runtime_checkable

from ..store.counters import (ZERO, BudgetUsage, ReserveOutcome, SettleOutcome, add, check_amount, check_key,
                              sub)

Settlement = SettleOutcome
Usage = BudgetUsage
MAX_TTL_SECONDS = 7 * 86400
DEFAULT_GRACE_SECONDS = 300.0


@dataclass(frozen=True)
class ReserveResult:
    ok: bool  # spent + reserved + amount <= limit (before this reservation)
    placed: bool  # the amount is held now under the reservation id (ok, or forced)
    spent: Decimal
    reserved: Decimal  # held and unexpired, this reservation included when placed
    remaining: Decimal  # max(0, limit - spent - reserved)
    over: Decimal  # max(0, spent + reserved + amount - limit): how far this call goes past the limit
    limit: Decimal


def reserve_result(out: ReserveOutcome, amount: Decimal, limit: Decimal) -> ReserveResult:
    before = sub(out.reserved, amount) if out.placed else out.reserved
    total = add(out.spent, before, amount)
    left = sub(limit, add(out.spent, out.reserved))
    return ReserveResult(ok=out.fits, placed=out.placed, spent=out.spent, reserved=out.reserved,
                         remaining=left if left > 0 else ZERO, over=sub(total, limit) if total > limit else ZERO,
                         limit=limit)


def check_reserve(budget_key: str, window_id: str, amount: Decimal, limit: Decimal, reservation_id: str,
                  ttl_seconds: float, now: float, grace_seconds: float) -> tuple[Decimal, Decimal, float, float]:
    """Validated (amount, limit, expires_at, purge_at); ValueError on anything a ledger must not hold."""
    check_key("budget key", budget_key)
    check_key("window id", window_id)
    check_key("reservation id", reservation_id)
    amount, limit = check_amount("amount", amount), check_amount("limit", limit)
    if (isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, (int, float)) or not math.isfinite(ttl_seconds)
            or not 0 < ttl_seconds <= MAX_TTL_SECONDS):
        raise ValueError(f"a reservation lives more than 0 s and at most {MAX_TTL_SECONDS} s, not {ttl_seconds!r}")
    check_now(now)
    expires_at = now + float(ttl_seconds)
    return amount, limit, expires_at, expires_at + grace_seconds


def check_now(now: float) -> float:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now) or now < 0:
        raise ValueError(f"time must be finite epoch seconds >= 0, not {now!r}")
    return float(now)


def check_grace(grace_seconds: float) -> float:
    if (isinstance(grace_seconds, bool) or not isinstance(grace_seconds, (int, float))
            or not math.isfinite(grace_seconds) or not 0 <= grace_seconds <= MAX_TTL_SECONDS):
        raise ValueError(f"grace_seconds is 0 to {MAX_TTL_SECONDS}, not {grace_seconds!r}")
    return float(grace_seconds)


@runtime_checkable
class BudgetLedger(Protocol):
    """Spend per (budget key, window id), with reservations; every operation atomic and exact
    across processes. Raises CounterUnavailable when the backend cannot answer, ValueError for
    bad arguments (a float amount, a reused reservation id, ...)."""

    backend: str

    async def reserve(self, budget_key: str, window_id: str, amount: Decimal, limit: Decimal, reservation_id: str,
                      ttl_seconds: float, now: float, *, force: bool = False) -> ReserveResult: ...

    async def settle(self, reservation_id: str, actual: Decimal, now: float) -> Settlement | None:
        """Book `actual` for the reservation (held, expired or not, while its record is kept); a
        repeat books nothing (status `already-settled`). None: unknown or purged."""
        ...

    async def release(self, reservation_id: str) -> bool:
        """Drop a held reservation without spending; False when it was not held."""
        ...

    async def charge(self, budget_key: str, window_id: str, amount: Decimal, now: float) -> Usage:
        """Book `amount` as spent without a reservation."""
        ...

    async def usage(self, budget_key: str, window_id: str, now: float | None = None) -> Usage:
        """(spent, reserved) of the window; expired reservations are not counted."""
        ...

    async def sweep(self, now: float, *, idle_before: float | None = None) -> int: ...
