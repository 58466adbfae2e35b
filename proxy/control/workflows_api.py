"""Control API routes for workflows (docs/workflows.md).

    GET /v1/workflows                                  the definitions, with instance counts by state
    GET /v1/workflows/instances[?workflow=&state=&limit=]   instances, most recently moved first
    GET /v1/workflows/instances/{id}                   one instance with its history and objects
    GET /v1/workflows/kpis[?workflow=&since=&until=&bucket_seconds=]   outcome KPIs (workflows/kpis.py)

People authenticate as for the activity view (an approver or operator token):
instances carry business object ids and agent ids, never bodies.

The `proctor_workflow_instances` gauge is refreshed from the store here, every few
seconds while the control API runs (as control/claims_api.py does for claims).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from ..record.decisions import iso
from ..store import StoreError
from ..store.workflows import Instance, StepEvent, WorkflowObject
from ..workflows import kpis
from ..workflows.metrics import WorkflowMetrics
from .auth import control_auth, problem
from .models import MAX_PAGE, FilterText, InputModel, _clamp, read_query
from .models_responses import Timestamp

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")
_INSTANCE_RE = re.compile(r"wfi_[A-Za-z0-9_-]{1,64}")
GAUGE_REFRESH_SECONDS = 5.0
KPI_CACHE_SECONDS = 5.0
KPI_CACHE_ENTRIES = 32


# ---- what the routes accept and answer (documented in control/openapi.py) ----
class InstanceListQuery(InputModel):
    FIELD_TITLES = {"limit": "Bad paging"}
    BAD_TITLE = "Bad filter"
    workflow: FilterText | None = Field(None, description="Only this workflow's instances.")
    state: Literal["running", "completed"] | None = Field(None, description="Only instances in this state.")
    limit: Annotated[int, _clamp(1, MAX_PAGE)] = Field(100, description="At most this many, clamped to 1..1000.")


class InstancePath(InputModel):
    id: str = Field(min_length=1, description="Instance id (`wfi_` and 20 URL-safe characters).")


def _time_text(value: str) -> str:
    try:
        kpis.parse_time(value)
    except ValueError as e:
        raise PydanticCustomError("time_format", str(e)) from None
    return value


TimeText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=64), AfterValidator(_time_text)]


class KpiQuery(InputModel):
    FIELD_TITLES = {"since": "Bad time", "until": "Bad time", "bucket_seconds": "Bad bucket"}
    BAD_TITLE = "Bad filter"
    workflow: FilterText | None = Field(None, description="Only this workflow (a loaded definition; else 400).")
    since: TimeText | None = Field(
        None, description="Start of the window: ISO 8601 (UTC when no offset is given) or epoch seconds. Default: "
        "7 days before `until`, aligned down to a multiple of the bucket.")
    until: TimeText | None = Field(None, description="End of the window (excluded), as `since`. Default: now.")
    bucket_seconds: Annotated[int, _clamp(kpis.MIN_BUCKET_SECONDS, kpis.MAX_BUCKET_SECONDS)] = Field(
        kpis.DEFAULT_BUCKET_SECONDS, description="Width of the series' buckets, clamped to 60..604800, then "
        "widened so that there are at most 500 (the answer says which width was used).")


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


# ---- GET /v1/workflows/kpis (docs/workflows.md, "Outcomes (KPIs)"; computed by workflows/kpis.py) ----
Rate = Annotated[float | None, Field(description="0..1; null when its denominator is 0.")]
Seconds = Annotated[float | None, Field(description="Seconds; null when there is nothing to measure.")]


class _Kpi(BaseModel):
    model_config = ConfigDict(frozen=True)


class KpiInstances(_Kpi):
    started: int = Field(description="Instances started in the window.")
    completed: int = Field(description="Instances completed in the window.")
    running: int = Field(description="Work in progress: instances running at the window's end (or now, if "
                         "earlier); not those a person closed.")
    closed: int = Field(description="Instances a person closed (as failed) in the window.")


class KpiCycleTime(_Kpi):
    count: int = Field(description="Instances completed in the window.")
    p50: Seconds
    p90: Seconds
    mean: Seconds
    human_wait_p50: Seconds = Field(description="Of each instance's approval waits (capped at its cycle time).")
    human_wait_p90: Seconds
    agent_time_p50: Seconds = Field(description="Of each instance's cycle time less its human wait.")
    agent_time_p90: Seconds
    human_wait_share: Rate = Field(description="Sum of human waits / sum of cycle times.")


class KpiHistogramBucket(_Kpi):
    le: int | None = Field(description="Upper bound in seconds (the previous bound excluded); null: longer.")
    count: int


class KpiSeriesPoint(_Kpi):
    start: Timestamp
    started: int
    completed: int


class KpiThroughput(_Kpi):
    completed: int
    per_day: float = Field(description="Completed / the window's length in days.")
    series: list[KpiSeriesPoint]


class KpiBurnPoint(_Kpi):
    start: Timestamp
    met: int
    missed: int


class KpiSla(_Kpi):
    target_seconds: int | None = Field(description="The workflow's `sla_seconds` (null: none set).")
    met: int = Field(description="Instances completed in the window within the target.")
    missed: int
    adherence: Rate
    at_risk: int = Field(description="Running instances past 80% of the target (the overdue ones included).")
    overdue: int = Field(description="Running instances past the target.")
    burn: list[KpiBurnPoint] = Field(description="Completions per bucket by SLA outcome.")


class KpiCost(_Kpi):
    total: str = Field(description="The cost of every call in the window (a decimal, in `currency`).")
    per_instance: str | None = Field(description="The mean cost of the instances completed in the window (their "
                                     "calls before `until`); null when none completed.")


class KpiDuration(_Kpi):
    p50: float | None
    p90: float | None


class KpiStepTime(_Kpi):
    count: int
    p50: Seconds
    p90: Seconds


class KpiStep(_Kpi):
    name: str
    attempts: int = Field(description="Forwarded calls in the window (completed + failed).")
    completions: int
    failures: int
    refusals: int = Field(description="Calls refused with 409 (prerequisites not done).")
    error_rate: Rate
    rework_rate: Rate
    duration_ms: KpiDuration = Field(description="Completed calls' duration (approval waits excluded).")
    step_time_seconds: KpiStepTime = Field(description="From the instance reaching the step to its first "
                                           "completion, for first completions in the window.")
    sla_seconds: int | None
    sla_met: int
    sla_missed: int
    sla_adherence: Rate
    autonomy_rate: Rate


class KpiAgent(_Kpi):
    agent: str
    completions: int
    failures: int
    refusals: int
    error_rate: Rate


class WorkflowKpis(_Kpi):
    name: str
    currency: str
    sla_seconds: int | None
    instances: KpiInstances
    cycle_time_seconds: KpiCycleTime
    cycle_time_histogram: list[KpiHistogramBucket] = Field(
        description="Instances completed in the window by cycle time; fixed bounds 60, 300, 900, 3600, 14400, "
        "86400, 259200, 604800, 2592000 s, then null (longer). Counts per bucket, not cumulative.")
    throughput: KpiThroughput
    error_rate: Rate = Field(description="Failed / (completed + failed) step calls in the window.")
    rework_rate: Rate = Field(description="(instance, step) pairs completed in the window that were completed more "
                              "than once / those pairs.")
    sla: KpiSla
    cost: KpiCost
    autonomy_rate: Rate = Field(description="Step completions in the window with no person involved (no approval, "
                                "no escalation) / step completions.")
    steps: list[KpiStep]
    agents: list[KpiAgent] = Field(description="The 100 agents with the most step calls in the window.")


class KpiDocument(_Kpi):
    since: Timestamp
    until: Timestamp
    bucket_seconds: int = Field(description="The bucket width used.")
    generated_at: Timestamp
    truncated: bool = Field(description="Limits were reached (events or instances read); the numbers cover what "
                            "was read.")
    workflows: list[WorkflowKpis]


def add_workflow_routes(app: web.Application, runtime: "ProctorRuntime",
                        clock: Callable[[], float] = time.time) -> None:
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

    kpi_cache: dict[tuple[Any, ...], tuple[float, asyncio.Future[dict[str, Any]]]] = {}

    async def workflow_kpis(request: web.Request) -> web.Response:
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, KpiQuery)
        if isinstance(q, web.Response):
            return q
        specs = list(runtime.workflows.specs)
        if q.workflow is not None:
            specs = [w for w in specs if w.name == q.workflow]
            if not specs:
                known = ", ".join(w.name for w in runtime.workflows.specs) or "none"
                return _bad_query("Bad filter", "workflow", f"is not a loaded workflow (loaded: {known})")
        now = clock()
        try:
            window = kpis.make_window(now, kpis.parse_time(q.since) if q.since else None,
                                      kpis.parse_time(q.until) if q.until else None, q.bucket_seconds)
        except kpis.WindowError as e:
            return _bad_query("Bad time", e.field, e.message)
        # The same question within KPI_CACHE_SECONDS gets the same answer, computed once (consoles
        # poll; requests arriving while it is computed wait for it): at most KPI_CACHE_ENTRIES kept.
        key = (tuple(s.name for s in specs), q.since, q.until, q.bucket_seconds)
        mono = time.monotonic()
        for stale in [k for k, (expires, _) in kpi_cache.items() if expires <= mono]:
            del kpi_cache[stale]
        hit = kpi_cache.get(key)
        if hit is None:
            if len(kpi_cache) >= KPI_CACHE_ENTRIES:
                del kpi_cache[next(iter(kpi_cache))]
            task = asyncio.ensure_future(kpis.read_kpis(runtime.store, specs, window, now))
            # (retrieved even when every asker went away meanwhile)
            task.add_done_callback(lambda f: f.cancelled() or f.exception())
            hit = kpi_cache[key] = (mono + KPI_CACHE_SECONDS, task)
        try:
            doc = await asyncio.shield(hit[1])
        except Exception as e:
            if kpi_cache.get(key) is hit:
                del kpi_cache[key]  # a failure is not kept
            if isinstance(e, StoreError):
                return unavailable(e)
            raise
        return web.json_response(KpiDocument.model_validate(doc).model_dump(mode="json"))

    app.router.add_get("/v1/workflows", list_workflows)
    app.router.add_get("/v1/workflows/instances", list_instances)
    app.router.add_get("/v1/workflows/instances/{id}", show_instance)
    app.router.add_get("/v1/workflows/kpis", workflow_kpis)

    metrics = _workflow_metrics(runtime)
    if metrics is None:
        return
    names = {w.name for w in runtime.workflows.specs}

    async def refresh_gauge() -> None:
        while True:
            try:
                counts = await runtime.store.count_workflow_instances()
                # (loaded definitions only: the label set stays as small as the configuration)
                metrics.set_instances({k: n for k, n in counts.items() if k[0] in names})
            except StoreError as e:  # the gauge keeps its last value; readiness reports the store
                log.debug("workflow gauge not refreshed: %s", e)
            await asyncio.sleep(GAUGE_REFRESH_SECONDS)

    task_key = web.AppKey("workflow_gauge", asyncio.Task)  # type: ignore[var-annotated]

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


def _bad_query(title: str, field: str, message: str) -> web.Response:
    """400 naming the query parameter at fault (the shape read_query answers with)."""
    return problem(400, title, f"{field} {message}",
                   extra={"errors": [{"field": field, "in": "query", "message": message}]})


def _workflow_metrics(runtime: "ProctorRuntime") -> WorkflowMetrics | None:
    try:
        observer = getattr(runtime.path.stage("workflow-advance"), "observer", None)
    except StopIteration:
        return None
    return observer if isinstance(observer, WorkflowMetrics) else None
