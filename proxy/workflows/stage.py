"""Workflows on the request path: three stages (docs/workflows.md).

1. `WorkflowCheck` (before authorization): for an action that is a workflow step,
   find the instance from the business objects the request names (or the
   configured fallback), and put `context.workflow` into the Cedar context:
   name, instance, step, completed steps, whether the step's `requires` are done
   (`ready`), which are `missing`, which steps could be done `next`, when the
   instance started, and this step's attempts and failures so far. It reads the
   store and writes nothing. The answer carries `Proctor-Workflow`.
2. `WorkflowOrder` (right after authorization, settling its pending deny): a deny
   decided only by `@workflow("precondition")` policies (the bundled
   `workflow-step-out-of-order`) is answered 409 `step-precondition`, naming the
   missing steps and the steps allowed next, so an agent (or the LLM steering it)
   can correct itself. The refusal is recorded on the instance.
3. `WorkflowAdvance` (after the approval hold): notes whether a person approved the
   call; on the way back, a forwarded call is recorded as the step `completed`
   (its completion check passed) or `failed`, with its duration, approval wait,
   cost and the objects it named (new objects from the answer link to the
   instance). One store transaction per call, atomic across replicas.

An instance store that cannot be reached fails closed (503) on workflow-governed
routes only (StoreError, as for claims).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..core.chain import Stage
from ..core.exchange import Exchange
from ..core.model import Refusal
from ..policy.stage import CONTEXT_EXTRA, EVALUATION, PolicyEvaluation
from ..record.model import WORKFLOW_RECORD
from ..store import StoreError
from ..store.workflows import Instance, StepEvent, new_instance_id
from .correlate import ObjectKey, fallback_objects, request_objects, response_objects
from .spec import Governed, StepSpec, WorkflowSpec, Workflows

log = logging.getLogger("proctor.workflows")

STATE = "workflow"  # stage_data key of the WorkflowState
ORDER_KIND = "step-precondition"  # Refusal.kind of a 409 for a step whose prerequisites are not done
ANNOTATION = "workflow"  # @workflow("precondition") marks the policies that turn a deny into a 409
HEADER = "Proctor-Workflow"
MAX_RESPONSE_BODY = 1 << 20  # an answer larger than this is not read for objects or completion checks


class WorkflowObserver:
    """What the workflow stages report (metrics); the default reports nothing."""

    def step(self, workflow: str, step: str, outcome: str) -> None:
        return None

    def recorded(self, event: StepEvent, instance: Instance | None) -> None:
        """A forwarded step call was stored; `instance` as it is after it (KPI metrics)."""
        return None


@dataclass(slots=True)
class WorkflowState:
    """What WorkflowCheck found, for the stages after it."""

    workflow: WorkflowSpec
    step: StepSpec
    instance: Instance | None  # None: no instance yet (a starting step creates one on completion)
    instance_id: str  # the instance's, or the one a starting step will create
    objects: list[ObjectKey]  # what the request names (fallback objects included)
    missing: list[str]
    next_steps: list[str]
    approval_wait_ms: float | None = None
    human: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return not self.missing


def next_steps(workflow: WorkflowSpec, completed: list[str]) -> list[str]:
    """The steps whose prerequisites are done and that are not done themselves."""
    done = set(completed)
    return [s.name for s in workflow.steps if s.name not in done and all(r in done for r in s.requires)]


def workflow_context(state: WorkflowState) -> dict[str, Any]:
    inst = state.instance
    tally = inst.step_tally(state.step.name) if inst is not None else None
    return {
        "name": state.workflow.name,
        "instance": state.instance_id if (inst is not None or not state.step.requires) else "",
        "step": state.step.name,
        "known": inst is not None,
        "completed": list(inst.completed) if inst is not None else [],
        "ready": state.ready,
        "missing": list(state.missing),
        "next": list(state.next_steps),
        "started_at": int(inst.started_at) if inst is not None else 0,
        "attempts": tally.attempts if tally is not None else 0,
        "failures": tally.failures if tally is not None else 0,
        # exceptions (workflows/exceptions.py fills them in for the caller)
        "escalated": False, "gave_up": False, "rerouted_to": "", "rerouted_away": False, "closed": False,
    }


def order_refusal(state: WorkflowState, action: str, reasons: list[str]) -> Refusal:
    """409 naming the missing steps and what can be done instead."""
    wf, step = state.workflow, state.step
    inst = state.instance
    done = list(inst.completed) if inst is not None else []
    which = f"instance {state.instance_id}" if inst is not None else "no instance yet (none of the objects this " \
        "request names belongs to one)"
    missing = ", ".join(state.missing)
    if state.next_steps:
        actions = "; ".join(f"{n} ({', '.join(wf.step(n).actions)})" for n in state.next_steps)
        hint = f"Steps that can be done now: {actions}."
    else:
        hint = "No step can be done now."
    detail = (f"{action} is step '{step.name}' of workflow '{wf.name}' ({which}); it requires {missing} first, "
              f"and {'only ' + ', '.join(done) + ' is' if done else 'nothing is'} done yet. {hint} "
              f"Do the missing steps first (or work on an instance where they are done), then retry this call.")
    return Refusal(
        409, "Conflict: workflow step out of order", detail, reasons=reasons, kind=ORDER_KIND,
        extra={"workflow": {"name": wf.name, "instance": state.instance_id if inst is not None else None,
                            "step": step.name, "missing": list(state.missing), "completed": done,
                            "next": list(state.next_steps)}},
    )


class WorkflowCheck(Stage):
    """Before authorization: which instance and step this call is, into `context.workflow`."""

    name = "workflow"

    def __init__(self, store: Any, workflows: Workflows) -> None:
        self.store = store
        self.workflows = workflows

    async def on_request(self, ex: Exchange) -> None:
        cls, req = ex.classification, ex.request
        if cls is None or req is None or not cls.action:
            return
        governed: Governed | None = self.workflows.for_action(cls.action)
        if governed is None:
            return
        wf, step = governed.workflow, governed.step
        objects = request_objects(step, cls.params, cls.fields, cls.query_params)
        objects += [o for o in fallback_objects(wf, req.headers) if o not in objects]
        inst = await self.store.workflow_instance_for(wf.name, objects) if objects else None
        completed = inst.completed if inst is not None else []
        state = WorkflowState(
            workflow=wf, step=step, instance=inst, instance_id=inst.id if inst is not None else new_instance_id(),
            objects=objects, missing=[r for r in step.requires if r not in completed],
            next_steps=next_steps(wf, completed),
        )
        ex.stage_data[STATE] = state
        ex.stage_data.setdefault(CONTEXT_EXTRA, {})["workflow"] = workflow_context(state)
        if inst is not None or not step.requires:
            ex.stage_data[WORKFLOW_RECORD] = {"name": wf.name, "instance": state.instance_id, "step": step.name}
            ex.plan.response_headers[HEADER] = f"{wf.name}; instance={state.instance_id}; step={step.name}"
        if step.response_objects or (step.complete_when is not None and step.complete_when.json_equals):
            ex.plan.read_response_body = max(ex.plan.read_response_body, MAX_RESPONSE_BODY)


RecordRefusal = Callable[[StepEvent], Awaitable[None]]


class WorkflowOrder(Stage):
    """Right after authorization: a deny decided only by @workflow("precondition") policies is a 409."""

    name = "workflow-order"
    settles_pending = True

    def __init__(self, store: Any, observer: WorkflowObserver | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.observer = observer or WorkflowObserver()
        self.clock = clock

    def would_settle(self, ex: Exchange) -> Refusal | None:
        """The 409 this stage answers the pending deny with, else None; no side effect (the
        stage itself records it on the instance; monitor mode asks only: proxy/policy/monitor.py)."""
        state: WorkflowState | None = ex.stage_data.get(STATE)
        pending = ex.pending_refusal
        if state is None or state.ready or pending is None or not pending.reasons:
            return None
        evaluation: PolicyEvaluation | None = ex.stage_data.get(EVALUATION)
        if evaluation is None:
            return None
        policies = evaluation.bundle.policies
        notes = [policies[pid].annotations if pid in policies else None for pid in pending.reasons]
        # Out of order comes first: a deny by precondition policies, possibly with @approval
        # ones (a hold would ask a person to approve a step that cannot be done yet), is the 409.
        if any(a is None for a in notes) or not any(a.get(ANNOTATION) == "precondition" for a in notes if a):
            return None
        if not all(a.get(ANNOTATION) == "precondition" or "approval" in a for a in notes if a):
            return None
        cls = ex.classification
        assert cls is not None
        refusal = order_refusal(state, cls.action, list(pending.reasons))
        if any("approval" in a for a in notes if a):
            refusal.detail += " Once they are done, this call also needs a person's approval."
        return refusal

    async def on_request(self, ex: Exchange) -> None:
        refusal = self.would_settle(ex)
        if refusal is None:
            return
        state: WorkflowState = ex.stage_data[STATE]
        ex.settle_pending(refusal)
        self.observer.step(state.workflow.name, state.step.name, "refused")
        if state.instance is not None:
            # (out-of-order attempts count against the instance: the KPIs' rework and error views)
            await self.store.record_workflow_event(
                _event(ex, state, "refused", None, Decimal(0), state.objects),
                required=state.workflow.required_steps, links=[], create=False)


def _event(ex: Exchange, state: WorkflowState, outcome: str, status: int | None, cost: Decimal,
           objects: list[ObjectKey]) -> StepEvent:
    cls = ex.classification
    elapsed = ex.elapsed_ms()
    wait = state.approval_wait_ms
    if wait is not None and state.extra.get("held_here"):
        elapsed = max(0.0, elapsed - wait)  # (a sync hold waited inside this exchange)
    return StepEvent(
        instance_id=state.instance_id, workflow=state.workflow.name, step=state.step.name,
        action=cls.action if cls is not None else "", agent=ex.identity.agent_id if ex.identity is not None else "",
        decision_id=ex.decision_id, outcome=outcome, status=status, time=ex.timestamp, duration_ms=round(elapsed, 3),
        approval_wait_ms=None if wait is None else round(wait, 3), human=state.human, cost=cost,
        objects=tuple(objects),
    )


class WorkflowAdvance(Stage):
    """After the approval hold: note a person's part; on the way back, record the step."""

    name = "workflow-advance"

    def __init__(self, store: Any, observer: WorkflowObserver | None = None,
                 approval_of: Callable[[Exchange], Any] | None = None) -> None:
        self.store = store
        self.observer = observer or WorkflowObserver()
        self.approval_of = approval_of  # the approval that released this request (approvals/stage.py)
        self.failures = 0  # steps that could not be recorded (the store failed on the way back)

    def on_request(self, ex: Exchange) -> None:
        state: WorkflowState | None = ex.stage_data.get(STATE)
        if state is None or self.approval_of is None:
            return
        approval = self.approval_of(ex)
        if approval is not None and approval.decided_at is not None:
            state.human = True
            state.approval_wait_ms = max(0.0, (approval.decided_at - approval.created_at) * 1000)
            state.extra["held_here"] = approval.created_at >= ex.timestamp

    def on_response(self, ex: Exchange) -> Awaitable[None] | None:
        # (a plain method: only a forwarded step call has anything to await)
        state: WorkflowState | None = ex.stage_data.get(STATE)
        if state is None or ex.refusal is not None or not ex.forwardable or ex.local_reply is not None:
            return None
        return self._record(ex, state)

    async def _record(self, ex: Exchange, state: WorkflowState) -> None:
        resp = ex.response
        status = resp.upstream_status if resp is not None else None
        body: Any = None
        if resp is not None and resp.body is not None and len(resp.body) <= MAX_RESPONSE_BODY:
            try:
                body = json.loads(resp.body)
            except ValueError:
                body = None
        step = state.step
        done = status is not None and step.completes(status, body)
        cost = Decimal(0)
        if step.cost is not None:
            cost = step.cost.per_call + (step.cost.per_completion if done else Decimal(0))
        linked = response_objects(step, body, resp.headers if resp is not None else {}) if done else []
        objects = [*state.objects, *(o for o in linked if o not in state.objects)]
        # a call that completes a step links every object it named (the request's too), so the
        # instance is found from any of them later; a failed one links nothing
        links = objects if done else []
        outcome = "completed" if done else "failed"
        event = _event(ex, state, outcome, status, cost, objects)
        if not done and state.instance is None:
            # A failed call with no instance (a starting step, or a step policy let through
            # without one) starts nothing: a failed start leaves nothing behind. Counted only.
            state.extra["recorded"] = (outcome, None)
            self.observer.step(state.workflow.name, step.name, outcome)
            return
        try:
            inst = await self.store.record_workflow_event(
                event, required=state.workflow.required_steps, links=links, create=True)
        except StoreError as e:
            # The upstream already acted and the agent gets its answer; the step is missing from
            # the instance's history (a later step may then be refused as out of order). Loudly.
            self.failures += 1
            log.error("decision %s: workflow %s step %s (%s) could not be recorded: %s", ex.decision_id,
                      state.workflow.name, step.name, outcome, e)
            return
        state.extra["recorded"] = (outcome, inst)  # for the workflow-exceptions stage (exceptions.py)
        self.observer.step(state.workflow.name, step.name, outcome)
        self.observer.recorded(event, inst)
