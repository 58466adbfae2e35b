"""Exceptions on workflow instances: retry, give up, escalate, reroute, stall
(docs/workflows.md, "Exceptions").

A step's `on_error` says what happens when its calls fail (WorkflowAdvance records
`failed`). Failures are counted per instance and step from a *base* (the tally's
failures when a person last allowed retries, or when the step moved to another agent):

- `retry`: a failed answer carries `Retry-After` and `Proctor-Workflow-Retry:
  attempt=N; max=M`; after `max_attempts` failures the step *gives up*: the bundled
  `@workflow("gave-up")` policy refuses further calls of it on that instance (409
  `step-gave-up`) until a person acts, and an inbox item is opened;
- `escalate`: after `after_failures` failures an inbox item for the people group opens
  (one open item per step at a time);
- `reroute`: after `after_failures` failures the step moves to another agent; the
  bundled `@workflow("rerouted")` policy refuses everyone else (409 `step-rerouted`).

An instance with no progress for longer than its SLA is *stalled*: the control API's
sweep escalates it once per stall (`stall_check`). People decide on items through the
control API (`decide`): `retry` (a fresh budget, optionally to another agent),
`take-over` (a person does the step; agents are refused), `complete` (a person did it:
the workflow moves on), `close` (the instance is closed as failed).

The state lives in the instance's attrs, written with `Store.update_workflow_attrs`
(compare-and-set on the instance version, so one replica wins each transition):

    {"steps": {"<step>": {"base": 2, "gave_up": <epoch>, "rerouted_to": "agent-b",
                          "rerouted_from": "agent-a", "rerouted_at": <epoch>,
                          "taken_by": "alice", "human": true}},
     "items": [<escalation item>, ...],     # the newest MAX_ITEMS
     "inbox": 1,                             # present while an item is open (the store's filter)
     "stalled": {"idle_since": <updated_at>, "at": <epoch>},
     "closed": {"by": "alice", "at": <epoch>, "note": "..."}}

The functions here are pure (an instance in, the next attrs and the events out); the
stages below and proxy/control/workflow_inbox_api.py persist them.
"""

from __future__ import annotations

import copy
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from ..core.chain import Stage
from ..core.exchange import Exchange
from ..core.model import AgentIdentity, Refusal
from ..policy.stage import CONTEXT_EXTRA, EVALUATION, PolicyEvaluation
from ..record.model import WorkflowEvent, iso
from ..store import StoreError
from ..store.workflows import RUNNING, Instance, StepEvent
from .correlate import as_id
from .spec import StepSpec, WorkflowSpec
from .stage import ANNOTATION, STATE, WorkflowState, next_steps

log = logging.getLogger("proctor.workflows")

INBOX_FLAG = "inbox"  # top-level attrs key while an item is open (Store.list_workflow_instances(flagged=))
MAX_ITEMS = 50  # escalation items kept per instance (resolved ones drop off first)
RETRY_HEADER = "Proctor-Workflow-Retry"
HUMAN = "human:"  # a person, where an agent id would be (a step taken over, completed by hand)
OPEN, TAKEN, RESOLVED = "open", "taken", "resolved"
RESOLUTIONS = ("retry", "take-over", "complete", "close")
# @workflow("...") values this module settles into a 409, most decisive first
KINDS = {"closed": "instance-closed", "gave-up": "step-gave-up", "rerouted": "step-rerouted"}
PRECEDENCE = ("closed", "gave-up", "rerouted")
_AGENT_RE = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")
WEBHOOK_EVENTS = {"escalated": "workflow-escalated", "rerouted": "workflow-rerouted", "decided": "workflow-decided"}


def new_item_id() -> str:
    return "wfe_" + secrets.token_urlsafe(12)


# ---------------------------------------------------------------------------- reading attrs
def step_attrs(inst: Instance | None, step: str) -> dict[str, Any]:
    if inst is None:
        return {}
    steps = inst.attrs.get("steps")
    value = steps.get(step) if isinstance(steps, dict) else None
    return value if isinstance(value, dict) else {}


def items(attrs: dict[str, Any]) -> list[dict[str, Any]]:
    value = attrs.get("items")
    return [i for i in value if isinstance(i, dict)] if isinstance(value, list) else []


