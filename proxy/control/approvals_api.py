"""Control API routes for approvals (in the route table of proxy/control/openapi.py).

Approvers authenticate with a Bearer JWT for the approver audience
(`approvals.approver_audience`), from the same trusted issuers as agents; the
groups they may approve for come from `approvals.approver_groups_claim`. An
agent checks on its own held request at the status URL with its agent token.

CSRF: credentials travel only in the Authorization header (never cookies), so
a browser never attaches them to a cross-site request; state-changing calls
also require a JSON body and refuse a foreign Origin.

Inputs are read through the models of control/models.py, answers built with
those of control/models_responses.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..approvals.service import ApprovalError, Approver
from ..identity.errors import AuthError, IdentityUnavailable
from ..store import Approval, StoreError
from .approval_watch import ApprovalWatch
from .auth import bearer, control_auth, problem
from .models import ApprovalListQuery, DecisionRequest, read_body, read_query
from .models_responses import ApprovalList, ApprovalStatus, ApprovalSummary, WhoAmI, reply
from .models_responses import Approval as ApprovalOut

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")

WATCH_SECONDS = 1.0  # how often open event streams read other replicas' approval changes from the store



def approval_json(a: Approval, full: bool = True) -> dict[str, Any]:
    """An approval as the API shows it: in full (with the request preview) or as listed."""
    return (ApprovalOut if full else ApprovalSummary).of(a).model_dump(mode="json", exclude_unset=True)


def add_approval_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    cfg = runtime.config
    service = runtime.approvals
    assert service is not None, "approval routes are added only when approvals are enabled"
    auth = control_auth(app, cfg)
    # With a store shared by replicas, the event streams also announce the changes other
    # replicas make (control/approval_watch.py: read from the store while a stream is open).
    watch: ApprovalWatch | None = None
    if service.poll_seconds is not None:
        watch = ApprovalWatch(service.store, WATCH_SECONDS)
        service.listeners.append(watch.local)

    async def approver_of(request: web.Request) -> Approver | web.Response:
        return await auth.person(request, "Approver", "proctor-approvals")

    def unavailable(e: Exception) -> web.Response:
        log.error("approval store error: %s", e)
        return problem(503, "Approval store unavailable", "the approval store cannot be reached; try again")

    async def whoami(request: web.Request) -> web.Response:
        who = await approver_of(request)
        if isinstance(who, web.Response):
            return who
        return reply(WhoAmI(approver=who.id, groups=sorted(who.groups)))

    async def list_(request: web.Request) -> web.Response:
        who = await approver_of(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, ApprovalListQuery)
        if isinstance(q, web.Response):
            return q
        try:
            items = await service.store.list_approvals(
                states=q.state, agent_id=q.agent or None, action=q.action or None, limit=q.limit, offset=q.offset
            )
            total = await service.store.count_approvals(states=q.state)
        except StoreError as e:
            return unavailable(e)
        return reply(ApprovalList(approvals=[ApprovalSummary.of(a) for a in items], total=total,
                                  limit=q.limit, offset=q.offset))

    async def show(request: web.Request) -> web.Response:
        who = await approver_of(request)
        if isinstance(who, web.Response):
            return who
        try:
            a = await service.store.get_approval(request.match_info["id"])
        except StoreError as e:
            return unavailable(e)
        if a is None:
            return problem(404, "No such approval", f"no approval {request.match_info['id']}")
        may_decide = a.state == "pending" and who.id != a.agent_id and bool(service.eligible_groups(a, who)) \
            and not any(v.approver == who.id for v in a.votes)
        return reply(ApprovalOut.of(a, you_may_decide=may_decide))

    def decide(decision: str):
        async def handler(request: web.Request) -> web.Response:
            who = await approver_of(request)
            if isinstance(who, web.Response):
                return who
            body = await read_body(
                request, DecisionRequest, hint='{"reason": "..."}',
                cross_origin="approvals are decided from the console or the API, not from other sites")
            if isinstance(body, web.Response):
                return body
            try:
                a = await service.decide(request.match_info["id"], who, decision, body.reason)
            except ApprovalError as e:
                return problem(e.status, "Cannot " + decision, str(e))
            except StoreError as e:
                return unavailable(e)
            return reply(ApprovalOut.of(a))

        return handler

    async def status(request: web.Request) -> web.Response:
        """For the held agent (its agent token) or an approver: the approval's state."""
        token = bearer(request) or bearer(request, "Proxy-Authorization")
        if token is None:
            return problem(401, "Authentication required", "send your agent token as Authorization: Bearer",
                            {"WWW-Authenticate": 'Bearer realm="proctor"'})
        agent_id = None
        try:
            agent_id = (await runtime.verifier.verify(token)).agent_id
        except (AuthError, IdentityUnavailable):
            who = await approver_of(request)
            if isinstance(who, web.Response):
                return who
        try:
            a = await service.store.get_approval(request.match_info["id"])
        except StoreError as e:
            return unavailable(e)
        if a is None or (agent_id is not None and a.agent_id != agent_id):
            return problem(404, "No such approval", "no approval with that id for you")
        headers = {"Retry-After": str(cfg.approvals.retry_after_seconds)} if a.state == "pending" else None
        return reply(ApprovalStatus.of(a), headers=headers)

    async def events(request: web.Request) -> web.StreamResponse:
        """Server-sent events: one `approval` event per state change (console live updates)."""
        who = await approver_of(request)
        if isinstance(who, web.Response):
            return who
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue(maxsize=1000)

        def listener(event: str, a: Approval) -> None:
            try:
                queue.put_nowait({"event": event, "approval": approval_json(a, full=False)})
            except asyncio.QueueFull:
                pass

        service.listeners.append(listener)
        if watch is not None:
            watch.subscribe(listener)
        streams[id(request)] = request
        try:
            await resp.write(b": connected\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), 15)
                    data = json.dumps(item, separators=(",", ":"))
                    await resp.write(f"event: approval\ndata: {data}\n\n".encode())
                except asyncio.TimeoutError:
                    await resp.write(b": keep-alive\n\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            service.listeners.remove(listener)
            if watch is not None:
                watch.unsubscribe(listener)
            streams.pop(id(request), None)
        return resp

    streams: dict[int, web.Request] = {}  # (aiohttp requests are not hashable)

    async def close_streams(_: web.Application) -> None:
        # open event streams would otherwise hold shutdown until their next keep-alive
        for request in list(streams.values()):
            if request.transport is not None:
                request.transport.close()
        if watch is not None:
            watch.stop()

    app.on_shutdown.append(close_streams)
    app.router.add_get("/v1/whoami", whoami)
    app.router.add_get("/v1/approvals", list_)
    app.router.add_get("/v1/approvals/events", events)
    app.router.add_get("/v1/approvals/{id}", show)
    app.router.add_get("/v1/approvals/{id}/status", status)
    app.router.add_post("/v1/approvals/{id}/approve", decide("approve"))
    app.router.add_post("/v1/approvals/{id}/deny", decide("deny"))

