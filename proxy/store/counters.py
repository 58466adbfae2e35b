"""Rate-limit state and budget ledgers in the store (proxy/limits/; docs/limits.md, "Counters").

Three tables (schema version 6):

- `proctor_rate_limits`: one row per rate-limit key: its GCRA state, the
  theoretical arrival time (TAT) as whole milliseconds plus a fraction
  `tat_frac / tat_den` of a millisecond (exact: no float drift), and
  `expires_at` (epoch seconds; the TAT: from then on the row says nothing a
  missing row would not, so readers ignore it and sweeps delete it);
- `proctor_budget_usage`: one row per (budget key, window id): the amount spent,
  exact (SQLite TEXT, PostgreSQL NUMERIC; never a float), and when it last changed;
- `proctor_budget_reservations`: one row per reservation: its budget window, the
  amount held, its state (`held`, `settled`, `released`), the actual amount
  settled, when it expires (a held reservation past `expires_at` no longer
  counts: it is reclaimed) and when the row is purged (`purge_at`, after
  expiry: until then a late settle still books its actual spend and a second
  settle is recognised as a repeat).

The rate-limit algorithm lives in proxy/limits/rate.py; the store only gives it
an atomic read-modify-write of one row (`Store.update_rate_limit`). The budget
arithmetic is this module's: sums and comparisons of Decimals in a context that
raises instead of rounding.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

# Exact arithmetic or an error: no amount is ever rounded.
EXACT = decimal.Context(prec=200, Emax=10**6, Emin=-(10**6),
                        traps=[decimal.Inexact, decimal.Rounded, decimal.InvalidOperation,
                               decimal.Overflow, decimal.DivisionByZero])
MAX_AMOUNT_DIGITS = 60  # digits (before and after the point together) an amount may have
MAX_KEY_LENGTH = 512
HELD, SETTLED, RELEASED = "held", "settled", "released"
ZERO = Decimal(0)


@dataclass(frozen=True)
class RateState:
    """A GCRA theoretical arrival time: tat_ms + frac/den milliseconds since the epoch (0 <= frac < den)."""

    tat_ms: int
    frac: int
    den: int

    def __post_init__(self) -> None:
        if self.den < 1 or not 0 <= self.frac < self.den:
            raise ValueError("rate state fraction out of range")

    @property
    def expires_at(self) -> float:
        """Epoch seconds from which the state is the same as no state (the TAT, rounded up to a millisecond)."""
        return (self.tat_ms + (1 if self.frac else 0)) / 1000


@dataclass(frozen=True)
class BudgetUsage:
    spent: Decimal  # settled and charged amounts in the window
    reserved: Decimal  # held, unexpired reservations


@dataclass(frozen=True)
class ReserveOutcome:
    fits: bool  # spent + reserved + amount <= limit (before this reservation)
    placed: bool  # the reservation is held now (it fits, or it was forced)
    spent: Decimal
    reserved: Decimal  # after: this reservation included when placed


SettleStatus = Literal["settled", "already-settled", "released"]


@dataclass(frozen=True)
class SettleOutcome:
    status: SettleStatus  # settled now; settled before (nothing booked now); released before (nothing booked)
    budget_key: str
    window_id: str
    amount: Decimal  # what the reservation held
    actual: Decimal  # what was booked (now, or by the earlier settle); 0 when released
    late: bool  # the reservation had expired (and no longer counted) when it was settled
    spent: Decimal
    reserved: Decimal


def check_key(what: str, value: str) -> str:
    """A key, window id or reservation id: 1..512 characters, no control characters."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_LENGTH:
        raise ValueError(f"{what} must be a string of 1 to {MAX_KEY_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"{what} must not contain control characters")
    return value


def check_amount(what: str, value: Decimal) -> Decimal:
    """A finite, non-negative Decimal of at most MAX_AMOUNT_DIGITS digits (ValueError otherwise).
    Floats are refused: they cannot say 0.1."""
    if isinstance(value, bool) or not isinstance(value, (Decimal, int)):
        raise ValueError(f"{what} must be a Decimal (or int), not {type(value).__name__}")
    d = Decimal(value)
    if not d.is_finite() or d < 0:
        raise ValueError(f"{what} must be a finite amount >= 0, not {value}")
    if d == 0:
        return ZERO
    _, digits, exponent = d.as_tuple()
    assert isinstance(exponent, int)
    width = max(len(digits), -exponent) + max(exponent, 0)
    if width > MAX_AMOUNT_DIGITS:
        raise ValueError(f"{what} has more than {MAX_AMOUNT_DIGITS} digits")
    return d


def dec_text(d: Decimal) -> str:
    """The plain decimal text of a checked amount (no exponent): what SQLite and Redis store."""
    return "0" if d == 0 else format(d, "f")


def parse_dec(value: Any) -> Decimal:
    """An amount read back from a backend (text, Decimal or int)."""
    if value is None:
        return ZERO
    if isinstance(value, Decimal):
        return value
    if isinstance(value, bytes):
        value = value.decode("ascii")
    return Decimal(str(value))


def add(*values: Decimal) -> Decimal:
    return dsum(values)


def dsum(values: Iterable[Decimal]) -> Decimal:
    total = ZERO
    for v in values:
        total = EXACT.add(total, v)
    return total


def sub(a: Decimal, b: Decimal) -> Decimal:
    return EXACT.subtract(a, b)


def reserve_decision(spent: Decimal, reserved: Decimal, amount: Decimal, limit: Decimal,
                     force: bool) -> ReserveOutcome:
    fits = add(spent, reserved, amount) <= limit
    placed = fits or force
    return ReserveOutcome(fits=fits, placed=placed, spent=spent, reserved=add(reserved, amount) if placed else reserved)


MAX_LISTING = 10_000  # ledgers one budget_windows call answers at most


def check_listing(window_id: str, key_prefix: str, limit: int) -> None:
    """Arguments of `budget_windows`: a window id, a key prefix ('' for every key) and 1..MAX_LISTING."""
    check_key("window id", window_id)
    if not isinstance(key_prefix, str) or len(key_prefix) > MAX_KEY_LENGTH:
        raise ValueError(f"a key prefix is a string of at most {MAX_KEY_LENGTH} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key_prefix):
        raise ValueError("a key prefix must not contain control characters")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LISTING:
        raise ValueError(f"limit is 1 to {MAX_LISTING}, not {limit!r}")


def usage_by_key(rows: Iterable[tuple[str, str, Any]]) -> list[tuple[str, BudgetUsage]]:
    """(budget key, 'spent' | 'held', amount) rows as one usage per key, by key; keys with
    nothing spent and nothing held are left out (a reservation released, a zero charge)."""
    spent: dict[str, Decimal] = {}
    held: dict[str, list[Decimal]] = {}
    for key, kind, amount in rows:
        if kind == "spent":
            spent[key] = parse_dec(amount)
        else:
            held.setdefault(key, []).append(parse_dec(amount))
    out = []
    for key in sorted(set(spent) | set(held)):
        usage = BudgetUsage(spent=spent.get(key, ZERO), reserved=dsum(held.get(key, ())))
        if usage.spent or usage.reserved:
            out.append((key, usage))
    return out


def check_times(**times: float) -> None:
    for name, t in times.items():
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"{name} must be finite epoch seconds")