def unresolved(attrs: dict[str, Any], step: str | None = None, *, any_step: bool = False) -> list[dict[str, Any]]:
    """Open or taken items: of `step` (None: items about the instance as a whole), or of every step."""
    return [i for i in items(attrs) if i.get("state") in (OPEN, TAKEN) and (any_step or i.get("step") == step)]


def counted_failures(inst: Instance, step: str) -> int:
    """The step's failures since its base (a person allowed retries, or it moved)."""
    base = step_attrs(inst, step).get("base", 0)
    return max(0, inst.step_tally(step).failures - (base if isinstance(base, int) else 0))


def is_target(to: str, agent: str, groups: Iterable[str]) -> bool:
    """Is the caller the agent a step moved to (its id, or one of its groups)?"""
    return agent == to or to in set(groups)


def closed(inst: Instance | None) -> dict[str, Any] | None:
    value = inst.attrs.get("closed") if inst is not None else None
    return value if isinstance(value, dict) else None


def exception_context(step: StepSpec, inst: Instance | None, agent: str, groups: Iterable[str]) -> dict[str, Any]:
    """The exception fields of `context.workflow` for this caller."""
    sx = step_attrs(inst, step.name)
    taken = sx.get("taken_by")
    to = f"{HUMAN}{taken}" if isinstance(taken, str) and taken else str(sx.get("rerouted_to") or "")
    attrs = inst.attrs if inst is not None else {}
    return {
        "escalated": bool(unresolved(attrs, step.name) or unresolved(attrs, None)),
        "gave_up": bool(sx.get("gave_up")),
        "rerouted_to": to,
        "rerouted_away": bool(to) and (to.startswith(HUMAN) or not is_target(to, agent, groups)),
        "closed": closed(inst) is not None,
    }


def failure_statuses(step: StepSpec) -> set[int]:
    """The upstream statuses that fail the step's completion check: their answers are held
    back (ForwardPlan.replaceable_statuses) so the retry headers reach the agent."""
    check = step.complete_when
    ok = set(check.status) if check is not None and check.status else set(range(200, 300))
    return set(range(200, 600)) - ok


# ---------------------------------------------------------------------------- changes
@dataclass
class Change:
    """What a transition does: the attrs to write (None: nothing), the events to record (and
    announce), and for a person's `complete` the step event to store."""

    attrs: dict[str, Any] | None = None
    events: list[WorkflowEvent] = field(default_factory=list)
    step_event: StepEvent | None = None
    links: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class RetryAdvice:
    """What a failed call's answer tells the agent."""

    attempt: int  # the step's failures counted, this one included
    max_attempts: int | None
    retry_after: int | None  # None: do not retry (gave up, moved away, closed)
    gave_up: bool = False
    rerouted_to: str | None = None
    escalated_to: str | None = None  # a group ("" operators) whose inbox has it now

    def headers(self) -> dict[str, str]:
        parts = [f"attempt={self.attempt}"]
        if self.max_attempts is not None:
            parts.append(f"max={self.max_attempts}")
        if self.gave_up:
            parts.append("gave-up")
        if self.rerouted_to is not None:
            parts.append(f'rerouted-to="{_sf(self.rerouted_to)}"')
        if self.escalated_to is not None:
            parts.append(f'escalated="{_sf(self.escalated_to or "operators")}"')
        out = {RETRY_HEADER: "; ".join(parts)}
        if self.retry_after is not None:
            out["Retry-After"] = str(self.retry_after)
        return out


def later_retry_after(ours: dict[str, str], upstream: str | None) -> dict[str, str]:
    """The retry headers, keeping the upstream's own Retry-After (delay seconds) when it asks
    for a longer wait than the step's `after_seconds`."""
    theirs = (upstream or "").strip()
    if "Retry-After" in ours and theirs.isdigit() and len(theirs) <= 9 and int(theirs) > int(ours["Retry-After"]):
        return {**ours, "Retry-After": theirs}
    return ours


def _sf(text: str) -> str:
    """A value inside a structured-field string: printable ASCII, quotes and backslashes escaped."""
    clean = "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text)
    return clean.replace("\\", "\\\\").replace('"', '\\"')


