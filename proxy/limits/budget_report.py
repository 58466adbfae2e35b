"""What budgets show operators (docs/limits.md, "Budget metrics and events"): the budget
stages' `BudgetObserver` calls (proxy/limits/budget_events.py) as Prometheus series, event
lines with their OCSF audit events, and webhook notifications.

Series (on the proxy's registry, served at GET /metrics):

- `proctor_budget_checks_total{budget,outcome}`, `proctor_budget_settled_total{budget,result}`,
  `proctor_budget_events_total{budget,kind}`: counts;
- `proctor_budget_cost_total{budget,currency}`: the amounts booked (settled and late), as a
  float (Prometheus has no decimals; the ledger stays exact). Not `proctor_budget_spent_total`:
  a counter family `proctor_budget_spent` would clash with the gauge of that name;
- gauges `proctor_budget_limit`, `proctor_budget_spent`, `proctor_budget_reserved`,
  `proctor_budget_remaining_ratio` and `proctor_budget_window_end_seconds`, by `budget` only.

Cardinality stays bounded by the declared budgets: a budget keyed per agent (or per
anything) has one ledger per key, and a label per key would grow without bound, so the
gauges show ONE key per budget: the one nearest its limit, by (spent + reserved) / limit,
among the windows this process reported in the budget's current window. That is the
number to alert on ("is any key of this budget about to run out?"); the exact state of
every key is the ledger's. Per process and approximate on purpose: a key that falls back
(a reservation released) stays shown until another key passes it, and after a restart
nothing is known until the next call. Once the window ends the gauges read a fresh
window (nothing spent or reserved, ratio 1) until a call reports the new one, so a
monthly alert does not keep firing on the 1st; `proctor_budget_window_end_seconds` then
lies in the past.

Event lines (`"type": "budget"`, proxy/record/model.py `BudgetEventRecord`) go through the
decision recorder's `write`: decisions.jsonl, and the OCSF trail (`proctor.budget.<kind>`,
service `proctor.limits`, correlated with the call's decision id: proxy/audit/ocsf.py).
The key is written as the event shows it (request and token values already digested).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from ..record.model import BudgetEventRecord, iso
from .budget_events import CHECK_OUTCOMES, SETTLE_RESULTS, BudgetEvent, BudgetObserver

EVENT_KINDS = ("soft_threshold", "exhausted")
BOOKED = frozenset({"settled", "late"})  # settle results that book an amount (released books nothing)

RecordEvent = Callable[[BudgetEventRecord], None]  # DecisionRecorder.write: decisions.jsonl and the OCSF trail


class DeclaredBudget(Protocol):
    """What the reporter reads of a declared budget (budget_table.Budget, budget_spec.BudgetSpec)."""

    @property
    def name(self) -> str: ...

    @property
    def limit(self) -> Decimal: ...

    @property
    def currency(self) -> str: ...


class BudgetNotifier(Protocol):
    def notify_budget(self, event: dict[str, Any]) -> None: ...


def amount_text(d: Decimal) -> str:
    """An exact amount as text, never in exponent notation ("1E+3" -> "1000")."""
    return format(d, "f")


def event_record(event: BudgetEvent, when: float) -> BudgetEventRecord:
    """The event line of one budget event."""
    return BudgetEventRecord(
        event=event.kind, time=iso(when), budget=event.budget, key=dict(event.key), window_id=event.window_id,
        window_start=iso(event.window_start), window_end=iso(event.window_end), limit=amount_text(event.limit),
        spent=amount_text(event.spent), reserved=amount_text(event.reserved), currency=event.currency,
        threshold=amount_text(event.threshold) if event.threshold is not None else None, outcome=event.outcome,
        agent=event.agent, decision_id=event.decision_id, action=event.action, connector=event.connector,
    )


@dataclass(frozen=True)
class _Shown:
    """The key a budget's gauges show (replaced whole: scrapes read it without a lock)."""

    key: str
    limit: Decimal
    spent: Decimal
    reserved: Decimal
    window_end: float

    @property
    def used(self) -> Decimal:
        """The share of the limit spent or reserved (a limit of 0 with anything used: everything)."""
        total = self.spent + self.reserved
        if self.limit <= 0:
            return Decimal(1) if total > 0 else Decimal(0)
        return total / self.limit


