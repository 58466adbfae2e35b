"""Control API routes for budgets (docs/limits.md, "Seeing budgets").

    GET /v1/budgets[?name=B&agent=ID&group=G&connector=C&action=A&resource=R&workflow=W&window=W&limit=N]
    GET /v1/budgets/{name}[?agent=...&window=W&limit=N]                                      (operators)

Every declared budget (name, match, key, limit, currency, period, time zone, what a call
costs, soft threshold, on_exceed, shadow, failure mode) with the window asked for (the
current one by default; `previous`, or a window id such as `month:2026-11@Europe/Berlin`)
and its ledgers there: one per key with spend or held reservations, each with spent,
reserved, remaining, the fraction used, and, in the current window, a projection at the
rate so far (spent / elapsed): when spent + reserved reaches the limit (null: not in this
window) and the spend at the window's end. Amounts are decimal strings, never floats.

The ledgers are read from the ledger backend, so they are fleet-wide (every replica books
there). `GET /v1/budgets/{name}` adds a burn-down series per ledger: the cumulative spend
over the window from this replica's decision records (their `budget` parts), so with
several replicas each shows its own share; the `spent` beside it is the fleet's.

Key values from requests and tokens (`param:`, `query:`, `field:`, `claim:`) are shown as
`sha256:<12 hex>` digests, as in a 429; a key too long to store whole is shown as far as its
stored prefix goes (`key_shortened`). Filters (agent, group, connector, action, resource,
workflow) narrow the ledgers of budgets keyed on that dimension; budgets not keyed on it
are shown whole. 422 for a `name` no budget has or a window that is not one of the budget's.

Operators authenticate as for claims and rate limits (control.admin_group).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..limits.budget_table import Budget
from ..limits.budget_view import (FILTER_DIMENSIONS, LedgerView, Projection, bookings, burn_down, ledgers, project,
                                  record_time, used_fraction, window_named)
from ..limits.errors import CounterUnavailable
from ..record.decisions import iso
from ..limits.windows import Window, window_for
from ..store.counters import ZERO, dec_text
from .activity_api import _lines_backwards
from .auth import control_auth, problem
from .models import FilterText, InputModel, _clamp, read_query
from .models_responses import Timestamp
from .rate_limits_api import RateLimitMatchOut

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")

MAX_LEDGERS = 1000
RECORD_SCAN_BYTES = 32 * 1024 * 1024  # of decision records read back for one burn-down
_TIME = re.compile(rb'"time"\s*:\s*"([0-9T:.+\-Z]{10,40})"')
Amount = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+)?$", description="A decimal amount (never a float).")]


# ---- what the routes accept and answer (documented in control/openapi.py) ----
class BudgetShowQuery(InputModel):
    """Which ledgers of one budget, in which window."""

    FIELD_TITLES = {"limit": "Bad paging"}
    BAD_TITLE = "Bad filter"
    agent: FilterText | None = Field(default=None, description="Ledgers of this agent (budgets keyed on `agent`).")
    group: FilterText | None = Field(default=None, description="Ledgers of this group (budgets keyed on `group`).")
    connector: FilterText | None = Field(default=None, description="Key dimension `connector`.")
    action: FilterText | None = Field(default=None, description="Key dimension `action`.")
    resource: FilterText | None = Field(default=None, description='Key dimension `resource`, e.g. Incident::"INC0012".')
    workflow: FilterText | None = Field(default=None, description="Key dimension `workflow` (an instance id).")
    window: FilterText | None = Field(default=None, description="`current` (default), `previous`, or a window id of the "
                                                        "budget, e.g. month:2026-11@Europe/Berlin (422 otherwise).")
    limit: Annotated[int, _clamp(1, MAX_LEDGERS)] = Field(
        100, description="Ledgers looked at per budget, clamped to 1..1000 (`ledgers_truncated` when there are more).")


class BudgetQuery(BudgetShowQuery):
    """Which budgets, which of their ledgers, in which window."""

    name: FilterText | None = Field(default=None, description="Only this budget (422 when no budget has that name).")


class BudgetPath(InputModel):
    name: str = Field(min_length=1, max_length=64, description="The budget's name.")


class CostOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    kind: Literal["static", "field", "response", "llm", "route"] = Field(
        description="`route`: the budget names no cost; each route's `cost:` applies, else 1 per call.")
    static: Amount | None = None
    field: str | None = Field(default=None, description="The request value whose number is the cost.")
    response: str | None = Field(default=None, description="The dot path of the answer whose number is the actual cost.")
    estimate: str | None = Field(default=None, description="Reserved until the actual cost is known: an amount or "
                                                   "`field:<name>`.")
    scale: Amount | None = None


class WindowOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str = Field(description="The window id the ledgers are kept under, e.g. month:2026-12@Europe/Berlin.")
    start: Timestamp
    end: Timestamp = Field(description="Exclusive: the next window starts here.")
    current: bool


class ProjectionOut(BaseModel):
    """At the rate spent so far in the current window."""

    model_config = ConfigDict(frozen=True)
    rate_per_hour: Amount = Field(description="Spent so far divided by the hours elapsed in the window.")
    exhausted: bool = Field(description="Spent + reserved is at or over the limit.")
    exhaustion_at: Timestamp | None = Field(description="When spent + reserved reaches the limit at that rate; null "
                                                        "when exhausted already, nothing is spent, or not before "
                                                        "the window ends.")
    at_window_end: Amount = Field(description="Spent + reserved + the rate times the time left in the window.")


class BurnPoint(BaseModel):
    model_config = ConfigDict(frozen=True)
    time: Timestamp
    spent: Amount = Field(description="Cumulative spend booked by this replica's requests up to then.")


class LedgerOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    key: dict[str, str | None] = Field(description="The key's dimensions and values; request and token values as "
                                                   "`sha256:<12 hex>`; null: none.")
    key_digest: str = Field(description="As decision records name the ledger (`budget.key`).")
    key_shortened: bool = Field(description="Stored as a prefix plus a digest: dimensions past it are not shown.")
    spent: Amount
    reserved: Amount = Field(description="Held by calls in flight (not yet settled, not expired).")
    remaining: Amount = Field(description="limit - spent - reserved, at least 0.")
    used_fraction: Amount = Field(description="(spent + reserved) / limit, to 4 places; above 1 when over.")
    soft_reached: bool = Field(description="At or past soft_threshold (false when none is set).")
    projection: ProjectionOut | None = Field(default=None, description="Current window only.")
    burn_down: list[BurnPoint] | None = Field(default=None, description="GET /v1/budgets/{name} only: from this replica's "
                                                                "decision records.")


class BudgetOut(BaseModel):
    """A declared budget and its ledgers in one window (docs/limits.md)."""

    model_config = ConfigDict(frozen=True)
    name: str
    where: str = Field(description="Where it is declared: `budgets[i] (name)`.")
    match: RateLimitMatchOut
    key: list[str] = Field(description="Key dimensions: one ledger per distinct combination of values.")
    limit: Amount
    currency: str
    period: Literal["minute", "hour", "day", "week", "month", "year"]
    timezone: str
    cost: CostOut
    soft_threshold: Amount | None = Field(description="A fraction of the limit (0.8 = 80 %).")
    on_exceed: Literal["refuse", "hold"]
    shadow: bool = Field(description="Reserved and recorded, never refused or held.")
    on_unavailable: Literal["closed", "open"]
    reservation_ttl_seconds: int
    window: WindowOut
    ledgers: list[LedgerOut] = Field(description="Keys with spend or held reservations in the window, most used first.")
    ledgers_truncated: bool = Field(description="More ledgers than `limit` exist; the answer looked at the first ones.")
    spent_total: Amount = Field(description="Spent over the ledgers listed.")


class BudgetList(BaseModel):
    model_config = ConfigDict(frozen=True)
    backend: str | None = Field(description="Where the ledgers live: sqlite, postgresql, redis (null: no budgets).")
    ledger_available: bool = Field(description="False when the ledger backend did not answer (ledgers left empty).")
    now: Timestamp
    budgets: list[BudgetOut]


class BurnDownSource(BaseModel):
    model_config = ConfigDict(frozen=True)
    replica: Literal[True] = Field(default=True, description="Always true: the series are this replica's own records; the "
                                                     "ledger totals are fleet-wide.")
    complete: bool = Field(description="False when the records were read back only to `since` (a bounded scan), "
                                       "or are not there (the decision record file is missing).")
    since: Timestamp | None = Field(description="The series cover the window from here (its start when complete).")


class BudgetDetail(BaseModel):
    model_config = ConfigDict(frozen=True)
    backend: str
    ledger_available: bool
    now: Timestamp
    budget: BudgetOut
    burn_down: BurnDownSource


# ---- building the answers ----
def _cost(b: Budget) -> CostOut:
    c = b.cost
    if c is None:
        return CostOut(kind="route")
    est: str | None = None
    if isinstance(c.estimate, Decimal):
        est = dec_text(c.estimate)
    elif c.estimate is not None:
        est = f"field:{c.estimate.field}"
    return CostOut(kind=c.kind, static=dec_text(c.static) if c.static is not None else None, field=c.field,
                   response=c.response, estimate=est, scale=dec_text(c.scale) if c.scale is not None else None)


def _projection(p: Projection | None) -> ProjectionOut | None:
    if p is None:
        return None
    return ProjectionOut(rate_per_hour=dec_text(p.rate_per_hour), exhausted=p.exhausted,
                         exhaustion_at=iso(p.exhaustion_at) if p.exhaustion_at is not None else None,
                         at_window_end=dec_text(p.at_window_end))


def _ledger(b: Budget, v: LedgerView, w: Window, now: float, series: list[tuple[float, Decimal]] | None) -> LedgerOut:
    u = v.usage
    left = b.limit - u.spent - u.reserved
    fraction = used_fraction(b.limit, u)
    return LedgerOut(
        key=v.shown, key_digest=v.digest, key_shortened=v.shortened, spent=dec_text(u.spent),
        reserved=dec_text(u.reserved), remaining=dec_text(left if left > 0 else ZERO), used_fraction=dec_text(fraction),
        soft_reached=b.soft_threshold is not None and u.spent + u.reserved >= b.soft_threshold * b.limit,
        projection=_projection(project(b.limit, u, w, now)),
        burn_down=[BurnPoint(time=iso(t), spent=dec_text(s)) for t, s in series] if series is not None else None,
    )


def _budget(b: Budget, w: Window, now: float, views: list[LedgerView], truncated: bool,
            series: dict[str, list[tuple[float, Decimal]]] | None) -> BudgetOut:
    m = b.match
    return BudgetOut(
        name=b.name, where=b.where,
        match=RateLimitMatchOut(connectors=list(m.connectors), actions=list(m.actions), methods=list(m.methods)),
        key=list(b.key), limit=dec_text(b.limit), currency=b.currency, period=b.period,  # type: ignore[arg-type]
        timezone=b.timezone, cost=_cost(b),
        soft_threshold=dec_text(b.soft_threshold) if b.soft_threshold is not None else None,
        on_exceed=b.on_exceed,  # type: ignore[arg-type]
        shadow=b.shadow, on_unavailable="open" if b.fail_open else "closed",
        reservation_ttl_seconds=b.reservation_ttl_seconds,
        window=WindowOut(id=w.id, start=iso(w.start), end=iso(w.end), current=w.contains(now)),
        ledgers=[_ledger(b, v, w, now, series.get(v.digest) if series is not None else None) for v in views],
        ledgers_truncated=truncated, spent_total=dec_text(sum((v.usage.spent for v in views), ZERO)),
    )


def _line_time(line: bytes) -> float | None:
    m = _TIME.search(line, 0, 400)
    if m is None:
        return None
    try:
        return datetime.fromisoformat(m.group(1).decode("ascii").replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def read_bookings(path: Path, budget: Budget, w: Window, digests: set[str]) -> tuple[dict[str, list[tuple[float, Decimal]]], bool, float | None]:
    """What this replica's decision records booked in the window, per ledger digest, read from the
    file's end back to the window's start (less the reservation lifetime: a record is written when
    its answer comes); (bookings, complete, the oldest time read)."""
    out: dict[str, list[tuple[float, Decimal]]] = {}
    stop = w.start - budget.reservation_ttl_seconds - 60
    needle = json.dumps(budget.name, ensure_ascii=False).encode()
    budget_left = [RECORD_SCAN_BYTES]
    oldest: float | None = None
    try:
        f = open(path, "rb")
    except OSError:
        return out, False, None
    with f:
        size = os.fstat(f.fileno()).st_size
        for line in _lines_backwards(f, size, budget_left):
            t = _line_time(line)
            if t is not None:
                oldest = t if oldest is None else min(oldest, t)
                if t < stop:
                    return out, True, w.start
            if b'"budget"' not in line or needle not in line or t is None or t >= w.end:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or "type" in rec:
                continue
            at = record_time(rec)
            if at is None:
                continue
            for digest, amount in bookings(rec, budget.name, w.id):
                if digest in digests:
                    out.setdefault(digest, []).append((at, amount))
    complete = budget_left[0] > 0  # (read the whole file: nothing older is left)
    return out, complete, w.start if complete else oldest


# ---- routes ----
def add_budget_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    auth = control_auth(app, runtime.config)

    def given_of(q: BudgetShowQuery) -> dict[str, str]:
        return {d: v for d in FILTER_DIMENSIONS if (v := getattr(q, d))}

    async def one(b: Budget, q: BudgetShowQuery, now: float, with_series: bool
                  ) -> tuple[BudgetOut, bool, BurnDownSource | None] | web.Response:
        bs = runtime.budgets
        assert bs is not None
        w = window_named(b, q.window or "current", now)
        if w is None:
            example = window_for(now, b.period, b.timezone).id
            return problem(422, "Not a window of this budget",
                           f"window {q.window!r}: budget {b.name!r} counts {b.period} windows in {b.timezone}; ask "
                           f"for current, previous or a window id such as {example!r}")
        available, truncated = True, False
        views: list[LedgerView] = []
        ledger: Any = bs.ledger  # (every backend lists its ledgers: budget_view.LedgerReader)
        try:
            views, truncated = await ledgers(ledger, b, w, given_of(q), q.limit, now)
        except CounterUnavailable as e:
            log.error("budgets: the ledger is unavailable: %s", e)
            available = False
        series: dict[str, list[tuple[float, Decimal]]] | None = None
        source: BurnDownSource | None = None
        if with_series:
            found: dict[str, list[tuple[float, Decimal]]] = {}
            complete, since = False, None
            if views:
                found, complete, since = await asyncio.to_thread(
                    read_bookings, runtime.config.decisions_path, b, w, {v.digest for v in views})
            else:
                complete, since = True, w.start
            series = {v.digest: burn_down(found.get(v.digest, []), w, now) for v in views}
            source = BurnDownSource(complete=complete, since=iso(since) if since is not None else None)
        return _budget(b, w, now, views, truncated, series), available, source

    async def list_budgets(request: web.Request) -> web.Response:
        who = await auth.operator(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, BudgetQuery)
        if isinstance(q, web.Response):
            return q
        now = time.time()
        bs = runtime.budgets
        if bs is None:
            if q.name:
                return problem(422, "Unknown budget", f"no budget is named {q.name!r}: none is declared")
            return web.json_response(BudgetList(backend=None, ledger_available=True, now=iso(now), budgets=[])
                                     .model_dump(mode="json"))
        chosen = list(bs.table.budgets)
        if q.name:
            chosen = [b for b in chosen if b.name == q.name]
            if not chosen:
                return problem(422, "Unknown budget", f"no budget is named {q.name!r} (declared: "
                                                      f"{', '.join(b.name for b in bs.table.budgets)})")
        out, available = [], True
        for b in chosen:
            got = await one(b, q, now, False)
            if isinstance(got, web.Response):
                return got
            out.append(got[0])
            available = available and got[1]
        body = BudgetList(backend=bs.backend, ledger_available=available, now=iso(now), budgets=out)
        return web.json_response(body.model_dump(mode="json"))

    async def show_budget(request: web.Request) -> web.Response:
        who = await auth.operator(request)
        if isinstance(who, web.Response):
            return who
        name = request.match_info["name"]
        q = read_query(request, BudgetShowQuery)
        if isinstance(q, web.Response):
            return q
        bs = runtime.budgets
        b = bs.table.get(name) if bs is not None else None
        if bs is None or b is None:
            known = ", ".join(x.name for x in bs.table.budgets) if bs is not None else ""
            return problem(404, "Unknown budget", f"no budget is named {name!r}"
                                                  + (f" (declared: {known})" if known else ": none is declared"))
        now = time.time()
        got = await one(b, q, now, True)
        if isinstance(got, web.Response):
            return got
        budget, available, source = got
        assert source is not None
        body = BudgetDetail(backend=bs.backend, ledger_available=available, now=iso(now), budget=budget,
                            burn_down=source)
        return web.json_response(body.model_dump(mode="json"))

    app.router.add_get("/v1/budgets", list_budgets)
    app.router.add_get("/v1/budgets/{name}", show_budget)

