"""Control API routes for claims on resources (docs/coordination.md).

    GET  /v1/claims[?connector=NAME]   live claims (operators)
    POST /v1/claims                    take or renew a claim (an agent for itself; an operator for any agent)
    POST /v1/claims/{id}/release       force-release one claim (operators)
    POST /v1/claims/{id}/transfer      move one claim to another agent (operators; {"to": AGENT})
    GET  /v1/claims/inbox              claims handed to human groups (people: their groups' items)
    POST /v1/claims/{id}/take          a member of the group takes a handed-off item (holder human:ID)
    POST /v1/claims/{id}/give-back     a human lets go of an inbox item (the resource is free again)

Operators authenticate as for the kill switch (control.admin_group). Agents may
take (`POST /v1/claims`) and release their own claims with their agent token, for
routes declared `acquire: api`. A release
or transfer is logged with the operator's id and recorded (a `claim` event:
decisions.jsonl and the OCSF audit trail); the agent that held the claim learns nothing
until its next write, which starts a new tenure (a higher fence) if it is free.

The `proctor_claims_held` gauge is refreshed from the store here, every few
seconds while the control API runs: the store is the only exact count across
replicas, and a scrape must not wait on it. The same loop deletes expired claims
about once a minute (readers ignore them already) and records each as an `expired`
claim event (a claim that a new acquire replaced first shows as that acquire instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import json
import re
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..connectors.manifest import ClaimSpec
from ..coordination.claims import RESERVED_HOLDERS, conflict_event
from ..coordination.handoff import HUMAN_HOLDER, HUMAN_QUEUE
from ..core.context import principal_entity
from ..identity.errors import AuthError, IdentityUnavailable
from ..coordination.metrics import ClaimMetrics
from ..record.decisions import iso
from ..record.model import ClaimEvent
from ..store import StoreError
from ..store.claims import Claim
from .auth import bearer, control_auth, foreign_origin, problem
from .models import InputModel, read_body, read_query
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


class ResourceRef(InputModel):
    type: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(::[A-Za-z_][A-Za-z0-9_]*)*$",
                      description="The Cedar entity type, as the connector's routes name it (e.g. Incident).")
    id: str = Field(min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f\x7f]+$",
                    description="The resource id (e.g. the incident's sys_id).")

    @property
    def uid(self) -> str:
        # the same spelling as the request path's resource uid (core/model.py Classification)
        return f"{self.type}::{json.dumps(self.id, ensure_ascii=False)}"


class ClaimAcquireRequest(InputModel):
    """Take (or renew) a claim on a resource of a connector, as a claim-bearing route would."""

    connector: str = Field(min_length=1, max_length=256)
    resource: ResourceRef
    holder: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$",
                               description="Operators: the agent that holds the claim. Agents: omit (or "
                                           "their own id).")
    groups: list[str] = Field(default_factory=list, max_length=64,
                              description="Operators: the holder's groups (agents: taken from their token).")
    mode: Literal["exclusive", "shared"] | None = Field(None, description="Default: the route's.")
    ttl_seconds: int | None = Field(None, ge=1, le=7 * 24 * 3600,
                                    description="Default: the route's ttl_seconds; agents may not exceed it.")
    reason: str | None = Field(None, max_length=1000)


class ClaimReleaseRequest(InputModel):
    """Why (optional; recorded with the `released` claim event)."""

    reason: str | None = Field(None, max_length=1000)


class ClaimAcquired(BaseModel):
    model_config = ConfigDict(frozen=True)
    claim: ClaimOut
    renewed: bool = Field(description="The holder already held it: only the expiry moved.")
    acquired_by: str


class ClaimTransferRequest(InputModel):
    """Who takes the claim over: an agent id, with the groups it should be listed with."""

    to: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$",
                    description="The agent that holds the claim after the transfer.")
    groups: list[str] = Field(default_factory=list, max_length=64, description="The new holder's groups.")
    reason: str | None = Field(None, max_length=1000)


class ClaimTransfer(BaseModel):
    model_config = ConfigDict(frozen=True)
    transferred: ClaimOut = Field(description="The claim as it was (now ended).")
    claim: ClaimOut = Field(description="The new holder's claim: a new id and tenure, the fence bumped.")
    transferred_by: str


class InboxItem(BaseModel):
    """A resource handed off to a human group (docs/coordination.md, "Handoffs"): waiting in
    the group's queue (`taken_by` null), or taken by a person."""

    model_config = ConfigDict(frozen=True)
    claim: ClaimOut
    group: str
    taken_by: str | None


