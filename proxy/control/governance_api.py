"""Control API routes for the agent registry and the kill switch.

Operators authenticate like approvers (a Bearer JWT for the approver audience)
and must belong to `control.admin_group`. Every suspension and resumption is
written to the decision record (`type: "suspension"` lines).

Inputs are read through the models of control/models.py (the route table in
control/openapi.py documents them), answers built with models_responses.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Literal, TypeVar

from aiohttp import web

from ..policy.fleet import MAX_PUSH_BYTES, PushRejected
from ..policy.revisions import record_revision, restore_files
from ..record.decisions import iso
from ..record.model import PolicyEvent, SuspensionEvent
from ..store import AgentRecord, StoreError, Suspension
from .auth import control_auth, problem
from .models import (
    TARGET_PATTERN,
    AgentRegistration,
    InputModel,
    ResumeQuery,
    ResumeRequest,
    PushRequest,
    RollbackRequest,
    SuspendAgentRequest,
    SuspensionRequest,
    read_body,
    read_query,
)
from .models_responses import (
    Agent,
    AgentList,
    ResumeResult,
    Revision,
    RevisionList,
    PushResult,
    RollbackResult,
    SuspensionList,
    reply,
)
from .models_responses import Suspension as SuspensionOut

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")
_TARGET_RE = re.compile(TARGET_PATTERN)  # a target from the URL path (agent id), as bodies are checked
B = TypeVar("B", bound=InputModel)
CROSS_ORIGIN = "the kill switch is operated from the console, CLI or API"
MAX_PUSH_BODY = 2 * MAX_PUSH_BYTES + 64 * 1024  # (JSON escaping can double the files' size)


def add_governance_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    cfg = runtime.config
    gov = runtime.governance
    assert gov is not None
    auth = control_auth(app, cfg)

    async def operator(request: web.Request) -> str | web.Response:
        who = await auth.operator(request)
        return who if isinstance(who, web.Response) else who.id

    async def json_body(request: web.Request, model: type[B], optional: bool = False) -> B | web.Response:
        return await read_body(request, model, cross_origin=CROSS_ORIGIN, hint="a JSON object", optional=optional)

    def record(event: Literal["suspended", "resumed"], s: Suspension | None, kind: str, target: str, by: str,
               reason: str | None) -> None:
        runtime.recorder.write(SuspensionEvent.of(event, kind, target, by, reason, time.time()))

    def unavailable(e: Exception) -> web.Response:
        log.error("store error: %s", e)
        return problem(503, "Store unavailable", "the state store cannot be reached; try again")

    async def announce_suspensions() -> None:
        """Every other replica re-reads the kill switch now (its poll is the fallback)."""
        if runtime.events is not None:
            await runtime.events.publish("suspensions")

    async def do_suspend(kind: str, target: str, who: str, reason: str) -> web.Response:
        if not _TARGET_RE.fullmatch(target):
            return problem(400, "Bad target", "the target must be 1-256 printable characters")
        try:
            s = await gov.suspend(kind, target, who, reason)
        except StoreError as e:
            return unavailable(e)
        record("suspended", s, kind, target, who, s.reason)
        await announce_suspensions()
        return reply(SuspensionOut.of(s), status=201)

    async def do_resume(kind: str, target: str, who: str, reason: str) -> web.Response:
        try:
            removed = await gov.resume(kind, target, who)
        except StoreError as e:
            return unavailable(e)
        if not removed:
            return problem(404, "Not suspended", f"{kind} {target!r} is not suspended")
        record("resumed", None, kind, target, who, reason)
        await announce_suspensions()
        return reply(ResumeResult(kind=kind, target=target, resumed_by=who))  # type: ignore[arg-type]

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
            return reply(AgentList(agents=[Agent.of(a, gov.agent_suspension(a.id)) for a in agents]))
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
            return reply(Agent.of(a, gov.agent_suspension(a.id)))
        except StoreError as e:
            return unavailable(e)

    async def register_agent(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await json_body(request, AgentRegistration)
        if isinstance(body, web.Response):
            return body
        try:
            await runtime.store.upsert_agent(
                AgentRecord(id=body.id, owner=body.owner, team=body.team, description=body.description))
            a = await runtime.store.get_agent(body.id)
            if a is None:  # written, then gone: the store is not answering as it should
                raise StoreError(f"agent {body.id!r} not found right after it was registered")
            return reply(Agent.of(a, gov.agent_suspension(body.id)), status=201)
        except StoreError as e:
            return unavailable(e)

    async def suspend_agent(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await json_body(request, SuspendAgentRequest)
        if isinstance(body, web.Response):
            return body
        return await do_suspend("agent", request.match_info["id"], who, body.reason)

    async def resume_agent(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await json_body(request, ResumeRequest, optional=True)  # the reason is optional: no body is fine
        if isinstance(body, web.Response):
            return body
        return await do_resume("agent", request.match_info["id"], who, body.reason)

    async def list_suspensions(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        return reply(SuspensionList(suspensions=[SuspensionOut.of(s) for s in gov.suspensions()]))

    async def create_suspension(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await json_body(request, SuspensionRequest)
        if isinstance(body, web.Response):
            return body
        return await do_suspend(body.kind, body.target, who, body.reason)

    async def delete_suspension(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        kind = request.match_info["kind"]
        if kind not in ("agent", "connector", "action"):
            return problem(404, "No such kind", "kind is agent, connector or action")
        q = read_query(request, ResumeQuery)
        if isinstance(q, web.Response):
            return q
        return await do_resume(kind, request.match_info["target"], who, q.reason)

    async def list_revisions(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        try:
            revisions = await runtime.store.list_revisions()
        except StoreError as e:
            return unavailable(e)
        active = runtime.policies.bundle.revision
        return reply(RevisionList(active_revision=active, revisions=[
            Revision(revision=r.revision, loaded_at=iso(r.loaded_at), active=r.revision == active, files=sorted(r.files))
            for r in revisions
        ]))

    async def push(request: web.Request) -> web.Response:
        """A policy set for every replica: validated here, stored as the fleet's active revision."""
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await big_json_body(request, PushRequest)
        if isinstance(body, web.Response):
            return body
        fleet = runtime.fleet
        if fleet is None:
            return problem(503, "Not ready", "the state store is not open yet; retry")
        try:
            before = await runtime.store.active_revision()
            revision = await fleet.push(body.files)
        except PushRejected as e:
            return problem(422, "Policy set rejected", "the pushed files do not load on this replica; nothing was "
                           "changed: " + "; ".join(e.problems[:50]), extra={"problems": e.problems[:200]})
        except StoreError as e:
            return unavailable(e)
        runtime.recorder.write(PolicyEvent.push(before or "", revision, who, body.reason, sorted(body.files),
                                                time.time()))
        log.warning("policy push %s -> %s by %s: %s", before, revision, who, body.reason)
        return reply(PushResult(active_revision=revision, previous_revision=before,
                                enforced_here=runtime.policies.bundle.revision))

    async def big_json_body(request: web.Request, model: type[B]) -> B | web.Response:
        """As json_body, for bodies larger than the control API's usual 64 KiB (a policy set)."""
        if request.content_length is not None and request.content_length > MAX_PUSH_BODY:
            return problem(413, "Too large", f"a pushed policy set is at most {MAX_PUSH_BODY} bytes of JSON")
        data = await request.content.read(MAX_PUSH_BODY + 1)
        if len(data) > MAX_PUSH_BODY:
            return problem(413, "Too large", f"a pushed policy set is at most {MAX_PUSH_BODY} bytes of JSON")
        return await read_body(request, model, cross_origin=CROSS_ORIGIN, hint="a JSON object", raw=data)

    async def rollback(request: web.Request) -> web.Response:
        who = await operator(request)
        if isinstance(who, web.Response):
            return who
        body = await json_body(request, RollbackRequest)
        if isinstance(body, web.Response):
            return body
        revision, reason = body.revision, body.reason
        try:
            stored = await runtime.store.get_revision(revision)
        except StoreError as e:
            return unavailable(e)
        if stored is None:
            return problem(404, "No such revision", f"revision {revision} is not in the kept history")
        fleet = runtime.fleet
        if fleet is not None and fleet.mode == "store":
            # every replica follows the store: activate the kept revision there, for all of them
            before = runtime.policies.bundle.revision
            try:
                await fleet.activate(revision)
            except StoreError as e:
                return unavailable(e)
            now = runtime.policies.bundle.revision
            if fleet.follow_error is not None:
                return problem(409, "Rollback did not take effect here",
                               f"revision {revision} is the fleet's active revision now, but this replica cannot "
                               f"enforce it: {fleet.follow_error}")
            runtime.recorder.write(PolicyEvent.rollback(before, now, who, reason, [], time.time()))
            log.warning("policy rollback (fleet) %s -> %s by %s: %s", before, now, who, reason)
            return reply(RollbackResult(active_revision=now, previous_revision=before, files_changed=[]))
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
        runtime.recorder.write(PolicyEvent.rollback(before, now, who, reason, changed, time.time()))
        log.warning("policy rollback %s -> %s by %s: %s", before, now, who, reason)
        return reply(RollbackResult(active_revision=now, previous_revision=before, files_changed=changed))

    app.router.add_get("/v1/policies/revisions", list_revisions)
    app.router.add_post("/v1/policies/rollback", rollback)
    app.router.add_post("/v1/policies/push", push)
    app.router.add_get("/v1/agents", list_agents)
    app.router.add_post("/v1/agents", register_agent)
    app.router.add_get("/v1/agents/{id}", show_agent)
    app.router.add_post("/v1/agents/{id}/suspend", suspend_agent)
    app.router.add_post("/v1/agents/{id}/resume", resume_agent)
    app.router.add_get("/v1/suspensions", list_suspensions)
    app.router.add_post("/v1/suspensions", create_suspension)
    app.router.add_delete("/v1/suspensions/{kind}/{target}", delete_suspension)
