"""Control API routes for claims on resources (docs/coordination.md).

    GET  /v1/claims[?connector=NAME]   live claims (operators)
    POST /v1/claims/{id}/release       force-release one claim (operators)

Operators authenticate as for the kill switch (control.admin_group). A release
is logged with the operator's id; the agent that held the claim learns nothing
until its next write, which starts a new tenure (a higher fence) if it is free.

The `proctor_claims_held` gauge is refreshed from the store here, every few
seconds while the control API runs: the store is the only exact count across
replicas, and a scrape must not wait on it. The same loop deletes expired claims
about once a minute (readers ignore them already; this only keeps the table small).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter
from typing import TYPE_CHECKING

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..coordination.metrics import ClaimMetrics
from ..record.decisions import iso
from ..store import StoreError
from ..store.claims import Claim
from .auth import control_auth, foreign_origin, problem
from .models import InputModel, read_query
from .models_responses import Timestamp

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")
_ID_RE = re.compile(r"clm_[A-Za-z0-9_-]{1,64}")
GAUGE_REFRESH_SECONDS = 5.0
SWEEP_EVERY = 12  # gauge refreshes: expired claims are deleted about once a minute


# ---- what the routes accept and answer (documented in control/openapi.py) ----
class ClaimListQuery(InputModel):
    connector: str | None = Field(None, max_length=256, description="Only this connector's claims.")


class ClaimPath(InputModel):
    id: str = Field(min_length=1, description="Claim id (`clm_` and 20 URL-safe characters).")


class ClaimOut(BaseModel):
    """A live claim: `holder` keeps other agents' writes on `resource` out until `expires_at`."""

    model_config = ConfigDict(frozen=True)
    id: str
    connector: str
    resource: str = Field(description='The Cedar resource uid, e.g. Incident::"INC0012".')
    holder: str = Field(description="The agent holding the claim.")
    holder_groups: list[str]
    mode: str = Field(description="exclusive | shared")
    since: Timestamp
    expires_at: Timestamp
    fence: int = Field(description="The resource's fencing counter for this tenure (grows with every new holder).")

    @classmethod
    def of(cls, c: Claim) -> "ClaimOut":
        return cls(id=c.id, connector=c.connector, resource=c.resource, holder=c.holder,
                   holder_groups=list(c.holder_groups), mode=c.mode, since=iso(c.since),
                   expires_at=iso(c.expires_at), fence=c.fence)


class ClaimList(BaseModel):
    model_config = ConfigDict(frozen=True)
    claims: list[ClaimOut]


class ClaimRelease(BaseModel):
    model_config = ConfigDict(frozen=True)
    released: ClaimOut
    released_by: str


def _claim_metrics(runtime: "ProctorRuntime") -> ClaimMetrics | None:
    try:
        observer = getattr(runtime.path.stage("claim-acquire"), "observer", None)
    except StopIteration:
        return None
    return observer if isinstance(observer, ClaimMetrics) else None


def add_claim_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    auth = control_auth(app, runtime.config)

    def unavailable(e: Exception) -> web.Response:
        log.error("store error: %s", e)
        return problem(503, "Store unavailable", "the state store cannot be reached; try again")

    async def list_claims(request: web.Request) -> web.Response:
        who = await auth.operator(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, ClaimListQuery)
        if isinstance(q, web.Response):
            return q
        try:
            claims = await runtime.store.list_claims(time.time(), connector=q.connector)
        except StoreError as e:
            return unavailable(e)
        return web.json_response(ClaimList(claims=[ClaimOut.of(c) for c in claims]).model_dump(mode="json"))

    async def release_claim(request: web.Request) -> web.Response:
        if foreign_origin(request):
            return problem(403, "Cross-origin request refused", "claims are released from the console, CLI or API")
        who = await auth.operator(request)
        if isinstance(who, web.Response):
            return who
        claim_id = request.match_info["id"]
        if not _ID_RE.fullmatch(claim_id):
            return problem(404, "No such claim", "claim ids look like clm_...")
        try:
            released = await runtime.store.release_claim(claim_id)
        except StoreError as e:
            return unavailable(e)
        if released is None:
            return problem(404, "No such claim", f"no claim {claim_id!r} (released already, or never held)")
        log.info("claim %s on %s (holder %s) released by operator %s", released.id, released.resource,
                 released.holder, who.id)
        out = ClaimRelease(released=ClaimOut.of(released), released_by=who.id)
        return web.json_response(out.model_dump(mode="json"))

    app.router.add_get("/v1/claims", list_claims)
    app.router.add_post("/v1/claims/{id}/release", release_claim)

    metrics = _claim_metrics(runtime)

    async def refresh_gauge() -> None:
        rounds = 0
        while True:
            try:
                now = time.time()
                if rounds % SWEEP_EVERY == 0:
                    await runtime.store.sweep_claims(now)
                rounds += 1
                if metrics is not None:
                    claims = await runtime.store.list_claims(now)
                    metrics.set_held(dict(Counter(c.connector for c in claims)))
            except StoreError as e:  # the gauge keeps its last value; readiness reports the store
                log.debug("claims gauge not refreshed: %s", e)
            await asyncio.sleep(GAUGE_REFRESH_SECONDS)

    task_key = web.AppKey("claims_gauge", asyncio.Task)  # type: ignore[var-annotated]

    async def start(app: web.Application) -> None:
        app[task_key] = asyncio.get_running_loop().create_task(refresh_gauge())

    async def stop(app: web.Application) -> None:
        task = app.get(task_key)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
