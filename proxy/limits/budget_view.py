"""What operators see of budgets (docs/limits.md, "Seeing budgets"): the ledgers of a window,
where their spend is heading, and the burn-down series from decision records.

- `window_named(budget, "current" | "previous" | <window id>, now)`: the calendar window asked for.
- `ledgers(...)`: every ledger (key) of a budget with spend or held reservations in the window,
  read from the ledger backend (fleet-wide: every replica books there), narrowed by key values.
- `project(...)`: the spend rate so far in the current window (spent / elapsed), when spent +
  reserved reaches the limit at that rate (None: never in this window), and the spend it
  leads to at the window's end.
- `bookings(record, ...)` and `burn_down(...)`: the cumulative spend over a window from
  decision records' `budget` parts (what one replica booked: its own records only).

Amounts stay Decimals; derived ones (rate, projection, fraction) are rounded, never floats.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

from ..store.counters import ZERO, BudgetUsage, check_amount
from .budget_keys import listing_prefix, parse_budget_key
from .budget_table import Budget, budget_key
from .stage import digest, shown_value
from .windows import Window, window_for, zone

# Key dimensions an operator can narrow a listing by (their values are not the agents' data).
FILTER_DIMENSIONS = ("agent", "group", "connector", "action", "resource", "workflow")
MAX_POINTS = 240  # burn-down points per ledger (more bookings are bucketed by time)
_ROUND = decimal.Context(prec=40, rounding=decimal.ROUND_HALF_EVEN)
_LABELS = {"minute": "%Y-%m-%dT%H:%M", "hour": "%Y-%m-%dT%H", "day": "%Y-%m-%d", "month": "%Y-%m", "year": "%Y"}


class LedgerReader(Protocol):
    """What the listing needs of a ledger backend (every backend in proxy/limits has it)."""

    async def usage(self, budget_key: str, window_id: str, now: float | None = None) -> BudgetUsage: ...

    async def budget_windows(self, window_id: str, key_prefix: str, limit: int,
                             now: float | None = None) -> list[tuple[str, BudgetUsage]]: ...


# ---- windows ------------------------------------------------------------------------------------
def window_named(budget: Budget, which: str, now: float) -> Window | None:
    """`current`, `previous` (the window before the current one), or a window id of this budget's
    period and time zone (`month:2026-11@Europe/Berlin`); None when it names no window of it."""
    current = window_for(now, budget.period, budget.timezone)
    if which in ("", "current"):
        return current
    if which == "previous":
        return window_for(current.start - 1, budget.period, budget.timezone)
    period, _, rest = which.partition(":")
    label, _, tz = rest.rpartition("@")
    if period != budget.period or tz != budget.timezone or not label:
        return None
    try:
        if period == "week":
            wall = datetime.strptime(label + "-1", "%G-W%V-%u")
        else:
            wall = datetime.strptime(label, _LABELS[period])
        start = wall.replace(tzinfo=zone(tz)).timestamp()
        w = window_for(start, period, tz)
    except (ValueError, KeyError, OverflowError, OSError):
        return None
    return w if w.id == which else None


# ---- ledgers ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LedgerView:
    key: str  # the ledger key
    shown: dict[str, str | None]  # dimension -> value as shown (request and token values digested)
    shortened: bool  # the key was shortened to a digest: dimensions past its prefix are not shown
    digest: str  # as decision records name it (`budget.key`)
    usage: BudgetUsage

    @property
    def committed(self) -> Decimal:
        return self.usage.spent + self.usage.reserved


def _view(budget: Budget, key: str, usage: BudgetUsage, given: Mapping[str, str]) -> LedgerView | None:
    parsed = parse_budget_key(key)
    if parsed is None or parsed.name != budget.name:
        return None
    for dim, value in given.items():
        if dim in budget.key and (dim not in parsed.values or parsed.values[dim] != value):
            return None  # (a shortened key that cut the dimension cannot be shown to match)
    shown = {dim: shown_value(dim, v) for dim, v in parsed.values.items()}
    return LedgerView(key, shown, parsed.hashed, digest(key), usage)


async def ledgers(ledger: LedgerReader, budget: Budget, window: Window, given: Mapping[str, str], limit: int,
                  now: float) -> tuple[list[LedgerView], bool]:
    """The ledgers of `budget` with spend or held reservations in `window`, most committed first,
    and whether there were more than `limit` to look at. `given` narrows by key values (of
    FILTER_DIMENSIONS): a budget keyed on a dimension keeps the ledgers with that value; one not
    keyed on it is not narrowed. Raises CounterUnavailable when the backend cannot answer."""
    given = {d: v for d, v in given.items() if d in FILTER_DIMENSIONS and d in budget.key}
    if all(d in given for d in budget.key):  # one ledger (or the budget's only one: `key: []`)
        k = budget_key(budget.name, budget.key, tuple(given[d] for d in budget.key))
        usage = await ledger.usage(k, window.id, now)
        view = _view(budget, k, usage, given) if usage.spent or usage.reserved else None
        return ([view] if view is not None else []), False
    rows = await ledger.budget_windows(window.id, listing_prefix(budget.name, budget.key, given), limit + 1, now)
    views = [v for k, u in rows[:limit] if (v := _view(budget, k, u, given)) is not None]
    views.sort(key=lambda v: (-v.committed, v.key))
    return views, len(rows) > limit


# ---- projection ---------------------------------------------------------------------------------
def places(*amounts: Decimal) -> int:
    """Decimal places to show derived amounts with: the amounts' own, at least 2, at most 6."""
    out = 2
    for a in amounts:
        exp = a.as_tuple().exponent
        if isinstance(exp, int):
            out = max(out, -exp)
    return min(out, 6)