def _event(wf: WorkflowSpec, inst: Instance, event: str, now: float, **extra: Any) -> WorkflowEvent:
    return WorkflowEvent(event=event, time=iso(now), workflow=wf.name, instance=inst.id, **extra)


def _escalation_group(wf: WorkflowSpec, step: StepSpec | None) -> str | None:
    if step is not None and step.on_error is not None and step.on_error.escalate is not None:
        return step.on_error.escalate.group
    return wf.escalate_group


def _set_inbox_flag(attrs: dict[str, Any]) -> None:
    if unresolved(attrs, any_step=True):
        attrs[INBOX_FLAG] = 1
    else:
        attrs.pop(INBOX_FLAG, None)


def _add_item(attrs: dict[str, Any], item: dict[str, Any]) -> None:
    kept = items(attrs) + [item]
    while len(kept) > MAX_ITEMS:
        # drop the oldest resolved item (open ones stay until a person or the step resolves them)
        drop = next((i for i in kept if i.get("state") == RESOLVED), kept[0])
        kept.remove(drop)
    attrs["items"] = kept


def _open_item(wf: WorkflowSpec, inst: Instance, attrs: dict[str, Any], step: StepSpec | None, reason: str,
               now: float, new_id: Callable[[], str], **extra: Any) -> tuple[dict[str, Any], bool]:
    """The step's unresolved item (its reason upgraded to `reason` when that is gave-up), or a
    new one; True when it is new or changed (announce it)."""
    name = step.name if step is not None else None
    current = unresolved(attrs, name)
    if current:
        item = current[0]
        if reason == "gave-up" and item.get("reason") != "gave-up":
            item["reason"] = "gave-up"
            return item, True
        return item, False
    item = {"id": new_id(), "step": name, "group": _escalation_group(wf, step), "reason": reason, "state": OPEN,
            "opened_at": now, **{k: v for k, v in extra.items() if v is not None}}
    _add_item(attrs, item)
    return item, True


def _escalated(wf: WorkflowSpec, inst: Instance, item: dict[str, Any], now: float, **extra: Any) -> WorkflowEvent:
    return _event(wf, inst, "escalated", now, step=item.get("step"), group=item.get("group"),
                  escalation_id=item["id"], reason=item.get("reason"), **extra)


def after_failure(wf: WorkflowSpec, step: StepSpec, inst: Instance, agent: str, groups: Iterable[str],
                  decision_id: str, now: float, new_id: Callable[[], str] = new_item_id) -> Change:
    """The transitions a failed call of `step` causes on `inst` (the instance after its
    failure was recorded). Idempotent: applied again to an instance that already made them
    (another replica, a retried write), it changes nothing."""
    oe = step.on_error
    if oe is None or closed(inst) is not None or step_attrs(inst, step.name).get("taken_by"):
        return Change()  # (closed, or a person has the step: an agent a policy let through changes nothing)
    attrs = copy.deepcopy(inst.attrs)
    steps = attrs.setdefault("steps", {})
    sx = steps.setdefault(step.name, {})
    failures = inst.step_tally(step.name).failures
    counted = counted_failures(inst, step.name)
    events: list[WorkflowEvent] = []
    who = {"agent": agent, "decision_id": decision_id}
    if (oe.reroute is not None and not sx.get("rerouted_to")
            and counted >= oe.reroute.after_failures and not is_target(oe.reroute.to, agent, groups)):
        sx.update({"rerouted_to": oe.reroute.to, "rerouted_from": agent, "rerouted_at": now, "base": failures})
        events.append(_event(wf, inst, "rerouted", now, step=step.name, failures=counted, to=oe.reroute.to, **who))
    else:
        gives_up = oe.retry is not None and counted >= oe.retry.max_attempts
        if gives_up and not sx.get("gave_up"):
            sx["gave_up"] = now
            events.append(_event(wf, inst, "gave-up", now, step=step.name, failures=counted, **who))
            item, announce = _open_item(wf, inst, attrs, step, "gave-up", now, new_id, failures=counted, **who)
            if announce:
                events.append(_escalated(wf, inst, item, now, failures=counted, **who))
        elif (not gives_up and oe.escalate is not None and counted >= oe.escalate.after_failures
              and not unresolved(attrs, step.name)):
            item, _ = _open_item(wf, inst, attrs, step, "failures", now, new_id, failures=counted, **who)
            events.append(_escalated(wf, inst, item, now, failures=counted, **who))
    if not events:
        return Change()
    _set_inbox_flag(attrs)
    return Change(attrs, events)


