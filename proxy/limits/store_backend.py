"""Counters in the state store (SQLite or PostgreSQL) or in process memory (tests).

`StoreCounters(store)` is a RateLimiter and a BudgetLedger over the store's
counter methods (proxy/store/base.py, "counters"): each decision is one store
transaction (SQLite BEGIN IMMEDIATE; PostgreSQL the key's or budget window's
row locked), so it is exact for every process and replica on that store.
`StoreError` (and `StoreLostError`) become `CounterUnavailable`, with the
store's error chained, so the caller handles one exception for every backend.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Protocol, TypeVar

from ..store.base import StoreError
from ..store.counters import (BudgetUsage, RateState, ReserveOutcome, SettleOutcome, check_amount, check_key,
                              check_listing)
from .errors import CounterUnavailable
from .ledger import (DEFAULT_GRACE_SECONDS, ReserveResult, Settlement, Usage, check_grace, check_now, check_reserve,
                     reserve_result)
from .rate import Gcra, RateDecision

T = TypeVar("T")


class CounterStore(Protocol):
    """The counter methods of proxy.store.base.Store (and of memory.MemoryCounterStore)."""

    kind: str

    async def update_rate_limit(self, key: str, fn: Callable[[RateState | None], tuple[RateState | None, T]],
                                *, now: float) -> T: ...

    async def sweep_rate_limits(self, now: float) -> int: ...

    async def reserve_budget(self, *, budget_key: str, window_id: str, reservation_id: str, amount: Decimal,
                             limit: Decimal, now: float, expires_at: float, purge_at: float,
                             force: bool = False) -> ReserveOutcome: ...

    async def settle_budget(self, reservation_id: str, actual: Decimal, *, now: float) -> SettleOutcome | None: ...

    async def release_budget(self, reservation_id: str) -> bool: ...

    async def charge_budget(self, *, budget_key: str, window_id: str, amount: Decimal, now: float) -> BudgetUsage: ...

    async def budget_usage(self, budget_key: str, window_id: str, *, now: float) -> BudgetUsage: ...

    async def budget_windows(self, window_id: str, key_prefix: str, limit: int, *,
                             now: float) -> list[tuple[str, BudgetUsage]]: ...

    async def sweep_budgets(self, now: float, *, idle_before: float | None = None) -> int: ...


class StoreCounters:
    """Rate limits and budget ledgers in a state store (see the module docstring)."""

    def __init__(self, store: CounterStore, *, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> None:
        self.store = store
        self.backend = store.kind
        self.grace_seconds = check_grace(grace_seconds)

    def _unavailable(self, op: str, e: StoreError) -> CounterUnavailable:
        return CounterUnavailable(f"{self.backend} counters: {op} failed: {e}", backend=self.backend)

    # ---- rate limits ------------------------------------------------------------
    async def hit(self, key: str, limit: int, period_seconds: float, now: float, cost: int = 1,
                  burst: int | None = None) -> RateDecision:
        check_key("rate-limit key", key)
        gcra = Gcra.of(limit, period_seconds, burst)
        gcra.decide(None, now, cost)  # (validates now and cost before the store is asked)
        try:
            return await self.store.update_rate_limit(key, lambda state: gcra.decide(state, now, cost), now=now)
        except StoreError as e:
            raise self._unavailable("rate limit", e) from e

    async def sweep(self, now: float, *, idle_before: float | None = None) -> int:
        check_now(now)
        try:
            return (await self.store.sweep_rate_limits(now)
                    + await self.store.sweep_budgets(now, idle_before=idle_before))
        except StoreError as e:
            raise self._unavailable("sweep", e) from e

    # ---- budget ledger ------------------------------------------------------------
    async def reserve(self, budget_key: str, window_id: str, amount: Decimal, limit: Decimal, reservation_id: str,
                      ttl_seconds: float, now: float, *, force: bool = False) -> ReserveResult:
        amount, limit, expires_at, purge_at = check_reserve(budget_key, window_id, amount, limit, reservation_id,
                                                            ttl_seconds, now, self.grace_seconds)
        try:
            out = await self.store.reserve_budget(budget_key=budget_key, window_id=window_id,
                                                  reservation_id=reservation_id, amount=amount, limit=limit, now=now,
                                                  expires_at=expires_at, purge_at=purge_at, force=bool(force))
        except StoreError as e:
            raise self._unavailable("reserve", e) from e
        return reserve_result(out, amount, limit)

    async def settle(self, reservation_id: str, actual: Decimal, now: float) -> Settlement | None:
        check_key("reservation id", reservation_id)
        actual = check_amount("actual amount", actual)
        check_now(now)
        try:
            return await self.store.settle_budget(reservation_id, actual, now=now)
        except StoreError as e:
            raise self._unavailable("settle", e) from e

    async def release(self, reservation_id: str) -> bool:
        check_key("reservation id", reservation_id)
        try:
            return await self.store.release_budget(reservation_id)
        except StoreError as e:
            raise self._unavailable("release", e) from e

    async def charge(self, budget_key: str, window_id: str, amount: Decimal, now: float) -> Usage:
        check_key("budget key", budget_key)
        check_key("window id", window_id)
        amount = check_amount("amount", amount)
        check_now(now)
        try:
            return await self.store.charge_budget(budget_key=budget_key, window_id=window_id, amount=amount, now=now)
        except StoreError as e:
            raise self._unavailable("charge", e) from e

    async def usage(self, budget_key: str, window_id: str, now: float | None = None) -> Usage:
        check_key("budget key", budget_key)
        check_key("window id", window_id)
        at = check_now(time.time() if now is None else now)
        try:
            return await self.store.budget_usage(budget_key, window_id, now=at)
        except StoreError as e:
            raise self._unavailable("usage", e) from e

    async def budget_windows(self, window_id: str, key_prefix: str, limit: int,
                             now: float | None = None) -> list[tuple[str, Usage]]:
        """Every budget key starting with `key_prefix` that has spend or held reservations in the
        window, with its usage, in key order: at most `limit`, the first ones (the control API's
        listing; reads only)."""
        check_listing(window_id, key_prefix, limit)
        at = check_now(time.time() if now is None else now)
        try:
            return await self.store.budget_windows(window_id, key_prefix, limit, now=at)
        except StoreError as e:
            raise self._unavailable("budget listing", e) from e
