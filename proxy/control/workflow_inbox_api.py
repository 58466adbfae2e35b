"""Control API routes for workflow exceptions: the people's inbox, their decisions, and the
stall sweep (docs/workflows.md, "Exceptions").

    GET  /v1/workflows/inbox[?workflow=&limit=]                 open items of your groups (operators: all)
    POST /v1/workflows/instances/{id}/escalations/{item}        a person decides:
         {"resolution": "retry" | "take-over" | "complete" | "close", "note": "...",
          "to": "agent" (retry: give the step to this agent),
          "objects": [{"type": "PurchaseOrder", "id": "4500000123"}] (complete: what the person made)}

People authenticate with an approver token (as for approvals and the handoff inbox);
they see and decide the items of their approval groups, operators (control.admin_group)
every item, and the items of workflows without an escalation group. Every decision is
recorded (a `workflow` event line, `decided`, and its OCSF event) and announced to the
hooks subscribed to `workflow-decided`.

The stall sweep runs here, every `workflows.sweep_interval_seconds` while the control API
runs: a running instance with no progress for longer than its SLA is marked stalled and
escalated once (the version check on its attrs picks one replica).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..record.decisions import iso
from ..store import StoreError
from ..store.workflows import RUNNING, Instance
from ..workflows.exceptions import (
    INBOX_FLAG,
    RESOLUTIONS,
    DecisionRefused,
    ExceptionObserver,
    WorkflowExceptions,
    apply,
    closed,
    counted_failures,
    decide,
    may_decide,
    publish,
    shortest_sla,
    stall_check,
    unresolved,
)
from ..workflows.stage import next_steps
from .auth import control_auth, problem
from .models import MAX_PAGE, FilterText, InputModel, read_body, read_query

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")
_INSTANCE_RE = re.compile(r"wfi_[A-Za-z0-9_-]{1,64}")
_ITEM_RE = re.compile(r"wfe_[A-Za-z0-9_-]{1,64}")
HISTORY = 100  # step events shown with an item (the newest)


# ---- what the routes accept and answer ----
class InboxQuery(InputModel):
    BAD_TITLE = "Bad filter"
    workflow: FilterText | None = Field(None, description="Only this workflow's items.")
    limit: int = Field(100, ge=1, le=MAX_PAGE, description="At most this many items (1..1000).")


class EscalationPath(InputModel):
    id: str = Field(min_length=1, description="Instance id (`wfi_...`).")
    item: str = Field(min_length=1, description="Escalation id (`wfe_...`), as the inbox lists it.")


class ObjectIn(InputModel):
    type: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    id: str = Field(min_length=1, max_length=512, pattern=r"^[^\x00-\x1f\x7f]+$")


class DecideRequest(InputModel):
    """A person's decision on an escalation item."""

    resolution: Literal["retry", "take-over", "complete", "close"] = Field(
        description="retry: agents may try again (a fresh budget); take-over: a person does the step (agents "
                    "are refused); complete: a person did it (the workflow moves on); close: the instance is "
                    "closed as failed.")
    note: str | None = Field(None, max_length=2000, description="Why (recorded).")
    to: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$",
                           description="retry: the agent the step goes to from now on.")
    objects: list[ObjectIn] = Field(default_factory=list, max_length=32,
                                    description="complete: the business objects the person's work named (of the "
                                                "step's declared types), linked to the instance.")


class WorkflowHistoryEvent(BaseModel):
    model_config = ConfigDict(frozen=True)
    step: str
    agent: str
    outcome: str
    status: int | None
    time: str
    human: bool
    decision_id: str


class WorkflowInboxItem(BaseModel):
    """An instance waiting for a person, with its history."""

    model_config = ConfigDict(frozen=True)
    id: str
    instance: str
    workflow: str
    step: str | None
    group: str | None = Field(description="The people group whose item it is (null: the operators).")
    reason: str = Field(description="failures | gave-up | stalled")
    state: str = Field(description="open | taken (a person took the step over)")
    taken_by: str | None
    opened_at: str
    failures: int | None = Field(description="The step's failures counted (since a person last allowed retries).")
    agent: str | None = Field(description="The agent whose failed call opened it.")
    decision_id: str | None
    gave_up: bool
    rerouted_to: str | None
    completed: list[str]
    next: list[str]
    tally: dict[str, dict[str, int]]
    started_at: str
    updated_at: str
    history: list[WorkflowHistoryEvent] = Field(description="The instance's step calls, oldest first (the newest 100).")
    resolutions: list[str] = Field(description="What may be decided on it.")
    decide_url: str