def rounded(value: Decimal, n: int) -> Decimal:
    return value.quantize(Decimal(1).scaleb(-n), context=_ROUND)


def used_fraction(limit: Decimal, usage: BudgetUsage) -> Decimal:
    """(spent + reserved) / limit, to 4 places."""
    return rounded(_ROUND.divide(usage.spent + usage.reserved, limit), 4)


@dataclass(frozen=True)
class Projection:
    rate_per_hour: Decimal  # spent so far in the window / hours elapsed (2 more places than the amounts)
    exhausted: bool  # spent + reserved is at or over the limit now
    exhaustion_at: float | None  # when spent + reserved reaches the limit at that rate (None: not in this window)
    at_window_end: Decimal  # spent + reserved + rate x the time left


def project(limit: Decimal, usage: BudgetUsage, window: Window, now: float) -> Projection | None:
    """Where the current window's spend is heading at its rate so far; None for another window."""
    if not window.contains(now):
        return None
    n = places(limit, usage.spent)
    elapsed = Decimal(repr(max(now - window.start, 0.0)))
    left_seconds = Decimal(repr(max(window.end - now, 0.0)))
    committed = usage.spent + usage.reserved
    rate = _ROUND.divide(usage.spent, elapsed) if elapsed > 0 else ZERO  # per second
    exhausted = committed >= limit
    at: float | None = None
    if not exhausted and rate > 0:
        seconds = float(_ROUND.divide(limit - committed, rate))
        if math.isfinite(seconds) and now + seconds < window.end:
            at = now + seconds
    return Projection(rate_per_hour=rounded(_ROUND.multiply(rate, Decimal(3600)), n + 2), exhausted=exhausted, exhaustion_at=at,
                      at_window_end=rounded(_ROUND.add(committed, _ROUND.multiply(rate, left_seconds)), n))


# ---- burn-down ----------------------------------------------------------------------------------
def record_time(record: Mapping[str, Any]) -> float | None:
    """When a decision record's spend was booked: its time plus its latency (the answer came then)."""
    t = record.get("time")
    if not isinstance(t, str):
        return None
    try:
        at = datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    latency = record.get("latency_ms")
    if isinstance(latency, (int, float)) and not isinstance(latency, bool) and math.isfinite(latency) and latency > 0:
        at += latency / 1000
    return at


def bookings(record: Mapping[str, Any], budget: str, window_id: str) -> list[tuple[str, Decimal]]:
    """(key digest, amount) booked in `budget`'s `window_id` by one decision record: the `actual` of
    each of its budget checks (the first and `others`) that was not released."""
    part = record.get("budget")
    if not isinstance(part, dict):
        return []
    checks = [part, *[o for o in part.get("others", []) or [] if isinstance(o, dict)]]
    out = []
    for c in checks:
        if c.get("name") != budget or c.get("window") != window_id or c.get("result") == "released":
            continue
        actual, key = c.get("actual"), c.get("key")
        if not isinstance(actual, str) or not isinstance(key, str):
            continue
        try:
            amount = check_amount("actual", Decimal(actual))  # (as a ledger would take it: no NaN, no 1e999)
        except (decimal.InvalidOperation, ValueError):
            continue
        if amount > 0:
            out.append((key, amount))
    return out


def burn_down(booked: Iterable[tuple[float, Decimal]], window: Window, now: float,
              max_points: int = MAX_POINTS) -> list[tuple[float, Decimal]]:
    """(time, cumulative spend) from the window's start (0) to now (or its end), one point per
    booking; more than `max_points` bookings keep the last point of each of `max_points` equal
    slices of the time."""
    end = min(now, window.end)
    points = sorted((max(window.start, min(t, end)), a) for t, a in booked)
    total = ZERO
    series: list[tuple[float, Decimal]] = [(window.start, ZERO)]
    for t, a in points:
        total += a
        series.append((t, total))
    if len(series) > max_points + 1 and end > window.start:
        width = (end - window.start) / max_points
        slices: dict[int, tuple[float, Decimal]] = {}
        for t, v in series[1:]:
            slices[min(int((t - window.start) / width), max_points - 1)] = (t, v)
        series = [series[0], *(slices[i] for i in sorted(slices))]
    if end > series[-1][0]:
        series.append((end, total))
    return series
