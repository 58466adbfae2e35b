"""Control API routes for approvals (described in proxy/control/openapi.py).

Approvers authenticate with a Bearer JWT for the approver audience
(`approvals.approver_audience`), from the same trusted issuers as agents; the
groups they may approve for come from `approvals.approver_groups_claim`. An
agent checks on its own held request at the status URL with its agent token.

CSRF: credentials travel only in the Authorization header (never cookies), so
a browser never attaches them to a cross-site request; state-changing calls
also require a JSON body and refuse a foreign Origin.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..approvals.service import ApprovalError, Approver
from ..identity.errors import AuthError, IdentityUnavailable
from ..record.decisions import iso
from ..store import APPROVAL_STATES, Approval, StoreError
from .auth import bearer, control_auth, foreign_origin, problem

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")



def approval_json(a: Approval, full: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": a.id,
        "state": a.state,
        "agent": a.agent_id,
        "action": a.action,
        "resource": f'{a.resource_type}::{json.dumps(a.resource_id, ensure_ascii=False)}',
        "connector": a.connector,
        "groups": a.groups,
        "mode": a.mode,
        "created_at": iso(a.created_at),
        "expires_at": iso(a.expires_at),
        "escalated": a.escalated,
        "decided_at": iso(a.decided_at) if a.decided_at else None,
        "decided_by": a.decided_by,
        "reason": a.reason,
        "forwarded_at": iso(a.forwarded_at) if a.forwarded_at else None,
        "decision_id": a.decision_id,
        "policies": a.derived.get("policies", []),
        "votes": [
            {"approver": v.approver, "groups": v.group.split(","), "decision": v.decision, "reason": v.reason, "at": iso(v.at)}
            for v in a.votes
        ],
        "method": a.request.get("method"),
        "url": a.request.get("url"),
    }
    if full:
        out["request"] = a.request
        out["derived"] = a.derived
    return out


def add_approval_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    cfg = runtime.config
    service = runtime.approvals
    auth = control_auth(app, cfg)

    async def approver_of(request: web.Request) -> Approver | web.Response:
        return await auth.person(request, "Approver", "proctor-approvals")

    def unavailable(e: Exception) -> web.Response:
        log.error("approval store error: %s", e)
        return problem(503, "Approval store unavailable", "the approval store cannot be reached; try again")

    async def whoami(request: web.Request) -> web.Response:
        who = await approver_of(request)
        if isinstance(who, web.Response):
            return who
        return web.json_response({"approver": who.id, "groups": sorted(who.groups)})

    async def list_(request: web.Request) -> web.Response:
        who = await approver_of(request)
        if isinstance(who, web.Response):
            return who
        q = request.query
        states = [s for s in q.get("state", "").split(",") if s] or None
        if states and not set(states) <= set(APPROVAL_STATES):
            return problem(400, "Bad filter", f"state must be among {sorted(APPROVAL_STATES)}")
        try:
            limit = min(max(int(q.get("limit", "100")), 1), 1000)
            offset = max(int(q.get("offset", "0")), 0)
        except ValueError:
            return problem(400, "Bad paging", "limit and offset are integers")
        try:
            items = await service.store.list_approvals(
                states=states, agent_id=q.get("agent") or None, action=q.get("action") or None, limit=limit, offset=offset
            )
            total = await service.store.count_approvals(states=states)
        except StoreError as e:
            return unavailable(e)
        return web.json_response({"approvals": [approval_json(a, full=False) for a in items], "total": total,
                                  "limit": limit, "offset": offset})

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
        body = approval_json(a)
        body["you_may_decide"] = a.state == "pending" and who.id != a.agent_id and bool(service.eligible_groups(a, who)) \
            and not any(v.approver == who.id for v in a.votes)
        return web.json_response(body)

    def decide(decision: str):
        async def handler(request: web.Request) -> web.Response:
            who = await approver_of(request)
            if isinstance(who, web.Response):
                return who
            if foreign_origin(request):
                return problem(403, "Cross-origin request refused", "approvals are decided from the console or the API, not from other sites")
            if request.content_type != "application/json":
                return problem(415, "JSON required", 'send {"reason": "..."} as application/json')
            try:
                body = await request.json()
            except ValueError:
                return problem(400, "Bad JSON", "the body is not valid JSON")
            reason = body.get("reason") if isinstance(body, dict) else None
            if not isinstance(reason, str):
                return problem(400, "Reason required", 'a reason is mandatory: {"reason": "..."}')
            try:
                a = await service.decide(request.match_info["id"], who, decision, reason)
            except ApprovalError as e:
                return problem(e.status, "Cannot " + decision, str(e))
            except StoreError as e:
                return unavailable(e)
            return web.json_response(approval_json(a))

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
        body = {
            "id": a.id,
            "state": a.state,
            "action": a.action,
            "resource": f'{a.resource_type}::{json.dumps(a.resource_id, ensure_ascii=False)}',
            "expires_at": iso(a.expires_at),
            "decided_by": a.decided_by,
            "reason": a.reason,
        }
        headers = {"Retry-After": str(cfg.approvals.retry_after_seconds)} if a.state == "pending" else None
        return web.json_response(body, headers=headers)

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
            streams.pop(id(request), None)
        return resp

    streams: dict[int, web.Request] = {}  # (aiohttp requests are not hashable)

    async def close_streams(_: web.Application) -> None:
        # open event streams would otherwise hold shutdown until their next keep-alive
        for request in list(streams.values()):
            if request.transport is not None:
                request.transport.close()

    app.on_shutdown.append(close_streams)
    app.router.add_get("/v1/whoami", whoami)
    app.router.add_get("/v1/approvals", list_)
    app.router.add_get("/v1/approvals/events", events)
    app.router.add_get("/v1/approvals/{id}", show)
    app.router.add_get("/v1/approvals/{id}/status", status)
    app.router.add_post("/v1/approvals/{id}/approve", decide("approve"))
    app.router.add_post("/v1/approvals/{id}/deny", decide("deny"))