class Inbox(BaseModel):
    model_config = ConfigDict(frozen=True)
    items: list[InboxItem]


def inbox_item(c: Claim) -> InboxItem | None:
    if c.holder.startswith(HUMAN_QUEUE):
        return InboxItem(claim=ClaimOut.of(c), group=c.holder[len(HUMAN_QUEUE):], taken_by=None)
    if c.holder.startswith(HUMAN_HOLDER):
        group = c.holder_groups[0] if c.holder_groups else ""
        return InboxItem(claim=ClaimOut.of(c), group=group, taken_by=c.holder[len(HUMAN_HOLDER):])
    return None


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


def claim_spec_for(manifests: Any, connector: str, resource_type: str) -> ClaimSpec | None:
    """The claim declaration of `connector`'s routes on `resource_type`: an `acquire: api`
    route's first (that is what the API is for), else any claim-bearing route's."""
    conn = next((c for c in manifests if c.name == connector), None)
    if conn is None:
        return None
    specs = [r.claim for r in conn.routes if r.claim is not None and r.resource is not None
             and r.resource.type == resource_type]
    return next((s for s in specs if s.acquire == "api"), specs[0] if specs else None)


def add_claim_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    auth = control_auth(app, runtime.config)
    principal_mapping = runtime.config.identity_settings().principal

    async def agent_caller(request: web.Request) -> Any:
        """The agent whose token this is (agent audience), or None when it is not an agent token."""
        token = bearer(request)
        if token is None:
            return None
        try:
            return await runtime.verifier.verify(token)
        except (AuthError, IdentityUnavailable):
            return None

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

    async def acquire_claim(request: web.Request) -> web.Response:
        agent = await agent_caller(request)
        if agent is None:
            who = await auth.operator(request)
            if isinstance(who, web.Response):
                return who
            by = who.id
        body = await read_body(request, ClaimAcquireRequest,
                               hint='{"connector": "ticketing", "resource": {"type": "Incident", "id": "..."}}',
                               cross_origin="claims are taken from the API or CLI")
        if isinstance(body, web.Response):
            return body
        spec = claim_spec_for(runtime.path.stage("classify").classifier.connectors,  # type: ignore[attr-defined]
                              body.connector, body.resource.type)
        if spec is None:
            return problem(422, "Not claimable", f"connector {body.connector!r} declares no claim-bearing route on "
                           f"resource type {body.resource.type!r}; claims are declared per route (claim:) in the "
                           "connector manifest")
        ttl = body.ttl_seconds if body.ttl_seconds is not None else spec.ttl_seconds
        if agent is not None:
            if body.holder not in (None, agent.agent_id):
                return problem(403, "Agents claim for themselves", f"an agent token takes claims for its own agent "
                               f"({agent.agent_id!r}); an operator token can name another holder")
            if ttl > spec.ttl_seconds:
                return problem(400, "TTL too long", f"the route declares ttl_seconds {spec.ttl_seconds}; an agent "
                               "may not hold a claim longer")
            gov = runtime.governance
            if gov is not None and gov.suspension_for(agent.agent_id, body.connector, "") is not None:
                return problem(403, "Agent suspended", f"{agent.agent_id!r} (or connector {body.connector!r}) is "
                               "suspended: it cannot take claims")
            holder, by = agent.agent_id, agent.agent_id
            groups = [p["id"] for p in principal_entity(agent, principal_mapping)["parents"]]
        else:
            if body.holder is None:
                return problem(400, "Holder required", "an operator names the agent that holds the claim: "
                               '{"holder": "agent-id"}')
            holder, groups = body.holder, list(body.groups)
        if holder.startswith(RESERVED_HOLDERS):
            return problem(400, "Holder reserved", f"holders starting {' or '.join(RESERVED_HOLDERS)} are people "
                           "(handoff queues); name an agent")
        now = time.time()
        resource = body.resource.uid
        try:
            outcome = await runtime.store.acquire_claim(
                connector=body.connector, resource=resource, agent=holder, groups=groups,
                mode=body.mode or spec.mode, ttl=float(ttl), now=now)
        except StoreError as e:
            return unavailable(e)
        c = outcome.claim
        if not outcome.acquired:
            runtime.recorder.write(conflict_event(c, holder, "", now))
            retry = max(1, int(c.expires_at - now + 0.999))
            return problem(409, "Conflict: the resource is claimed by another agent",
                           f"{resource} is claimed ({c.mode}) by {c.holder!r} since {iso(c.since)} until "
                           f"{iso(c.expires_at)}; retry after {retry} seconds or ask an operator to release "
                           f"claim {c.id}", {"Retry-After": str(retry)},
                           {"claim": ClaimOut.of(c).model_dump(mode="json")})
        if not outcome.renewed:
            log.info("claim %s on %s taken for %s by %s through the API", c.id, resource, holder, by)
            runtime.recorder.write(ClaimEvent.of("acquired", c, now, fence=c.fence, by=by, reason=body.reason))
        out = ClaimAcquired(claim=ClaimOut.of(c), renewed=outcome.renewed, acquired_by=by)
        return web.json_response(out.model_dump(mode="json"), status=200 if outcome.renewed else 201)

    async def release_claim(request: web.Request) -> web.Response:
        if foreign_origin(request):
            return problem(403, "Cross-origin request refused", "claims are released from the console, CLI or API")
        agent = await agent_caller(request)
        if agent is None:
            who = await auth.operator(request)
            if isinstance(who, web.Response):
                return who
            by = who.id
        else:
            by = agent.agent_id
        body = await read_body(request, ClaimReleaseRequest, hint='{"reason": "..."} (or no body)',
                               cross_origin="claims are released from the console, CLI or API", optional=True)
        if isinstance(body, web.Response):
            return body
        claim_id = request.match_info["id"]
        if not _ID_RE.fullmatch(claim_id):
            return problem(404, "No such claim", "claim ids look like clm_...")
        try:
            if agent is not None:
                # an agent lets go of its own claims only (others' look absent: no probing)
                held = await runtime.store.list_claims(time.time())
                if not any(c.id == claim_id and c.holder == agent.agent_id for c in held):
                    return problem(404, "No such claim", f"no live claim {claim_id!r} held by {agent.agent_id!r}")
            released = await runtime.store.release_claim(claim_id)
        except StoreError as e:
            return unavailable(e)
        if released is None:
            return problem(404, "No such claim", f"no claim {claim_id!r} (released already, or never held)")
        log.info("claim %s on %s (holder %s) released by %s %s", released.id, released.resource,
                 released.holder, "its holder" if agent is not None else "operator", by)
        runtime.recorder.write(ClaimEvent.of("released", released, time.time(), by=by, reason=body.reason))
        out = ClaimRelease(released=ClaimOut.of(released), released_by=by)
        return web.json_response(out.model_dump(mode="json"))

    async def transfer_claim(request: web.Request) -> web.Response:
        who = await auth.operator(request)
        if isinstance(who, web.Response):
            return who
        body = await read_body(request, ClaimTransferRequest, hint='{"to": "agent-id"}',
                               cross_origin="claims are transferred from the console, CLI or API")
        if isinstance(body, web.Response):
            return body
        claim_id = request.match_info["id"]
        if not _ID_RE.fullmatch(claim_id):
            return problem(404, "No such claim", "claim ids look like clm_...")
        now = time.time()
        try:
            moved = await runtime.store.transfer_claim(claim_id, to=body.to, groups=list(body.groups), now=now)
        except StoreError as e:
            return unavailable(e)
        if moved is None:
            return problem(404, "No such claim", f"no live claim {claim_id!r} (released, expired or never held)")
        old, new = moved
        if new is not old:
            log.info("claim %s on %s transferred from %s to %s by operator %s", old.id, old.resource, old.holder,
                     new.holder, who.id)
            runtime.recorder.write(ClaimEvent.of("transferred", old, now, to=new.holder, by=who.id,
                                                 new_claim_id=new.id, fence=new.fence, reason=body.reason))
        out = ClaimTransfer(transferred=ClaimOut.of(old), claim=ClaimOut.of(new), transferred_by=who.id)
        return web.json_response(out.model_dump(mode="json"))

    def visible(who: Any, item: InboxItem) -> bool:
        return auth.admin_group in who.groups or item.group in who.groups

    async def inbox(request: web.Request) -> web.Response:
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        try:
            claims = await runtime.store.list_claims(time.time())
        except StoreError as e:
            return unavailable(e)
        items = [i for i in (inbox_item(c) for c in claims) if i is not None and visible(who, i)]
        return web.json_response(Inbox(items=items).model_dump(mode="json"))

    async def inbox_claim(request: web.Request, who: Any, now: float) -> Claim | web.Response:
        """The inbox item this person may act on (404 when it is none of theirs)."""
        claim_id = request.match_info["id"]
        if not _ID_RE.fullmatch(claim_id):
            return problem(404, "No such item", "claim ids look like clm_...")
        # (the inbox is small: a scan of live claims, not another store query)
        claims = await runtime.store.list_claims(now)
        found = next((c for c in claims if c.id == claim_id), None)
        item = inbox_item(found) if found is not None else None
        if found is None or item is None or not visible(who, item):
            return problem(404, "No such item", f"no inbox item {claim_id!r} in your groups")
        return found

    async def take(request: web.Request) -> web.Response:
        if foreign_origin(request):
            return problem(403, "Cross-origin request refused", "inbox items are taken from the console, CLI or API")
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        now = time.time()
        try:
            found = await inbox_claim(request, who, now)
            if isinstance(found, web.Response):
                return found
            if not found.holder.startswith(HUMAN_QUEUE):
                return problem(409, "Already taken", f"{found.holder[len(HUMAN_HOLDER):]} took this item")
            group = found.holder[len(HUMAN_QUEUE):]
            moved = await runtime.store.transfer_claim(found.id, to=HUMAN_HOLDER + who.id, groups=[group], now=now)
        except StoreError as e:
            return unavailable(e)
        if moved is None:
            return problem(404, "No such item", "the item expired or was released meanwhile")
        old, new = moved
        runtime.recorder.write(ClaimEvent.of("taken", old, now, to=new.holder, by=who.id, new_claim_id=new.id,
                                             fence=new.fence))
        out = ClaimTransfer(transferred=ClaimOut.of(old), claim=ClaimOut.of(new), transferred_by=who.id)
        return web.json_response(out.model_dump(mode="json"))

    async def give_back(request: web.Request) -> web.Response:
        if foreign_origin(request):
            return problem(403, "Cross-origin request refused", "inbox items are released from the console, CLI or API")
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        now = time.time()
        try:
            found = await inbox_claim(request, who, now)
            if isinstance(found, web.Response):
                return found
            released = await runtime.store.release_claim(found.id)
        except StoreError as e:
            return unavailable(e)
        if released is None:
            return problem(404, "No such item", "the item expired or was released meanwhile")
        runtime.recorder.write(ClaimEvent.of("released", released, now, by=who.id))
        return web.json_response(ClaimRelease(released=ClaimOut.of(released), released_by=who.id).model_dump(mode="json"))

    app.router.add_get("/v1/claims", list_claims)
    app.router.add_post("/v1/claims", acquire_claim)
    app.router.add_get("/v1/claims/inbox", inbox)
    app.router.add_post("/v1/claims/{id}/take", take)
    app.router.add_post("/v1/claims/{id}/give-back", give_back)
    app.router.add_post("/v1/claims/{id}/transfer", transfer_claim)
    app.router.add_post("/v1/claims/{id}/release", release_claim)

    metrics = _claim_metrics(runtime)

    async def refresh_gauge() -> None:
        rounds = 0
        while True:
            try:
                now = time.time()
                if rounds % SWEEP_EVERY == 0:
                    # (each replica deletes what it finds; each expired claim is recorded once)
                    for gone in await runtime.store.expire_claims(now):
                        runtime.recorder.write(ClaimEvent.of("expired", gone, now))
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
