"""Counters in process memory: for unit tests only (nothing is shared between processes or replicas).

`MemoryCounterStore` has the state store's counter methods with the same
semantics (each runs without awaiting, so it is atomic within one event loop);
`memory_counters()` wraps it in the same StoreCounters as the real stores.
`fail` makes every call raise StoreError (a store that is down), for tests of
fail-open / fail-closed handling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import TypeVar

from ..store.base import StoreError
from ..store.counters import (HELD, RELEASED, SETTLED, ZERO, BudgetUsage, RateState, ReserveOutcome, SettleOutcome,
                              SettleStatus,
                              add, check_amount, check_key, check_listing, dsum, reserve_decision, usage_by_key)
from .ledger import DEFAULT_GRACE_SECONDS
from .store_backend import StoreCounters

T = TypeVar("T")


@dataclass
class _Reservation:
    budget_key: str
    window_id: str
    amount: Decimal
    state: str
    actual: Decimal | None
    expires_at: float
    purge_at: float


class MemoryCounterStore:
    kind = "memory"

    def __init__(self) -> None:
        self.rates: dict[str, RateState] = {}
        self.spent: dict[tuple[str, str], tuple[Decimal, float]] = {}  # -> (spent, updated_at)
        self.reservations: dict[str, _Reservation] = {}
        self.fail = False

    def _check(self) -> None:
        if self.fail:
            raise StoreError("state store: memory counters are down (test)")

    async def update_rate_limit(self, key: str, fn: Callable[[RateState | None], tuple[RateState | None, T]],
                                *, now: float) -> T:
        self._check()
        check_key("rate-limit key", key)
        state = self.rates.get(key)
        if state is not None and state.expires_at <= now:
            state = None
        new, result = fn(state)
        if new is not None:
            self.rates[key] = new
        return result

    async def sweep_rate_limits(self, now: float) -> int:
        self._check()
        gone = [k for k, s in self.rates.items() if s.expires_at <= now]
        for k in gone:
            del self.rates[k]
        return len(gone)

    def _usage(self, budget_key: str, window_id: str, now: float) -> BudgetUsage:
        spent = self.spent.get((budget_key, window_id), (ZERO, 0.0))[0]
        return BudgetUsage(spent=spent, reserved=dsum(
            r.amount for r in self.reservations.values()
            if r.budget_key == budget_key and r.window_id == window_id and r.state == HELD and r.expires_at > now))

    def _book(self, budget_key: str, window_id: str, amount: Decimal, now: float) -> None:
        spent = self.spent.get((budget_key, window_id), (ZERO, 0.0))[0]
        self.spent[(budget_key, window_id)] = (add(spent, amount), now)

    async def reserve_budget(self, *, budget_key: str, window_id: str, reservation_id: str, amount: Decimal,
                             limit: Decimal, now: float, expires_at: float, purge_at: float,
                             force: bool = False) -> ReserveOutcome:
        self._check()
        check_key("reservation id", reservation_id)
        amount, limit = check_amount("amount", amount), check_amount("limit", limit)
        for rid in [rid for rid, r in self.reservations.items()
                    if r.budget_key == budget_key and r.window_id == window_id and r.purge_at <= now]:
            del self.reservations[rid]
        usage = self._usage(budget_key, window_id, now)
        out = reserve_decision(usage.spent, usage.reserved, amount, limit, force)
        if out.placed:
            if reservation_id in self.reservations:
                raise ValueError(f"reservation id {reservation_id!r} is already in use")
            self.reservations[reservation_id] = _Reservation(budget_key, window_id, amount, HELD, None, expires_at,
                                                             purge_at)
        return out

    async def settle_budget(self, reservation_id: str, actual: Decimal, *, now: float) -> SettleOutcome | None:
        self._check()
        r = self.reservations.get(reservation_id)
        if r is None or r.purge_at <= now:
            return None
        late = False
        status: SettleStatus
        if r.state == HELD:
            r.state, r.actual = SETTLED, actual
            self._book(r.budget_key, r.window_id, actual, now)
            status, booked, late = "settled", actual, r.expires_at <= now
        elif r.state == SETTLED:
            status, booked = "already-settled", r.actual if r.actual is not None else ZERO
        else:
            status, booked = "released", ZERO
        usage = self._usage(r.budget_key, r.window_id, now)
        return SettleOutcome(status=status, budget_key=r.budget_key, window_id=r.window_id, amount=r.amount,
                             actual=booked, late=late, spent=usage.spent, reserved=usage.reserved)

    async def release_budget(self, reservation_id: str) -> bool:
        self._check()
        r = self.reservations.get(reservation_id)
        if r is None or r.state != HELD:
            return False
        r.state = RELEASED
        return True

    async def charge_budget(self, *, budget_key: str, window_id: str, amount: Decimal, now: float) -> BudgetUsage:
        self._check()
        self._book(budget_key, window_id, amount, now)
        return self._usage(budget_key, window_id, now)

    async def budget_usage(self, budget_key: str, window_id: str, *, now: float) -> BudgetUsage:
        self._check()
        return self._usage(budget_key, window_id, now)

    async def budget_windows(self, window_id: str, key_prefix: str, limit: int, *,
                             now: float) -> list[tuple[str, BudgetUsage]]:
        self._check()
        check_listing(window_id, key_prefix, limit)
        rows: list[tuple[str, str, Decimal]] = [
            (k, "spent", spent) for (k, w), (spent, _) in self.spent.items()
            if w == window_id and k.startswith(key_prefix)]
        rows += [(r.budget_key, "held", r.amount) for r in self.reservations.values()
                 if r.window_id == window_id and r.budget_key.startswith(key_prefix) and r.state == HELD
                 and r.expires_at > now]
        return usage_by_key(rows)[:limit]

    async def sweep_budgets(self, now: float, *, idle_before: float | None = None) -> int:
        self._check()
        gone = [rid for rid, r in self.reservations.items() if r.purge_at <= now]
        for rid in gone:
            del self.reservations[rid]
        n = len(gone)
        if idle_before is not None:
            busy = {(r.budget_key, r.window_id) for r in self.reservations.values()}
            idle = [k for k, (_, at) in self.spent.items() if at < idle_before and k not in busy]
            for k in idle:
                del self.spent[k]
            n += len(idle)
        return n


def memory_counters(*, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> StoreCounters:
    """A RateLimiter and BudgetLedger in this process's memory (unit tests)."""
    return StoreCounters(MemoryCounterStore(), grace_seconds=grace_seconds)