class BudgetReport(BudgetObserver):
    """Counts, gauges, event lines and webhooks for the budget stages.

    `registry`: the proxy's Prometheus registry (Metrics.registry). `budgets`: the declared
    budgets, by name or as objects with `name`, `limit` and `currency` (their series are
    exported from the start at 0; the limit and the `cost_total` series need the object).
    `record`: DecisionRecorder.write. `notifier`: the approvals Notifier (`notify_budget`).
    """

    def __init__(self, registry: Any, budgets: Iterable[str | DeclaredBudget] = (),
                 record: RecordEvent | None = None, notifier: BudgetNotifier | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        r = registry
        self.record = record
        self.notifier = notifier
        self.clock = clock
        self.checks = Counter(
            "proctor_budget_checks",
            "Budget checks by budget and outcome: reserved, exhausted (429), held (for a budget extension), "
            "extended (let through by an approved extension), shadow_exhausted (a shadow budget would have "
            "refused or held it; forwarded), unavailable (the ledger did not answer).",
            ["budget", "outcome"], registry=r)
        self.settlements = Counter(
            "proctor_budget_settled",
            "Budget reservations on the way back, by budget and result: settled (the actual cost booked), "
            "released (not forwarded or failed: nothing booked), late (booked after the reservation lapsed).",
            ["budget", "result"], registry=r)
        self.cost = Counter(
            "proctor_budget_cost",
            "Amounts booked against a budget (settled and late), in its currency; a float approximation "
            "of the exact ledger.",
            ["budget", "currency"], registry=r)
        self.events = Counter(
            "proctor_budget_events",
            "Budget events by budget and kind: soft_threshold (a window reached its soft threshold), "
            "exhausted (a call found the window exhausted: refused, held, or let through by a shadow budget).",
            ["budget", "kind"], registry=r)
        per_key = ("Of the key of this budget nearest its limit in the current window (as reported to this "
                   "process; one key per budget, never a label per key)")
        self.limit = Gauge("proctor_budget_limit", "The budget's limit per window and key, in its currency.",
                           ["budget"], registry=r)
        self.spent = Gauge("proctor_budget_spent", f"{per_key}: the amount spent.", ["budget"], registry=r)
        self.reserved = Gauge("proctor_budget_reserved", f"{per_key}: the amount reserved by calls in flight.",
                              ["budget"], registry=r)
        self.remaining_ratio = Gauge(
            "proctor_budget_remaining_ratio", f"{per_key}: (limit - spent - reserved) / limit, 0 to 1 "
            "(1 when nothing is known to be used).", ["budget"], registry=r)
        self.window_end = Gauge(
            "proctor_budget_window_end_seconds", "The end of the window the budget's gauges were last reported "
            "in (Unix time; in the past: no call reported the current window yet; 0: none ever).",
            ["budget"], registry=r)
        self._lock = threading.Lock()
        self._shown: dict[str, _Shown] = {}
        self._declared_limits: dict[str, Decimal] = {}
        self._gauged: set[str] = set()
        for b in budgets:
            name = b if isinstance(b, str) else b.name
            for outcome in CHECK_OUTCOMES:
                self.checks.labels(name, outcome)
            for result in SETTLE_RESULTS:
                self.settlements.labels(name, result)
            for kind in EVENT_KINDS:
                self.events.labels(name, kind)
            if not isinstance(b, str):
                self._declared_limits[name] = b.limit
                self.cost.labels(name, b.currency)
            self._gauge(name)

    # -- the gauges: read at scrape time from the key shown ---------------------------
    def _current(self, budget: str) -> _Shown | None:
        """The key shown while its window lasts (None: nothing known, or the window ended)."""
        s = self._shown.get(budget)
        return s if s is not None and self.clock() < s.window_end else None

    def _limit_of(self, budget: str) -> float:
        s = self._shown.get(budget)
        return float(s.limit if s is not None else self._declared_limits.get(budget, Decimal(0)))

    def _spent_of(self, budget: str) -> float:
        s = self._current(budget)
        return 0.0 if s is None else float(s.spent)

    def _reserved_of(self, budget: str) -> float:
        s = self._current(budget)
        return 0.0 if s is None else float(s.reserved)

    def _remaining_of(self, budget: str) -> float:
        s = self._current(budget)
        return 1.0 if s is None else float(min(Decimal(1), max(Decimal(0), 1 - s.used)))

    def _window_end_of(self, budget: str) -> float:
        s = self._shown.get(budget)
        return 0.0 if s is None else s.window_end

    def _gauge(self, budget: str) -> None:
        """Bind the budget's gauges to its shown key (once per budget name)."""
        with self._lock:
            if budget in self._gauged:
                return
            self._gauged.add(budget)
        for gauge, read in ((self.limit, self._limit_of), (self.spent, self._spent_of),
                            (self.reserved, self._reserved_of), (self.remaining_ratio, self._remaining_of),
                            (self.window_end, self._window_end_of)):
            gauge.labels(budget).set_function(partial(read, budget))

    # -- BudgetObserver ----------------------------------------------------------------
    def checked(self, budget: str, outcome: str) -> None:
        self.checks.labels(budget, outcome).inc()

    def settled(self, budget: str, result: str, amount: Decimal, currency: str) -> None:
        self.settlements.labels(budget, result).inc()
        if result in BOOKED and amount > 0:
            self.cost.labels(budget, currency).inc(float(amount))

    def window(self, budget: str, key: str, limit: Decimal, spent: Decimal, reserved: Decimal,
               window_end: float) -> None:
        new = _Shown(key, limit, spent, reserved, window_end)
        with self._lock:
            cur = self._shown.get(budget)
            # a later window replaces the one shown; a report from an earlier one (a late settle) is old news;
            # in the same window the key shown is updated, and another key replaces it when it is nearer its limit
            if (cur is None or window_end > cur.window_end
                    or (window_end == cur.window_end and (key == cur.key or new.used >= cur.used))):
                self._shown[budget] = new
        if budget not in self._gauged:
            self._gauge(budget)

    def event(self, event: BudgetEvent) -> None:
        self.events.labels(event.budget, event.kind).inc()
        line = event_record(event, self.clock())
        if self.record is not None:
            self.record(line)
        if self.notifier is not None:
            self.notifier.notify_budget(line.to_dict())  # (queues; never blocks or raises)