def retry_advice(step: StepSpec, mine: Instance, current: Instance, agent: str,
                 groups: Iterable[str]) -> RetryAdvice | None:
    """What a failed call's answer says: its attempt from `mine` (the instance as the call
    left it, its own failure counted), what happened since from `current` (gave up, moved,
    taken over, escalated, closed)."""
    oe = step.on_error
    if oe is None:
        return None
    sx = step_attrs(current, step.name)
    moved = sx.get("rerouted_to")
    away = isinstance(moved, str) and moved != "" and not is_target(moved, agent, groups)
    gave_up = bool(sx.get("gave_up"))
    item = next(iter(unresolved(current.attrs, step.name)), None)
    stop = gave_up or away or bool(sx.get("taken_by")) or closed(current) is not None
    return RetryAdvice(
        attempt=max(1, counted_failures(mine, step.name)),
        max_attempts=oe.retry.max_attempts if oe.retry is not None else None,
        retry_after=oe.retry.after_seconds if oe.retry is not None and not stop else None, gave_up=gave_up,
        rerouted_to=moved if away and isinstance(moved, str) else None,
        escalated_to=(item.get("group") or "") if item is not None else None,
    )


def after_completion(wf: WorkflowSpec, step: StepSpec, inst: Instance, agent: str, decision_id: str,
                     now: float) -> Change:
    """An agent completed the step: its unresolved items (and an instance-wide stall item)
    are resolved; a give-up or take-over of the step ends."""
    attrs = copy.deepcopy(inst.attrs)
    events: list[WorkflowEvent] = []
    for item in unresolved(attrs, step.name) + [i for i in unresolved(attrs, any_step=True)
                                                if i.get("reason") == "stalled" and i.get("step") != step.name]:
        item.update({"state": RESOLVED, "resolution": "completed", "resolved_by": agent, "resolved_at": now})
        events.append(_event(wf, inst, "resolved", now, step=item.get("step"), agent=agent, decision_id=decision_id,
                             group=item.get("group"), escalation_id=item["id"]))
    sx = step_attrs(inst, step.name)
    changed = bool(events) or "gave_up" in sx or "taken_by" in sx
    if not changed:
        return Change()
    ax = attrs.setdefault("steps", {}).setdefault(step.name, {})
    ax.pop("gave_up", None)
    ax.pop("taken_by", None)
    _set_inbox_flag(attrs)
    return Change(attrs, events)


# ---------------------------------------------------------------------------- stalls
def stall_threshold(wf: WorkflowSpec, inst: Instance) -> tuple[int, StepSpec | None] | None:
    """(seconds without progress that make the instance stalled, the step it waits on):
    the shortest `sla_seconds` of the steps it could do next, else the workflow's."""
    waiting = [wf.step(n) for n in next_steps(wf, inst.completed)]
    with_sla = [s for s in waiting if s.sla_seconds is not None]
    if with_sla:
        s = min(with_sla, key=lambda s: s.sla_seconds or 0)
        return int(s.sla_seconds or 0), s
    if wf.sla_seconds is not None:
        escalating = [s for s in waiting if s.on_error is not None and s.on_error.escalate is not None]
        first = (escalating or waiting)[:1]
        return wf.sla_seconds, first[0] if first else None
    return None


def shortest_sla(wf: WorkflowSpec) -> int | None:
    slas = [s.sla_seconds for s in wf.steps if s.sla_seconds is not None]
    if wf.sla_seconds is not None:
        slas.append(wf.sla_seconds)
    return min(slas) if slas else None


