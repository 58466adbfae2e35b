"""The `rate-limit` stage: every request counts against the rate limits that apply to it
(docs/limits.md, "Rate limits").

Placed after classification and the context stages (claims, workflow) and before
`authorize`, so a request the policy denies is counted too: a runaway loop of denied
calls is throttled like any other. For each limit that applies (shortest period first):

- one GCRA hit (cost 1) on the limit's counter key, atomic in the backend;
- throttled: 429 `rate-limited` with `Retry-After`, naming the limit, the key and when
  to retry. Limits after it are not charged; a request refused here does not count
  against the limit that refused it (GCRA changes nothing for a refused request);
- a `shadow: true` limit that would throttle is counted and recorded
  (`shadow_throttled`), never enforced;
- counters unreachable (`CounterUnavailable`): 503 when the limit fails closed (the
  default), else the request goes on with the limit unchecked; logged, counted, recorded.

Every answer to a limited request, forwarded or refused, carries the IETF
`RateLimit-Policy` and `RateLimit` fields of its enforced limits (tightest first), and
the Cedar context gets `context.usage` (the tightest enforced limit; a shadow one when
every limit is in shadow) so policies can refuse or hold earlier.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..core.chain import Stage
from ..core.exchange import Exchange
from ..core.model import AgentIdentity, Refusal
from ..policy.stage import CONTEXT_EXTRA
from ..record.model import RATE_LIMIT_RECORD, RateLimitCheck, RateLimitPart
from .errors import CounterUnavailable
from .headers import ratelimit, ratelimit_policy, retry_after
from .keys import limit_key
from .rate import RateDecision, RateLimiter
from .table import Limit, LimitTable

log = logging.getLogger("proctor.limits")

THROTTLED_KIND = "rate-limited"  # Refusal.kind of a 429
OUTCOMES = ("allowed", "throttled", "shadow_throttled", "unavailable")
_RANK = {"throttled": 0, "shadow_throttled": 1, "allowed": 2, "unavailable": 3}
_RECORD_RANK = {"throttled": 0, "shadow_throttled": 1, "unavailable": 2, "allowed": 3}
# Key dimensions whose values are named in a 429 as they are; request and token values are shown digested.
PLAIN_DIMENSIONS = frozenset({"agent", "group", "connector", "action", "resource", "workflow"})
# A limit or budget keyed on `group` counts the request against every one of the agent's groups;
# an agent in more groups than this is refused (fail closed: counting only some would let a group's
# limit miss it, and each group is one counter operation per request).
MAX_GROUP_KEYS = 256


class TooManyGroups(Exception):
    """The agent is in more groups than a group-keyed limit counts (MAX_GROUP_KEYS)."""


def too_many_groups_refusal(what: str, agent: str, count: int) -> Refusal:
    return Refusal(
        403, "Too many groups", f"{what} is counted per agent group, and {agent} is in {count} groups, more than "
        f"the {MAX_GROUP_KEYS} Proctor counts per request; this request was not forwarded. Issue the agent a token "
        "with fewer groups.", reasons=[], kind="request")
UNAVAILABLE_RETRY_AFTER = 5
_LOG_EVERY_SECONDS = 60.0

GroupsOf = Callable[[AgentIdentity], list[str]]


class RateLimitObserver(Protocol):
    def count(self, limit: str, outcome: str) -> None: ...


class _NoObserver:
    def count(self, limit: str, outcome: str) -> None:
        return None


@dataclass(slots=True)
class Checked:
    """One counter a request was counted against."""

    limit: Limit
    key: str
    shown: dict[str, str | None]
    decision: RateDecision | None  # None: the counters could not answer
    outcome: str

    def rank(self) -> tuple[int, float, float, str]:
        d = self.decision
        return (_RANK[self.outcome], d.remaining if d is not None else math.inf,
                -(d.reset_after if d is not None else 0.0), self.limit.name)

    def record_rank(self) -> tuple[int, bool, float, float, str]:
        """The record names first what decided: a throttle, a shadow throttle, counters that could not
        answer, then the tightest enforced limit, then shadow ones."""
        d = self.decision
        return (_RECORD_RANK[self.outcome], self.limit.shadow, d.remaining if d is not None else math.inf,
                -(d.reset_after if d is not None else 0.0), self.limit.name)


def value_text(value: Any) -> str | None:
    """A typed value (Cedar JSON) or a token claim as key text; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int)):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict) and set(value) == {"__extn"} and isinstance(value["__extn"], dict):
        return str(value["__extn"].get("arg"))
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def digest(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def counter_key(limit: str, dims: tuple[str, ...], values: tuple[str | None, ...]) -> str:
    """The counter key: the limit's name and each dimension with its value (`=v`) or absent (`-`).
    Parts are escaped by limit_key, so no value can pose as another dimension."""
    parts = ["rl", limit]
    for dim, v in zip(dims, values):
        parts += [dim, "-" if v is None else "=" + v]
    return limit_key(*parts)


def shown_value(dim: str, value: str | None) -> str | None:
    if value is None or dim in PLAIN_DIMENSIONS:
        return value
    return "sha256:" + digest(value, 12)


def dimension_values(dim: str, ex: Exchange, groups_of: GroupsOf) -> list[str | None]:
    """The values of one key dimension for a request (several for `group`; None when absent)."""
    cls, identity = ex.classification, ex.identity
    assert cls is not None and identity is not None
    if dim == "agent":
        return [identity.agent_id]
    if dim == "group":
        groups = sorted(set(groups_of(identity)))
        if len(groups) > MAX_GROUP_KEYS:
            raise TooManyGroups(len(groups))
        return list(groups) or [None]
    if dim == "connector":
        return [cls.connector]
    if dim == "action":
        return [cls.action]
    if dim == "resource":
        return [cls.resource_uid]
    if dim == "workflow":
        wf = ex.stage_data.get(CONTEXT_EXTRA, {}).get("workflow")
        instance = wf.get("instance") if isinstance(wf, dict) else None
        return [instance or None]
    kind, _, name = dim.partition(":")
    source: dict[str, Any] = {"param": cls.params, "query": cls.query_params, "field": cls.fields,
                              "claim": identity.claims}.get(kind, {})
    return [value_text(source.get(name))]


def key_combos(dims: tuple[str, ...], ex: Exchange,
               groups_of: GroupsOf) -> Iterator[tuple[tuple[str | None, ...], dict[str, str | None]]]:
    """(values, the key as refusals show it) for each counter a request counts in: one, or one
    per group of the agent's for a key on `group` (shared by rate limits and budgets)."""
    combos: list[tuple[str | None, ...]] = [()]
    for dim in dims:
        values = dimension_values(dim, ex, groups_of)
        combos = [c + (v,) for c in combos for v in values]
    for combo in combos:
        yield combo, {dim: shown_value(dim, v) for dim, v in zip(dims, combo)}


def period_text(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return unit if n == 1 else f"{n} {unit}s"
    return f"{seconds:g} seconds"


def _key_text(shown: dict[str, str | None]) -> str:
    if not shown:
        return "shared by every request it applies to"
    parts = [f"{dim} {'(none)' if v is None else repr(v)}" for dim, v in shown.items()]
    return "for " + ", ".join(parts)


def throttled_refusal(c: Checked, agent: str) -> Refusal:
    """429 naming the limit, its key and when to retry."""
    d = c.decision
    assert d is not None
    lim = c.limit
    wait = retry_after([d]) or math.ceil(d.period_seconds)
    burst = f" (at most {d.burst} at once)" if d.burst != d.limit else ""
    detail = (f"{agent} reached rate limit '{lim.name}': {d.limit} requests per {period_text(d.period_seconds)}"
              f"{burst}, {_key_text(c.shown)}. This request was not forwarded. Retry after {wait} "
              f"second{'' if wait == 1 else 's'} "
              f"(Retry-After); requests refused meanwhile do not use up '{lim.name}', so waiting is enough.")
    return Refusal(
        429, "Too many requests: rate limit reached", detail, reasons=[f"rate-limit:{lim.name}"],
        headers={"Retry-After": str(wait)}, kind=THROTTLED_KIND,
        extra={"rate_limit": {"name": lim.name, "limit": d.limit, "period_seconds": d.period_seconds,
                              "burst": d.burst, "key": dict(c.shown), "remaining": d.remaining,
                              "retry_after": wait}},
    )


def unavailable_refusal(lim: Limit, backend: str) -> Refusal:
    """503: the counters cannot be read and the limit fails closed."""
    return Refusal(
        503, "Rate limit unavailable",
        f"the counters of rate limit '{lim.name}' ({backend}) cannot be reached right now, and the limit fails "
        "closed, so this request was not forwarded; retry later",
        reasons=[f"rate-limit:{lim.name}"], headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
        kind="fail-closed", extra={"rate_limit": {"name": lim.name, "unavailable": True}},
    )


def _check_record(c: Checked) -> RateLimitCheck:
    out: RateLimitCheck = {"name": c.limit.name, "key": digest(c.key), "outcome": c.outcome,
                           "limit": c.limit.gcra.limit, "period_seconds": c.limit.period_seconds,
                           "shadow": c.limit.shadow}
    if c.decision is not None:
        out["remaining"] = c.decision.remaining
    return out


def record_part(checked: list[Checked]) -> RateLimitPart:
    ordered = sorted(checked, key=Checked.record_rank)
    first = _check_record(ordered[0])
    part: RateLimitPart = {"name": first["name"], "key": first["key"], "outcome": first["outcome"],
                           "limit": first["limit"], "period_seconds": first["period_seconds"],
                           "shadow": first["shadow"]}
    if "remaining" in first:
        part["remaining"] = first["remaining"]
    if len(ordered) > 1:
        part["others"] = [_check_record(c) for c in ordered[1:]]
    return part


def usage_context(checked: list[Checked]) -> dict[str, Any]:
    """context.usage: the tightest enforced limit (a shadow one when every limit is in shadow)."""
    enforced = [c for c in checked if not c.limit.shadow]
    c = min(enforced or checked, key=Checked.rank)
    d, g = c.decision, c.limit.gcra
    return {
        "name": c.limit.name,
        "limit": g.limit,
        "period": math.ceil(g.period_seconds),
        "remaining": d.remaining if d is not None else g.burst,
        "reset_after": math.ceil(d.reset_after) if d is not None else 0,
        "throttled": c.outcome in ("throttled", "shadow_throttled"),
        "shadow": c.limit.shadow,
        "known": d is not None,
    }


def header_fields(checked: list[Checked]) -> dict[str, str]:
    """RateLimit-Policy and RateLimit for the enforced limits that answered (one item per limit,
    its tightest key), tightest first."""
    best: dict[str, Checked] = {}
    for c in checked:
        if c.limit.shadow or c.decision is None:
            continue
        have = best.get(c.limit.name)
        if have is None or c.rank() < have.rank():
            best[c.limit.name] = c
    items = [(c.limit.name, c.decision) for c in sorted(best.values(), key=Checked.rank) if c.decision is not None]
    if not items:
        return {}
    return {"RateLimit-Policy": ratelimit_policy(items), "RateLimit": ratelimit(items)}


class PeriodicSweep:
    """Deletes expired counter state (rate-limit rows, lapsed budget reservations) at most once per
    interval, in the background: every read ignores expired state anyway, so this only bounds the
    tables (Redis keys expire by themselves)."""

    def __init__(self, counters: Any, interval_seconds: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self.counters = counters
        self.interval_seconds = interval_seconds
        self.clock = clock
        self._last = clock()
        self._running: asyncio.Task[None] | None = None

    def maybe(self) -> None:
        now = self.clock()
        if now - self._last < self.interval_seconds or self._running is not None:
            return
        self._last = now
        self._running = asyncio.get_running_loop().create_task(self._sweep(now))
        self._running.add_done_callback(self._done)

    def _done(self, _task: asyncio.Task[None]) -> None:
        self._running = None

    async def _sweep(self, now: float) -> None:
        try:
            swept = await self.counters.sweep(now)
        except Exception as e:  # noqa: BLE001 - housekeeping: expired state is ignored by every read anyway
            log.warning("could not sweep expired counters: %s", e)
        else:
            if swept:
                log.debug("swept %d expired counters", swept)


class RateLimit(Stage):
    """Before authorization: count the request against its rate limits (see the module docstring)."""

    name = "rate-limit"

    def __init__(self, table: LimitTable, counters: RateLimiter, groups_of: GroupsOf,
                 observer: RateLimitObserver | None = None, clock: Callable[[], float] = time.time,
                 sweep_interval_seconds: float = 60.0) -> None:
        self.table = table
        self.counters = counters
        self.groups_of = groups_of
        self.observer: RateLimitObserver = observer or _NoObserver()
        self.clock = clock
        self.counts: dict[str, Counter[str]] = {lim.name: Counter() for lim in table.limits}
        self.sweeper = PeriodicSweep(counters, sweep_interval_seconds, clock)
        self._logged: dict[str, float] = {}

    # -- keys ---------------------------------------------------------------------------
    def keys(self, lim: Limit, ex: Exchange) -> Iterator[tuple[str, dict[str, str | None]]]:
        """(counter key, the key as a 429 shows it) for each counter the request counts against:
        one, or one per group of the agent's for a limit keyed on `group`."""
        for combo, shown in key_combos(lim.key, ex, self.groups_of):
            yield counter_key(lim.name, lim.key, combo), shown

    # -- the request ----------------------------------------------------------------------
    def _count(self, name: str, outcome: str) -> None:
        self.counts.setdefault(name, Counter())[outcome] += 1
        self.observer.count(name, outcome)

    def _unavailable(self, lim: Limit, e: CounterUnavailable, decision_id: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(lim.name, -math.inf) >= _LOG_EVERY_SECONDS:
            self._logged[lim.name] = now
            log.error("rate limit %s: counters unavailable (decision %s), failing %s: %s", lim.name, decision_id,
                      "open: requests pass unchecked" if lim.fail_open else "closed: requests are refused (503)", e)

    async def on_request(self, ex: Exchange) -> None:
        cls, identity, req = ex.classification, ex.identity, ex.request
        if cls is None or identity is None or req is None or not cls.action:
            return
        limits = self.table.for_request(cls.connector, cls.route, cls.action, req.method)
        if not limits:
            return
        self.sweeper.maybe()
        now = self.clock()
        checked: list[Checked] = []
        refusal: Refusal | None = None
        for lim in limits:
            try:
                keys = list(self.keys(lim, ex))
            except TooManyGroups as e:
                refusal = too_many_groups_refusal(f"rate limit '{lim.name}'", identity.agent_id, e.args[0])
                break
            for key, shown in keys:
                try:
                    d = await self.counters.hit(key, lim.gcra.limit, lim.gcra.period_seconds, now, 1,
                                                lim.gcra.burst)
                except CounterUnavailable as e:
                    self._count(lim.name, "unavailable")
                    self._unavailable(lim, e, ex.decision_id)
                    checked.append(Checked(lim, key, shown, None, "unavailable"))
                    if not lim.fail_open:
                        ex.errors.append(f"rate limit {lim.name}: {e}")
                        refusal = unavailable_refusal(lim, e.backend)
                        break
                    continue
                outcome = "allowed" if d.allowed else "shadow_throttled" if lim.shadow else "throttled"
                self._count(lim.name, outcome)
                c = Checked(lim, key, shown, d, outcome)
                checked.append(c)
                if outcome == "throttled":
                    refusal = throttled_refusal(c, identity.agent_id)
                    break
            if refusal is not None:
                break
        if checked:
            ex.stage_data[RATE_LIMIT_RECORD] = record_part(checked)
            ex.plan.response_headers.update(header_fields(checked))
        if refusal is not None:
            ex.refuse(refusal)
            return
        ex.stage_data.setdefault(CONTEXT_EXTRA, {})["usage"] = usage_context(checked)
