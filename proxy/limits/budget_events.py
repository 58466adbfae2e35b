"""What the budget stage reports (docs/limits.md, "Budgets"): per-check outcomes, spend, and
threshold events. The stage calls a `BudgetObserver`; proxy/limits/budget_report.py turns
the calls into Prometheus series, OCSF audit events and webhook notifications.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, Protocol

# Outcomes of one budget check on one request (the `outcome` label):
#   reserved           the estimate is held against the window
#   exhausted          refused: 429 budget-exhausted (on_exceed: refuse)
#   held               over the limit, held for a person's budget extension (on_exceed: hold)
#   extended           over the limit, let through by an approved budget extension (reserved anyway)
#   shadow_exhausted   would have been refused or held; shadow budget, let through
#   unavailable        the ledger could not answer (closed: 503; open: let through)
CHECK_OUTCOMES = ("reserved", "exhausted", "held", "extended", "shadow_exhausted", "unavailable")
# What became of a reservation on the way back (the `result` label):
#   settled            the call succeeded: its actual cost is booked
#   released           the call was not forwarded or failed: nothing is booked
#   late               settled after the reservation lapsed (booked as a charge)
SETTLE_RESULTS = ("settled", "released", "late")

EventKind = Literal["soft_threshold", "exhausted"]


@dataclass(frozen=True)
class BudgetEvent:
    """A budget window reached its soft threshold, or refused/held a call for exhaustion."""

    kind: EventKind
    budget: str
    key: dict[str, str | None]  # the key as shown (request and token values digested)
    window_id: str
    window_start: float  # epoch seconds
    window_end: float
    limit: Decimal
    spent: Decimal
    reserved: Decimal
    currency: str
    threshold: Decimal | None  # soft_threshold (a fraction), for soft_threshold events
    agent: str
    decision_id: str
    action: str
    connector: str
    outcome: str  # exhausted | held | shadow_exhausted | reserved (soft threshold crossed by this call)


class BudgetObserver(Protocol):
    def checked(self, budget: str, outcome: str) -> None: ...

    def settled(self, budget: str, result: str, amount: Decimal, currency: str) -> None: ...

    def window(self, budget: str, key: str, limit: Decimal, spent: Decimal, reserved: Decimal,
               window_end: float) -> None:
        """The latest known state of one ledger window (gauges)."""
        ...

    def event(self, event: BudgetEvent) -> None: ...


class NoBudgetObserver:
    def checked(self, budget: str, outcome: str) -> None:
        return None

    def settled(self, budget: str, result: str, amount: Decimal, currency: str) -> None:
        return None

    def window(self, budget: str, key: str, limit: Decimal, spent: Decimal, reserved: Decimal,
               window_end: float) -> None:
        return None

    def event(self, event: BudgetEvent) -> None:
        return None
