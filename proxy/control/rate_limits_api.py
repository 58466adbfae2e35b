"""Control API route for rate limits (docs/limits.md, "The control API").

    GET /v1/rate-limits[?agent=ID&group=G&connector=C&action=A&resource=R&workflow=W]   (operators)

Every declared limit (from proctor.yaml and from the connector manifests) with
what it applies to, its key, rate, burst, shadow mode and failure mode, and the
counts of this process since it started (allowed, throttled, shadow_throttled,
unavailable; `proctor_rate_limited_total` has the same, for every replica).

Given key values in the query, a limit whose key dimensions are all among them
also shows its counter's current state (remaining, when the next request and the
full burst come back), read without spending anything (a GCRA hit of cost 0).
Limits keyed on request or token values (`param:`, `query:`, `field:`, `claim:`)
show no state: those values are the agents' data, and are not taken here.

Operators authenticate as for claims and the kill switch (control.admin_group).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..limits.errors import CounterUnavailable
from ..limits.stage import OUTCOMES, counter_key
from ..limits.table import Limit
from .auth import control_auth
from .models import FilterText, InputModel, read_query

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")
STATE_DIMENSIONS = ("agent", "group", "connector", "action", "resource", "workflow")


class RateLimitQuery(InputModel):
    BAD_TITLE = "Bad filter"
    agent: FilterText | None = Field(None, description="An agent id: the state of limits keyed on `agent`.")
    group: FilterText | None = Field(None, description="A group: the state of limits keyed on `group`.")
    connector: FilterText | None = Field(None, description="A connector name (key dimension `connector`).")
    action: FilterText | None = Field(None, description="A Cedar action id (key dimension `action`).")
    resource: FilterText | None = Field(None, description='A Cedar resource uid, e.g. Incident::"INC0012" '
                                                          "(key dimension `resource`).")
    workflow: FilterText | None = Field(None, description="A workflow instance id (key dimension `workflow`).")


class RateLimitMatchOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    connectors: list[str] = Field(description="Empty: every connector.")
    actions: list[str] = Field(description="Exact action ids or prefixes ending in `*`; empty: every action.")
    methods: list[str] = Field(description="Empty: every method.")


class RateLimitState(BaseModel):
    """The counter of one key, now (nothing spent to read it)."""

    model_config = ConfigDict(frozen=True)
    key: dict[str, str] = Field(description="The key's dimensions and the values asked for.")
    remaining: int = Field(description="Requests that would pass right now.")
    refill_after: float = Field(description="Seconds until `remaining` grows by one (0: it is full).")
    reset_after: float = Field(description="Seconds until the full burst is available again.")


class RateLimitCounts(BaseModel):
    model_config = ConfigDict(frozen=True)
    allowed: int
    throttled: int
    shadow_throttled: int
    unavailable: int


class RateLimitOut(BaseModel):
    """A declared rate limit (docs/limits.md)."""

    model_config = ConfigDict(frozen=True)
    name: str
    source: Literal["config", "connector"] = Field(description="`rate_limits` in proctor.yaml, or a route's "
                                                                "`rate_limit` in a connector manifest.")
    where: str = Field(description="Where it is declared: `rate_limits[i] (name)`, or the first route declaring it.")
    match: RateLimitMatchOut | None = Field(None, description="Config limits: which requests count.")
    routes: list[str] = Field(default_factory=list, description="Connector limits: `<connector> <METHOD> <path>` of "
                                                                "every route that counts (they share the counters).")
    key: list[str] = Field(description="Key dimensions: one counter per distinct combination of values.")
    limit: int
    period_seconds: float
    burst: int
    shadow: bool = Field(description="Counted and recorded, never enforced.")
    on_unavailable: Literal["closed", "open"]
    counts: RateLimitCounts = Field(description="This process, since it started.")
    state: RateLimitState | None = Field(None, description="Present when every key dimension was given in the query.")


class RateLimitList(BaseModel):
    model_config = ConfigDict(frozen=True)
    backend: str | None = Field(description="Where the counters live: sqlite, postgresql, redis (null: no limits).")
    counters_available: bool = Field(description="False when a state could not be read (the backend did not answer).")
    limits: list[RateLimitOut]


def _out(lim: Limit, counts: dict[str, int], state: RateLimitState | None) -> RateLimitOut:
    m = lim.match
    return RateLimitOut(
        name=lim.name, source=lim.source, where=lim.where,
        match=RateLimitMatchOut(connectors=list(m.connectors), actions=list(m.actions), methods=list(m.methods))
        if m is not None else None,
        routes=list(lim.routes), key=list(lim.key), limit=lim.gcra.limit, period_seconds=lim.period_seconds,
        burst=lim.gcra.burst, shadow=lim.shadow, on_unavailable="open" if lim.fail_open else "closed",
        counts=RateLimitCounts(**{o: int(counts.get(o, 0)) for o in OUTCOMES}), state=state,
    )


def add_rate_limit_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    auth = control_auth(app, runtime.config)

    async def list_rate_limits(request: web.Request) -> web.Response:
        who = await auth.operator(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, RateLimitQuery)
        if isinstance(q, web.Response):
            return q
        rl = runtime.rate_limits
        if rl is None:
            return web.json_response(RateLimitList(backend=None, counters_available=True, limits=[])
                                     .model_dump(mode="json"))
        try:
            stage = runtime.path.stage("rate-limit")
            counts = getattr(stage, "counts", {})
        except StopIteration:
            counts = {}
        given = {d: getattr(q, d) for d in STATE_DIMENSIONS if getattr(q, d)}
        available, now, out = True, time.time(), []
        for lim in rl.table.limits:
            state = None
            if available and all(d in given for d in lim.key):
                values = tuple(given[d] for d in lim.key)
                try:
                    d = await rl.counters.hit(counter_key(lim.name, lim.key, values), lim.gcra.limit,
                                              lim.period_seconds, now, 0, lim.gcra.burst)
                except CounterUnavailable as e:
                    log.error("rate limits: counters unavailable: %s", e)
                    available = False
                else:
                    state = RateLimitState(key={dim: given[dim] for dim in lim.key}, remaining=d.remaining,
                                           refill_after=d.refill_after if math.isfinite(d.refill_after) else 0,
                                           reset_after=d.reset_after)
            out.append(_out(lim, dict(counts.get(lim.name, {})), state))
        body = RateLimitList(backend=rl.backend, counters_available=available, limits=out)
        return web.json_response(body.model_dump(mode="json"))

    app.router.add_get("/v1/rate-limits", list_rate_limits)