class WorkflowInbox(BaseModel):
    model_config = ConfigDict(frozen=True)
    items: list[WorkflowInboxItem]


class EscalationDecided(BaseModel):
    model_config = ConfigDict(frozen=True)
    escalation: str
    instance: str
    resolution: str
    decided_by: str
    closed: bool = Field(description="The instance is closed as failed.")
    completed: list[str] | None = Field(description="The instance's completed steps after the decision.")
    state: str | None = Field(description="running | completed")


def _item_out(inst: Instance, item: dict[str, Any], history: list[Any], next_: list[str]) -> WorkflowInboxItem:
    step = item.get("step") if isinstance(item.get("step"), str) else None
    sx = (inst.attrs.get("steps") or {}).get(step, {}) if step is not None else {}
    resolutions = [r for r in RESOLUTIONS if step is not None or r in ("retry", "close")]
    return WorkflowInboxItem(
        id=str(item["id"]), instance=inst.id, workflow=inst.workflow, step=step,
        group=item.get("group") if isinstance(item.get("group"), str) else None,
        reason=str(item.get("reason") or ""), state=str(item.get("state")), taken_by=item.get("taken_by"),
        opened_at=iso(float(item.get("opened_at") or 0)),
        failures=counted_failures(inst, step) if step is not None else None,
        agent=item.get("agent"), decision_id=item.get("decision_id"), gave_up=bool(sx.get("gave_up")),
        rerouted_to=sx.get("rerouted_to") or None, completed=list(inst.completed), next=next_,
        tally={k: v.as_dict() for k, v in inst.tally.items()}, started_at=iso(inst.started_at),
        updated_at=iso(inst.updated_at),
        history=[WorkflowHistoryEvent(step=e.step, agent=e.agent, outcome=e.outcome, status=e.status,
                                      time=iso(e.time), human=e.human, decision_id=e.decision_id) for e in history],
        resolutions=resolutions, decide_url=f"/v1/workflows/instances/{inst.id}/escalations/{item['id']}",
    )


def _exceptions_stage(runtime: "ProctorRuntime") -> WorkflowExceptions | None:
    try:
        stage = runtime.path.stage("workflow-exceptions")
    except StopIteration:
        return None
    return stage if isinstance(stage, WorkflowExceptions) else None


