"""Control API routes for the agent registry and the kill switch.

Operators authenticate like approvers (a Bearer JWT for the approver audience)
and must belong to `control.admin_group`. Every suspension and resumption is
written to the decision record (`type: "suspension"` lines).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..policy.revisions import record_revision, restore_files
from ..record.decisions import iso
from ..store import AgentRecord, StoreError, Suspension
from .auth import control_auth, foreign_origin, problem

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")
_TARGET_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")


def suspension_json(s: Suspension) -> dict[str, Any]:
    return {"kind": s.kind, "target": s.target, "since": iso(s.since), "by": s.by, "reason": s.reason}


def agent_json(a: AgentRecord, suspended: Suspension | None) -> dict[str, Any]:
    return {
        "id": a.id,
        "owner": a.owner,
        "team": a.team,
        "description": a.description,
        "registered": a.registered,
        "first_seen": iso(a.first_seen) if a.first_seen else None,
        "last_seen": iso(a.last_seen) if a.last_seen else None,
        "requests": a.requests,
        "allowed": a.allowed,
        "denied": a.denied,
        "status": "suspended" if suspended else "active",
        "suspension": suspension_json(suspended) if suspended else None,
    }


def add_governance_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    cfg = runtime.config
    gov = runtime.governance
    assert gov is not None
    auth = control_auth(app, cfg)

    async def operator(request: web.Request) -> str | web.Response:
        who = await auth.operator(request)
        return who if isinstance(who, web.Response) else who.id

    async def json_body(request: web.Request) -> dict | web.Response:
        if foreign_origin(request):
            return problem(403, "Cross-origin request refused", "the kill switch is operated from the console, CLI or API")
        if request.content_type != "application/json":
            return problem(415, "JSON required", "send a JSON object as application/json")
        try:
            body = await request.json()
        except ValueError:
            return problem(400, "Bad JSON", "the body is not valid JSON")
        if not isinstance(body, dict):
            return problem(400, "Bad JSON", "the body must be a JSON object")
        return body

    def record(event: str, s: Suspension | None, kind: str, target: str, by: str, reason: str) -> None:
        runtime.recorder.write({
            "type": "suspension", "event": event, "time": iso(time.time()), "kind": kind, "target": target,
            "by": by, "reason": reason,
        })

    def unavailable(e: Exception) -> web.Response:
        log.error("store error: %s", e)
        return problem(503, "Store unavailable", "the state store cannot be reached; try again")

    async def do_suspend(kind: str, target: str, who: str, body: dict) -> web.Response:
        reason = body.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            return problem(400, "Reason required", 'a reason is mandatory: {"reason": "..."}')
        if not _TARGET_RE.match(target):
            return problem(400, "Bad target", "the target must be 1-256 printable characters")
        try:
            s = await gov.suspend(kind, target, who, reason.strip()[:2000])
        except StoreError as e:
            return unavailable(e)
        record("suspended", s, kind, target, who, s.reason)
        return web.json_response(suspension_json(s), status=201)

    async def do_resume(kind: str, target: str, who: str, reason: str) -> web.Response:
        try:
            removed = await gov.resume(kind, target, who)
        except StoreError as e:
            return unavailable(e)
        if not removed:
            return problem(404, "Not suspended", f"{kind} {target!r} is not suspended")
        record("resumed", None, kind, target, who, reason)
        return web.json_response({"kind": kind, "target": target, "resumed_by": who})

    async def list_agents(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        try:
            agents = await runtime.store.list_agents()
            listed = {a.id for a in agents}
            # a suspended agent that has not been seen or registered yet still shows up
            for s in gov.suspensions():
                if s.kind == "agent" and s.target not in listed:
                    agents.append(AgentRecord(id=s.target))
            # (the suspension lookups refuse while the store cannot be trusted: 503, not a guess)
            return web.json_response({"agents": [agent_json(a, gov.agent_suspension(a.id)) for a in agents]})
        except StoreError as e:
            return unavailable(e)

    async def show_agent(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        try:
            a = await runtime.store.get_agent(request.match_info["id"])
            if a is None:
                return problem(404, "No such agent", f"no agent {request.match_info['id']!r} has been seen or registered")
            return web.json_response(agent_json(a, gov.agent_suspension(a.id)))
        except StoreError as e:
            return unavailable(e)

    async def register_agent(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        aid = body.get("id")
        if not isinstance(aid, str) or not _TARGET_RE.match(aid):
            return problem(400, "Bad agent id", "id must be 1-256 printable characters")
        fields = {k: body.get(k, "") for k in ("owner", "team", "description")}
        if not all(isinstance(v, str) and len(v) <= 1000 for v in fields.values()):
            return problem(400, "Bad field", "owner, team and description are strings (at most 1000 characters)")
        try:
            await runtime.store.upsert_agent(AgentRecord(id=aid, **fields))
            a = await runtime.store.get_agent(aid)
            return web.json_response(agent_json(a, gov.agent_suspension(aid)), status=201)
        except StoreError as e:
            return unavailable(e)

    async def suspend_agent(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        return await do_suspend("agent", request.match_info["id"], who, body)

    async def resume_agent(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body: dict | web.Response = {}
        if request.can_read_body:  # the reason is optional: an empty body is fine
            body = await json_body(request)
            if isinstance(body, web.Response):
                return body
        return await do_resume("agent", request.match_info["id"], who, str(body.get("reason") or ""))

    async def list_suspensions(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        return web.json_response({"suspensions": [suspension_json(s) for s in gov.suspensions()]})

    async def create_suspension(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        kind, target = body.get("kind"), body.get("target")
        if kind not in ("agent", "connector", "action") or not isinstance(target, str):
            return problem(400, "Bad suspension", 'send {"kind": "agent|connector|action", "target": "...", "reason": "..."}')
        return await do_suspend(kind, target, who, body)

    async def delete_suspension(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        kind = request.match_info["kind"]
        if kind not in ("agent", "connector", "action"):
            return problem(404, "No such kind", "kind is agent, connector or action")
        return await do_resume(kind, request.match_info["target"], who, request.query.get("reason", ""))

    async def list_revisions(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        try:
            revisions = await runtime.store.list_revisions()
        except StoreError as e:
            return unavailable(e)
        active = runtime.policies.bundle.revision
        return web.json_response({
            "active_revision": active,
            "revisions": [
                {"revision": r.revision, "loaded_at": iso(r.loaded_at), "active": r.revision == active,
                 "files": sorted(r.files)}
                for r in revisions
            ],
        })

    async def rollback(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        revision, reason = body.get("revision"), body.get("reason")
        if not isinstance(revision, str) or not revision:
            return problem(400, "Revision required", 'send {"revision": "...", "reason": "..."}')
        if not isinstance(reason, str) or not reason.strip():
            return problem(400, "Reason required", "a reason is mandatory for a rollback")
        try:
            stored = await runtime.store.get_revision(revision)
        except StoreError as e:
            return unavailable(e)
        if stored is None:
            return problem(404, "No such revision", f"revision {revision} is not in the kept history")
        async with runtime.policy_lock:
            before = runtime.policies.bundle.revision
            try:
                changed = await asyncio.to_thread(restore_files, runtime.policies.source, stored.files)
            except (OSError, ValueError) as e:
                return problem(409, "Cannot write the policy directory", f"{e}; nothing was reloaded")
            ok = await asyncio.to_thread(runtime.policies.reload)
            now = runtime.policies.bundle.revision
            if ok and now != before:
                await record_revision(runtime.store, runtime.policies.bundle)  # whatever is enforced is in the history
        if not ok or now != revision:
            detail = "; ".join(runtime.policies.status.last_error) if not ok else (
                f"the restored files load as revision {now}, not {revision}: the schema generated from the "
                "connectors has changed since that revision")
            return problem(409, "Rollback did not take effect", detail)
        runtime.recorder.write({"type": "policy", "event": "rollback", "time": iso(time.time()), "from_revision": before,
                                "to_revision": now, "by": who, "reason": reason.strip(), "files_changed": changed})
        log.warning("policy rollback %s -> %s by %s: %s", before, now, who, reason.strip())
        return web.json_response({"active_revision": now, "previous_revision": before, "files_changed": changed})

    app.router.add_get("/v1/policies/revisions", list_revisions)
    app.router.add_post("/v1/policies/rollback", rollback)
    app.router.add_get("/v1/agents", list_agents)
    app.router.add_post("/v1/agents", register_agent)
    app.router.add_get("/v1/agents/{id}", show_agent)
    app.router.add_post("/v1/agents/{id}/suspend", suspend_agent)
    app.router.add_post("/v1/agents/{id}/resume", resume_agent)
    app.router.add_get("/v1/suspensions", list_suspensions)
    app.router.add_post("/v1/suspensions", create_suspension)
    app.router.add_delete("/v1/suspensions/{kind}/{target}", delete_suspension)