def stall_check(wf: WorkflowSpec, inst: Instance, now: float, new_id: Callable[[], str] = new_item_id) -> Change:
    """A running instance idle for longer than its threshold is stalled: evented once per
    stall (until it moves again), and escalated unless people already have an item of it."""
    if inst.state != RUNNING or closed(inst) is not None:
        return Change()
    found = stall_threshold(wf, inst)
    if found is None:
        return Change()
    threshold, step = found
    idle = now - inst.updated_at
    marked = inst.attrs.get("stalled")
    if idle <= threshold or (isinstance(marked, dict) and marked.get("idle_since") == inst.updated_at):
        return Change()
    attrs = copy.deepcopy(inst.attrs)
    attrs["stalled"] = {"idle_since": inst.updated_at, "at": now}
    name = step.name if step is not None else None
    events = [_event(wf, inst, "stalled", now, step=name, idle_seconds=round(idle, 3))]
    if not unresolved(attrs, any_step=True):
        item, _ = _open_item(wf, inst, attrs, step, "stalled", now, new_id, idle_seconds=round(idle, 3))
        events.append(_escalated(wf, inst, item, now))
    _set_inbox_flag(attrs)
    return Change(attrs, events)


# ---------------------------------------------------------------------------- people decide
class DecisionRefused(Exception):
    """A decision that cannot be made: the status, title and detail to answer."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


def find_item(inst: Instance, item_id: str) -> dict[str, Any] | None:
    return next((i for i in items(inst.attrs) if i.get("id") == item_id), None)


def decide(wf: WorkflowSpec, inst: Instance, item_id: str, resolution: str, person: str, now: float, *,
           note: str | None = None, to: str | None = None,
           objects: list[tuple[str, str]] | None = None) -> Change:
    """A person's decision on an item (DecisionRefused when it cannot be made)."""
    if resolution not in RESOLUTIONS:
        raise DecisionRefused(400, "Unknown resolution", f"resolution must be one of {', '.join(RESOLUTIONS)}")
    attrs = copy.deepcopy(inst.attrs)
    item = next((i for i in items(attrs) if i.get("id") == item_id), None)
    if item is None:
        raise DecisionRefused(404, "No such item", f"instance {inst.id} has no escalation {item_id!r}")
    if item.get("state") == RESOLVED:
        raise DecisionRefused(409, "Already resolved", f"escalation {item_id} was resolved "
                              f"({item.get('resolution')}) by {item.get('resolved_by')}")
    ended = closed(inst)
    if ended is not None:
        raise DecisionRefused(409, "Instance closed", f"instance {inst.id} was closed by {ended.get('by')}")
    name = item.get("step")
    step = wf.step(name) if isinstance(name, str) and name in {s.name for s in wf.steps} else None
    if resolution in ("take-over", "complete") and step is None:
        raise DecisionRefused(400, "No step to act on", f"escalation {item_id} is about the instance as a whole "
                              "(no step); decide retry (let the agents go on) or close")
    if step is not None and step.name in inst.completed and resolution in ("take-over", "complete"):
        raise DecisionRefused(409, "Step already completed", f"step {step.name} of instance {inst.id} is complete")
    taken = item.get("taken_by")
    if item.get("state") == TAKEN and taken != person and resolution == "take-over":
        raise DecisionRefused(409, "Already taken", f"{taken} took escalation {item_id} over")
    if to is not None and (resolution != "retry" or step is None):
        raise DecisionRefused(400, "`to` is for retry", "`to` (an agent to give the step to) goes with resolution "
                              "retry on an item about a step")
    if to is not None and (not _AGENT_RE.match(to) or to.startswith(("group:", HUMAN))):
        raise DecisionRefused(400, "Bad agent", "`to` names an agent: 1-256 printable characters, not starting "
                              "group: or human:")
    sx = attrs.setdefault("steps", {}).setdefault(step.name, {}) if step is not None else {}
    decided = {"resolution": resolution, "resolved_by": person, "resolved_at": now, **({"note": note} if note else {})}
    change = Change(attrs)
    if resolution == "take-over":
        item.update({"state": TAKEN, "taken_by": person, "taken_at": now})
        sx.update({"taken_by": person, "human": True})
        sx.pop("gave_up", None)  # (the step is the person's now, not given up)
    elif resolution == "retry":
        item.update({"state": RESOLVED, **decided})
        if step is not None:
            sx.update({"base": inst.step_tally(step.name).failures, "human": True})
            sx.pop("gave_up", None)
            sx.pop("taken_by", None)
            if to is not None:
                sx.update({"rerouted_to": to, "rerouted_from": f"{HUMAN}{person}", "rerouted_at": now})
    elif resolution == "complete":
        assert step is not None
        item.update({"state": RESOLVED, **decided})
        sx.update({"human": True})
        sx.pop("gave_up", None)
        sx.pop("taken_by", None)
        declared = {o.type for o in step.objects}
        links = []
        for otype, oid in objects or []:
            if otype not in declared:
                raise DecisionRefused(400, "Unknown object type", f"step {step.name} names objects of types "
                                      f"{', '.join(sorted(declared)) or '(none)'}, not {otype!r}")
            clean = as_id(oid)
            if clean is None:
                raise DecisionRefused(400, "Bad object id", f"the {otype} id must be a printable string of at most "
                                      "512 characters")
            links.append((otype, clean))
        change.links = links
        change.step_event = StepEvent(
            instance_id=inst.id, workflow=wf.name, step=step.name, action="", agent=f"{HUMAN}{person}",
            decision_id=str(item["id"]), outcome="completed", status=None, time=now, duration_ms=0.0, human=True,
            objects=tuple(links))
    else:  # close
        for other in unresolved(attrs, any_step=True):
            other.update({"state": RESOLVED, **decided})
        attrs["closed"] = {"by": person, "at": now, **({"note": note} if note else {})}
    _set_inbox_flag(attrs)
    change.events.append(_event(wf, inst, "decided", now, step=name if isinstance(name, str) else None,
                                group=item.get("group"), escalation_id=str(item["id"]), by=person,
                                resolution=resolution, note=note or None, to=to))
    return change