def add_workflow_inbox_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    auth = control_auth(app, runtime.config)
    stage = _exceptions_stage(runtime)
    observer = stage.observer if stage is not None else ExceptionObserver()
    record = runtime.recorder.write

    def unavailable(e: Exception) -> web.Response:
        log.error("store error: %s", e)
        return problem(503, "Store unavailable", "the state store cannot be reached; try again")

    async def inbox(request: web.Request) -> web.Response:
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, InboxQuery)
        if isinstance(q, web.Response):
            return q
        out: list[WorkflowInboxItem] = []
        try:
            found = await runtime.store.list_workflow_instances(workflow=q.workflow, flagged=INBOX_FLAG,
                                                                limit=MAX_PAGE)
            for inst in sorted(found, key=lambda i: i.started_at):
                mine = [i for i in unresolved(inst.attrs, any_step=True)
                        if may_decide(i, who.groups, auth.admin_group)]
                if not mine:
                    continue
                events = await runtime.store.workflow_events(instance_id=inst.id, limit=10000)
                spec = runtime.workflows.get(inst.workflow)
                waiting = next_steps(spec, inst.completed) if spec is not None else []
                out += [_item_out(inst, item, events[-HISTORY:], waiting) for item in mine]
                if len(out) >= q.limit:
                    break
        except StoreError as e:
            return unavailable(e)
        out.sort(key=lambda i: i.opened_at)
        return web.json_response(WorkflowInbox(items=out[:q.limit]).model_dump(mode="json"))

    async def decide_item(request: web.Request) -> web.Response:
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        body = await read_body(request, DecideRequest, hint='{"resolution": "retry", "note": "..."}',
                               cross_origin="escalations are decided from the console, CLI or API")
        if isinstance(body, web.Response):
            return body
        inst_id, item_id = request.match_info["id"], request.match_info["item"]
        if not _INSTANCE_RE.fullmatch(inst_id) or not _ITEM_RE.fullmatch(item_id):
            return problem(404, "No such item", "instance ids look like wfi_..., escalation ids like wfe_...")
        now = time.time()
        try:
            inst = await runtime.store.workflow_instance(inst_id)
            item = next((i for i in (inst.attrs.get("items") or []) if isinstance(i, dict)
                         and i.get("id") == item_id), None) if inst is not None else None
            if inst is None or item is None or not may_decide(item, who.groups, auth.admin_group):
                # (items of other groups look absent: no probing)
                return problem(404, "No such item", f"no escalation {item_id!r} of instance {inst_id!r} in your "
                               "groups")
            spec = runtime.workflows.get(inst.workflow)
            if spec is None:
                return problem(409, "Unknown workflow", f"workflow {inst.workflow!r} is no longer defined")
            objects = [(o.type, o.id) for o in body.objects]
            note = body.note.strip() if body.note and body.note.strip() else None
            done = await apply(runtime.store, inst, lambda i: decide(
                spec, i, item_id, body.resolution, who.id, now, note=note, to=body.to, objects=objects))
        except DecisionRefused as e:
            return problem(e.status, e.title, e.detail)
        except StoreError as e:
            return unavailable(e)
        if done is None:
            return problem(409, "Busy", "the instance kept changing while the decision was written; try again")
        change, _ = done
        if change.step_event is not None:
            try:
                await runtime.store.record_workflow_event(change.step_event, required=spec.required_steps,
                                                          links=change.links, create=False)
            except StoreError as e:
                log.error("escalation %s of %s: decided complete by %s, but the step completion could not be "
                          "stored: %s", item_id, inst_id, who.id, e)
                publish(change, record, observer)
                return problem(503, "Store unavailable", "the decision was recorded but the step's completion "
                               "could not be stored; the step is still open: ask an operator to check the "
                               "instance")
        publish(change, record, observer)
        log.info("escalation %s of workflow instance %s: %s decided by %s", item_id, inst_id, body.resolution,
                 who.id)
        try:
            after = await runtime.store.workflow_instance(inst_id)
        except StoreError:
            after = None
        out = EscalationDecided(
            escalation=item_id, instance=inst_id, resolution=body.resolution, decided_by=who.id,
            closed=closed(after) is not None if after is not None else body.resolution == "close",
            completed=list(after.completed) if after is not None else None,
            state=after.state if after is not None else None)
        return web.json_response(out.model_dump(mode="json"))

    app.router.add_get("/v1/workflows/inbox", inbox)
    app.router.add_post("/v1/workflows/instances/{id}/escalations/{item}", decide_item)

    if not runtime.workflows:
        return
    settings = runtime.config.workflows

    async def sweep_once(now: float) -> int:
        """Escalate the instances stalled now; how many this replica escalated."""
        escalated = 0
        for wf in runtime.workflows.specs:
            sla = shortest_sla(wf)
            if sla is None:
                continue
            stale = await runtime.store.list_workflow_instances(workflow=wf.name, state=RUNNING, before=now - sla,
                                                                limit=settings.sweep_batch)
            check = functools.partial(stall_check, wf, now=now)
            for inst in stale:
                done = await apply(runtime.store, inst, check)
                if done is not None and done[0].events:
                    publish(done[0], record, observer)
                    escalated += 1
        return escalated

    async def sweep() -> None:
        while True:
            await asyncio.sleep(settings.sweep_interval_seconds)
            try:
                n = await sweep_once(time.time())
                if n:
                    log.info("workflow stall sweep: %d instance(s) stalled and escalated", n)
            except StoreError as e:
                log.warning("workflow stall sweep skipped: %s", e)
            except Exception:  # noqa: BLE001 - the sweep must outlive a bad instance
                log.exception("workflow stall sweep failed")

    task_key = web.AppKey("workflow_stall_sweep", asyncio.Task)  # type: ignore[var-annotated]

    async def start(app: web.Application) -> None:
        app[task_key] = asyncio.get_running_loop().create_task(sweep())

    async def stop(app: web.Application) -> None:
        task = app.get(task_key)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
