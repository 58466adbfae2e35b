"""Control API routes for workflows (docs/workflows.md).

    GET /v1/workflows                                  the definitions, with instance counts by state
    GET /v1/workflows/instances[?workflow=&state=&limit=]   instances, most recently moved first
    GET /v1/workflows/instances/{id}                   one instance with its history and objects

People authenticate as for the activity view (an approver or operator token):
instances carry business object ids and agent ids, never bodies.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..record.decisions import iso
from ..store import StoreError
from ..store.workflows import Instance, StepEvent, WorkflowObject
from .auth import control_auth, problem
from .models import MAX_PAGE, FilterText, InputModel, _clamp, read_query
from .models_responses import Timestamp

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")
_INSTANCE_RE = re.compile(r"wfi_[A-Za-z0-9_-]{1,64}")


# ---- what the routes accept and answer (documented in control/openapi.py) ----
class InstanceListQuery(InputModel):
    FIELD_TITLES = {"limit": "Bad paging"}
    BAD_TITLE = "Bad filter"
    workflow: FilterText | None = Field(None, description="Only this workflow's instances.")
    state: Literal["running", "completed"] | None = Field(None, description="Only instances in this state.")
    limit: Annotated[int, _clamp(1, MAX_PAGE)] = Field(100, description="At most this many, clamped to 1..1000.")


class InstancePath(InputModel):
    id: str = Field(min_length=1, description="Instance id (`wfi_` and 20 URL-safe characters).")


class StepOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    actions: list[str]
    requires: list[str]
    optional: bool
    sla_seconds: int | None


class WorkflowOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    description: str
    sla_seconds: int | None
    currency: str
    steps: list[StepOut]
    instances: dict[str, int] = Field(description="Instances by state (of the most recent 1,000).")


class WorkflowList(BaseModel):
    model_config = ConfigDict(frozen=True)
    workflows: list[WorkflowOut]


class Tally(BaseModel):
    model_config = ConfigDict(frozen=True)
    attempts: int
    failures: int
    completions: int
    refusals: int


class InstanceOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    id: str
    workflow: str
    state: str
    started_at: Timestamp
    updated_at: Timestamp
    completed_at: Timestamp | None
    completed: list[str] = Field(description="Steps completed, in the order they were first completed.")
    next: list[str] = Field(description="Steps whose prerequisites are done and that are not done themselves.")
    tally: dict[str, Tally]
    cost: str = Field(description="The cost so far, a decimal in the workflow's currency.")
    currency: str
    last_step: str

    @classmethod
    def of(cls, i: Instance, runtime: "ProctorRuntime") -> "InstanceOut":
        from ..workflows.stage import next_steps

        spec = runtime.workflows.get(i.workflow)
        return cls(
            id=i.id, workflow=i.workflow, state=i.state, started_at=iso(i.started_at), updated_at=iso(i.updated_at),
            completed_at=iso(i.completed_at) if i.completed_at is not None else None, completed=list(i.completed),
            next=next_steps(spec, i.completed) if spec is not None and i.state != "completed" else [],
            tally={k: Tally(**v.as_dict()) for k, v in i.tally.items()}, cost=f"{i.cost:.2f}",
            currency=spec.currency if spec is not None else "", last_step=i.last_step,
        )


class InstanceList(BaseModel):
    model_config = ConfigDict(frozen=True)
    instances: list[InstanceOut]


class EventOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    seq: int
    step: str
    action: str
    agent: str
    decision_id: str
    outcome: str = Field(description="completed | failed | refused")
    status: int | None
    time: Timestamp
    duration_ms: float
    approval_wait_ms: float | None
    human: bool
    cost: str
    objects: list[list[str]] = Field(description="[type, id] of each business object the call named.")

    @classmethod
    def of(cls, e: StepEvent) -> "EventOut":
        return cls(seq=e.seq or 0, step=e.step, action=e.action, agent=e.agent, decision_id=e.decision_id,
                   outcome=e.outcome, status=e.status, time=iso(e.time), duration_ms=e.duration_ms,
                   approval_wait_ms=e.approval_wait_ms, human=e.human, cost=f"{e.cost:.2f}",
                   objects=[list(o) for o in e.objects])


class ObjectOut(BaseModel):
    model_config = ConfigDict(frozen=True)
    type: str
    id: str
    step: str
    linked_at: Timestamp

    @classmethod
    def of(cls, o: WorkflowObject) -> "ObjectOut":
        return cls(type=o.object_type, id=o.object_id, step=o.step, linked_at=iso(o.linked_at))


class InstanceDetail(InstanceOut):
    events: list[EventOut]
    objects: list[ObjectOut]


def add_workflow_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    auth = control_auth(app, runtime.config)

    def unavailable(e: Exception) -> web.Response:
        log.error("store error: %s", e)
        return problem(503, "Store unavailable", "the state store cannot be reached; try again")

    async def list_workflows(request: web.Request) -> web.Response:
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        out: list[WorkflowOut] = []
        try:
            for w in runtime.workflows.specs:
                counts: dict[str, int] = {}
                for i in await runtime.store.list_workflow_instances(workflow=w.name, limit=MAX_PAGE):
                    counts[i.state] = counts.get(i.state, 0) + 1
                out.append(WorkflowOut(
                    name=w.name, description=w.description, sla_seconds=w.sla_seconds, currency=w.currency,
                    steps=[StepOut(name=s.name, actions=list(s.actions), requires=list(s.requires),
                                   optional=s.optional, sla_seconds=s.sla_seconds) for s in w.steps],
                    instances=counts))
        except StoreError as e:
            return unavailable(e)
        return web.json_response(WorkflowList(workflows=out).model_dump(mode="json"))

    async def list_instances(request: web.Request) -> web.Response:
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, InstanceListQuery)
        if isinstance(q, web.Response):
            return q
        try:
            found = await runtime.store.list_workflow_instances(workflow=q.workflow, state=q.state, limit=q.limit)
        except StoreError as e:
            return unavailable(e)
        body = InstanceList(instances=[InstanceOut.of(i, runtime) for i in found])
        return web.json_response(body.model_dump(mode="json"))

    async def show_instance(request: web.Request) -> web.Response:
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        inst_id = request.match_info["id"]
        if not _INSTANCE_RE.fullmatch(inst_id):
            return problem(404, "No such instance", "instance ids look like wfi_...")
        try:
            inst = await runtime.store.workflow_instance(inst_id)
            if inst is None:
                return problem(404, "No such instance", f"no workflow instance {inst_id!r}")
            events = await runtime.store.workflow_events(instance_id=inst_id)
            objects = await runtime.store.workflow_objects(instance_id=inst_id)
        except StoreError as e:
            return unavailable(e)
        base: dict[str, Any] = InstanceOut.of(inst, runtime).model_dump()
        detail = InstanceDetail(**base, events=[EventOut.of(e) for e in events],
                                objects=[ObjectOut.of(o) for o in objects])
        return web.json_response(detail.model_dump(mode="json"))

    app.router.add_get("/v1/workflows", list_workflows)
    app.router.add_get("/v1/workflows/instances", list_instances)
    app.router.add_get("/v1/workflows/instances/{id}", show_instance)