def may_decide(item: dict[str, Any], groups: Iterable[str], admin_group: str) -> bool:
    """Members of the item's group decide (operators any item; an item without a group is theirs)."""
    mine = set(groups)
    group = item.get("group")
    return admin_group in mine or (isinstance(group, str) and group in mine)


# ---------------------------------------------------------------------------- persisting
Compute = Callable[[Instance], Change]


async def apply(store: Any, inst: Instance, compute: Compute, tries: int = 8) -> tuple[Change, Instance] | None:
    """Compute the change on `inst` and write its attrs if the instance is still at that
    version; on a lost race (another event or replica moved it) read it again and recompute.
    (the change, the instance it was computed on); None when the instance is gone or every
    try lost. Raises StoreError."""
    for _ in range(tries):
        change = compute(inst)
        if change.attrs is None:
            return change, inst
        if await store.update_workflow_attrs(inst.id, change.attrs, expect_version=inst.version):
            return change, inst
        again = await store.workflow_instance(inst.id)
        if again is None:
            return None
        inst = again
    log.warning("workflow instance %s: exception state not written after %d tries (contended)", inst.id, tries)
    return None


class ExceptionObserver:
    """Where exception events go besides the record: metrics and webhooks (default: nowhere)."""

    def event(self, event: WorkflowEvent) -> None:
        return None


class ExceptionReporter(ExceptionObserver):
    """Counts exception events (`proctor_workflow_exceptions_total{workflow,step,event}`) and
    queues their webhooks (approvals.notify.Notifier.notify_workflow; off the request path)."""

    def __init__(self, metrics: Any, notifier: Any = None) -> None:
        self.counter = Counter(
            "proctor_workflow_exceptions",
            "Workflow exception events by workflow, step and event: rerouted, gave-up, escalated, stalled, "
            "decided (by a person), resolved (an agent completed an escalated step).",
            ["workflow", "step", "event"],
            registry=metrics.registry,
        )
        self.notifier = notifier

    def event(self, event: WorkflowEvent) -> None:
        self.counter.labels(event.workflow, event.step or "", event.event).inc()
        if self.notifier is not None and event.event in WEBHOOK_EVENTS:
            self.notifier.notify_workflow(event.to_dict())


RecordEvent = Callable[[WorkflowEvent], None]  # DecisionRecorder.write: decisions.jsonl and the OCSF trail


def publish(change: Change, record: RecordEvent, observer: ExceptionObserver) -> None:
    for event in change.events:
        record(event)
        observer.event(event)


# ---------------------------------------------------------------------------- stages
class WorkflowExceptions(Stage):
    """After WorkflowCheck: the exception fields of `context.workflow` (escalated, gave_up,
    rerouted_to, rerouted_away, closed) and a person's part; on the way back, after
    WorkflowAdvance recorded the call: the transitions a failure causes (reroute, give up,
    escalate) and the retry headers, or a completion resolving the step's items."""

    name = "workflow-exceptions"

    def __init__(self, store: Any, record: RecordEvent, observer: ExceptionObserver | None = None,
                 groups_of: Callable[[AgentIdentity], list[str]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.record = record
        self.observer = observer or ExceptionObserver()
        self.groups_of = groups_of or (lambda _identity: [])
        self.clock = clock
        self.failures = 0  # transitions that could not be written (the state store failed)

    def _caller(self, ex: Exchange) -> tuple[str, list[str]]:
        identity = ex.identity
        if identity is None:
            return "", []
        return identity.agent_id, self.groups_of(identity)

    def on_request(self, ex: Exchange) -> None:
        state: WorkflowState | None = ex.stage_data.get(STATE)
        if state is None:
            return
        context = ex.stage_data.get(CONTEXT_EXTRA, {}).get("workflow")
        if isinstance(context, dict):
            agent, groups = self._caller(ex)
            context.update(exception_context(state.step, state.instance, agent, groups))
        if step_attrs(state.instance, state.step.name).get("human"):
            state.human = True  # a person took part in this step: its completion is not autonomous
        if state.step.on_error is not None:
            ex.plan.replaceable_statuses |= failure_statuses(state.step)

    def on_response(self, ex: Exchange) -> Awaitable[None] | None:
        state: WorkflowState | None = ex.stage_data.get(STATE)
        recorded = state.extra.get("recorded") if state is not None else None
        if state is None or recorded is None:
            return None
        outcome, after = recorded
        if after is None:
            return None
        if outcome == "failed" and state.step.on_error is not None:
            return self._failed(ex, state, after)
        if outcome == "completed" and (unresolved(after.attrs, any_step=True)
                                       or {"gave_up", "taken_by"} & set(step_attrs(after, state.step.name))):
            return self._completed(ex, state, after)
        return None

    async def _failed(self, ex: Exchange, state: WorkflowState, after: Instance) -> None:
        agent, groups = self._caller(ex)
        wf, step = state.workflow, state.step
        now = self.clock()
        try:
            done = await apply(self.store, after, lambda i: after_failure(
                wf, step, i, agent, groups, ex.decision_id, now))
        except StoreError as e:
            self.failures += 1
            log.error("decision %s: workflow %s step %s: the failure's exception state could not be written: %s",
                      ex.decision_id, wf.name, step.name, e)
            done = None
        current = after
        if done is not None:
            change, current = done
            if change.attrs is not None:
                current = _with_attrs(current, change.attrs)
            publish(change, self.record, self.observer)
        advice = retry_advice(step, after, current, agent, groups)
        if advice is not None:
            upstream = ex.response.headers.get("retry-after") if ex.response is not None else None
            ex.plan.response_headers.update(later_retry_after(advice.headers(), upstream))

    async def _completed(self, ex: Exchange, state: WorkflowState, after: Instance) -> None:
        agent, _groups = self._caller(ex)
        wf, step = state.workflow, state.step
        now = self.clock()
        try:
            done = await apply(self.store, after, lambda i: after_completion(wf, step, i, agent, ex.decision_id, now))
        except StoreError as e:
            self.failures += 1
            log.error("decision %s: workflow %s step %s: escalations not resolved (state store: %s)",
                      ex.decision_id, wf.name, step.name, e)
            return
        if done is not None:
            publish(done[0], self.record, self.observer)


def _with_attrs(inst: Instance, attrs: dict[str, Any]) -> Instance:
    out = copy.copy(inst)
    out.attrs = attrs
    return out


class WorkflowExceptionConflict(Stage):
    """Right after WorkflowOrder: a deny decided only by @workflow policies, one of them an
    exception (`closed`, `gave-up`, `rerouted`), is a 409 saying what happened and what to
    do instead (the most decisive kind when several deny)."""

    name = "workflow-exception-conflict"
    settles_pending = True

    def would_settle(self, ex: Exchange) -> Refusal | None:
        """The 409 this stage answers the pending deny with, else None (no side effect: monitor
        mode asks it too, proxy/policy/monitor.py)."""
        state: WorkflowState | None = ex.stage_data.get(STATE)
        pending = ex.pending_refusal
        evaluation: PolicyEvaluation | None = ex.stage_data.get(EVALUATION)
        if state is None or pending is None or not pending.reasons or evaluation is None:
            return None
        policies = evaluation.bundle.policies
        values = [policies[pid].annotations.get(ANNOTATION) if pid in policies else None for pid in pending.reasons]
        if any(v not in (*KINDS, "precondition") for v in values):
            return None
        kind = next((k for k in PRECEDENCE if k in values), None)
        if kind is None:
            return None
        cls = ex.classification
        assert cls is not None
        agent = ex.identity.agent_id if ex.identity is not None else ""
        return exception_refusal(kind, state, cls.action, agent, list(pending.reasons))

    def on_request(self, ex: Exchange) -> None:
        refusal = self.would_settle(ex)
        if refusal is not None:
            ex.settle_pending(refusal)


def exception_refusal(kind: str, state: WorkflowState, action: str, agent: str, reasons: list[str]) -> Refusal:
    """The 409 for a step refused because of an exception on its instance."""
    wf, step, inst = state.workflow, state.step, state.instance
    where = f"{action} is step '{step.name}' of workflow '{wf.name}' (instance {state.instance_id})"
    sx = step_attrs(inst, step.name)
    info: dict[str, Any] = {"name": wf.name, "instance": state.instance_id, "step": step.name}
    attrs = inst.attrs if inst is not None else {}
    item = next(iter(unresolved(attrs, step.name)), None)
    if item is not None:
        info["escalation"] = {"id": item.get("id"), "group": item.get("group"), "state": item.get("state"),
                              "taken_by": item.get("taken_by")}
    inbox = (f"the inbox of {item.get('group') or 'the operators'} (escalation {item.get('id')})" if item is not None
             else "the operators")
    if kind == "closed":
        c = closed(inst) or {}
        info["closed"] = {"by": c.get("by"), "at": iso(float(c.get("at") or 0)), "note": c.get("note")}
        detail = (f"{where}: the instance was closed as failed by {c.get('by')}"
                  + (f" ({c.get('note')})" if c.get("note") else "") + ". No step of it can be done any more; "
                  "do not retry. Start a new instance if the work is still needed.")
        title = "Conflict: workflow instance closed"
    elif kind == "gave-up":
        failures = counted_failures(inst, step.name) if inst is not None else 0
        most = step.on_error.retry.max_attempts if step.on_error is not None and step.on_error.retry else failures
        info.update({"failures": failures, "max_attempts": most})
        detail = (f"{where}: it failed {failures} time(s) (at most {most} attempts) and Proctor gave up on it. "
                  f"It waits in {inbox} for a person to allow retries, take it over, or close the instance. "
                  "Do not retry this call; work on other instances meanwhile.")
        title = "Conflict: workflow step gave up"
    else:
        taken = sx.get("taken_by")
        if isinstance(taken, str) and taken:
            info["taken_by"] = taken
            detail = (f"{where}: a person ({taken}) has taken this step over after it failed; it is not an "
                      "agent's to do now. Do not retry; leave this instance's step to them.")
        else:
            to = str(sx.get("rerouted_to") or "")
            info.update({"rerouted_to": to, "rerouted_from": sx.get("rerouted_from")})
            detail = (f"{where}: after repeated failures the step was moved to {to!r}; only {to} may do it on "
                      f"this instance now, not {agent!r}. Do not retry; leave it to {to}.")
        title = "Conflict: workflow step moved to another agent"
    return Refusal(409, title, detail, reasons=reasons, kind=KINDS[kind], extra={"workflow": info})
