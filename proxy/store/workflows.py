"""Workflow instances, their objects and their step events in the store (docs/workflows.md).

Three tables (schema version 5):

- `proctor_wf_instances`: one row per instance: its workflow, state (`running`,
  `completed`), when it started, last moved and completed, the steps completed (in
  order of first completion), a tally per step (attempts, failures, completions,
  refusals), the cost so far and a version;
- `proctor_wf_objects`: which business object (type, id) belongs to which instance,
  unique per workflow, so an object names one instance;
- `proctor_wf_events`: one row per step event (`completed`, `failed`, `refused`),
  the history KPIs and the process-mining export are computed from.

`apply_event` is the pure part of an update: both backends read the instance
under their write lock (SQLite `BEGIN IMMEDIATE`, PostgreSQL `SELECT ... FOR
UPDATE`), apply it and write the result in the same transaction, so agents
working steps of one instance at once on any replica never lose an update.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

RUNNING = "running"
COMPLETED = "completed"
OUTCOMES = ("completed", "failed", "refused")

INSTANCE_COLUMNS: tuple[str, ...] = ("id", "workflow", "state", "started_at", "updated_at", "completed_at",
                                     "completed", "tally", "cost", "last_step", "version", "attrs")
INSTANCE_SELECT = ", ".join(INSTANCE_COLUMNS)
EVENT_COLUMNS: tuple[str, ...] = ("instance_id", "workflow", "step", "action", "agent", "decision_id", "outcome",
                                  "status", "time", "duration_ms", "approval_wait_ms", "human", "cost", "objects")
EVENT_SELECT = "seq, " + ", ".join(EVENT_COLUMNS)

ObjectKey = tuple[str, str]


def new_instance_id() -> str:
    return "wfi_" + secrets.token_urlsafe(15)


_FLAG_RE = re.compile(r"^[a-z]{1,32}$")


def flag_pattern(key: str) -> str:
    """The LIKE pattern of an attrs text with the top-level key `key` (a lower-case word, so
    neither % nor _ is in it). Quotes inside JSON strings are escaped (\\"), so the pattern
    matches keys; a value or nested key of that name is a false positive the caller discards."""
    if not _FLAG_RE.match(key):
        raise ValueError(f"attrs flag {key!r} must be 1-32 lower-case letters")
    return f'%"{key}"%'


@dataclass
class StepTally:
    attempts: int = 0  # forwarded calls of the step (completed or failed)
    failures: int = 0
    completions: int = 0
    refusals: int = 0  # calls refused because the step's prerequisites were not done

    def as_dict(self) -> dict[str, int]:
        return {"attempts": self.attempts, "failures": self.failures, "completions": self.completions,
                "refusals": self.refusals}


@dataclass
class Instance:
    id: str
    workflow: str
    state: str
    started_at: float
    updated_at: float
    completed_at: float | None = None
    completed: list[str] = field(default_factory=list)
    tally: dict[str, StepTally] = field(default_factory=dict)
    cost: Decimal = Decimal(0)
    last_step: str = ""
    version: int = 0
    attrs: dict[str, Any] = field(default_factory=dict)  # exceptions: escalations, reroutes (docs/workflows.md)

    def step_tally(self, step: str) -> StepTally:
        return self.tally.get(step) or StepTally()


@dataclass(frozen=True)
class StepEvent:
    instance_id: str
    workflow: str
    step: str
    action: str
    agent: str
    decision_id: str
    outcome: str  # completed | failed | refused
    status: int | None  # what the upstream answered (None: no answer, or refused before forwarding)
    time: float  # epoch seconds the call was decided
    duration_ms: float  # the call's time in Proctor and the upstream, approval waits excluded
    approval_wait_ms: float | None = None  # held for a person before it was forwarded
    human: bool = False  # a person took part (an approval)
    cost: Decimal = Decimal(0)
    objects: tuple[ObjectKey, ...] = ()  # the business objects the call named (request and answer)
    seq: int | None = None  # the store's order (None before it is stored)


def apply_event(inst: Instance, event: StepEvent, required: Sequence[str]) -> Instance:
    """The instance after `event` (pure: the caller persists it)."""
    t = inst.tally.setdefault(event.step, StepTally())
    if event.outcome == "refused":
        t.refusals += 1
    else:
        t.attempts += 1
        if event.outcome == "failed":
            t.failures += 1
        else:
            t.completions += 1
            if event.step not in inst.completed:
                inst.completed.append(event.step)
    inst.cost += event.cost
    inst.updated_at = max(inst.updated_at, event.time)
    if event.outcome != "refused":
        inst.last_step = event.step
    if inst.state != COMPLETED and required and all(s in inst.completed for s in required):
        inst.state = COMPLETED
        inst.completed_at = event.time
    inst.version += 1
    return inst


def _finite(x: float, what: str) -> float:
    if not math.isfinite(float(x)):
        raise ValueError(f"workflow {what} must be finite")
    return float(x)


def instance_params(i: Instance) -> list[Any]:
    """Values in INSTANCE_COLUMNS order."""
    return [i.id, i.workflow, i.state, _finite(i.started_at, "started_at"), _finite(i.updated_at, "updated_at"),
            None if i.completed_at is None else _finite(i.completed_at, "completed_at"),
            json.dumps(i.completed), json.dumps({k: v.as_dict() for k, v in i.tally.items()}), str(i.cost),
            i.last_step, int(i.version), json.dumps(i.attrs, default=str)]


def _decimal(v: Any) -> Decimal:
    try:
        return Decimal(str(v))
    except (InvalidOperation, ValueError):
        return Decimal(0)


def instance_from_row(row: Sequence[Any]) -> Instance:
    r = list(row)
    tally_raw = json.loads(r[7]) if isinstance(r[7], str) else (r[7] or {})
    return Instance(
        id=str(r[0]), workflow=str(r[1]), state=str(r[2]), started_at=float(r[3]), updated_at=float(r[4]),
        completed_at=None if r[5] is None else float(r[5]),
        completed=list(json.loads(r[6]) if isinstance(r[6], str) else r[6] or []),
        tally={k: StepTally(**{f: int(v.get(f, 0)) for f in ("attempts", "failures", "completions", "refusals")})
               for k, v in tally_raw.items()},
        cost=_decimal(r[8]), last_step=str(r[9] or ""), version=int(r[10]),
        attrs=dict(json.loads(r[11]) if isinstance(r[11], str) else r[11] or {}),
    )


def event_params(e: StepEvent) -> list[Any]:
    """Values in EVENT_COLUMNS order."""
    if e.outcome not in OUTCOMES:
        raise ValueError(f"workflow event outcome {e.outcome!r} is not one of {OUTCOMES}")
    return [e.instance_id, e.workflow, e.step, e.action, e.agent, e.decision_id, e.outcome, e.status,
            _finite(e.time, "event time"), _finite(e.duration_ms, "duration"),
            None if e.approval_wait_ms is None else _finite(e.approval_wait_ms, "approval wait"),
            bool(e.human), str(e.cost), json.dumps([list(o) for o in e.objects])]


def event_from_row(row: Sequence[Any]) -> StepEvent:
    r = list(row)
    objects = json.loads(r[14]) if isinstance(r[14], str) else r[14] or []
    return StepEvent(
        seq=int(r[0]), instance_id=str(r[1]), workflow=str(r[2]), step=str(r[3]), action=str(r[4]),
        agent=str(r[5]), decision_id=str(r[6]), outcome=str(r[7]), status=None if r[8] is None else int(r[8]),
        time=float(r[9]), duration_ms=float(r[10]), approval_wait_ms=None if r[11] is None else float(r[11]),
        human=bool(r[12]), cost=_decimal(r[13]), objects=tuple((str(t), str(i)) for t, i in objects),
    )


WF_OBJECT_COLUMNS: tuple[str, ...] = ("workflow", "object_type", "object_id", "instance_id", "step", "linked_at")
WF_OBJECT_SELECT = ", ".join(WF_OBJECT_COLUMNS)
# an instance read through one of its objects (o: proctor_wf_objects, i: proctor_wf_instances)
WF_JOINED = ", ".join(f"i.{c}" for c in INSTANCE_COLUMNS)
# UPDATE ... SET every column but id (SQLite `?` placeholders; PostgreSQL $2.. with id $1)
WF_SET = ", ".join(f"{c} = ?" for c in INSTANCE_COLUMNS[1:])
WF_SET_PG = ", ".join(f"{c} = ${n}" for n, c in enumerate(INSTANCE_COLUMNS[1:], start=2))


@dataclass(frozen=True)
class WorkflowObject:
    """A business object that names an instance: linked by `step` at `linked_at`."""

    workflow: str
    object_type: str
    object_id: str
    instance_id: str
    step: str
    linked_at: float


def object_from_row(row: Sequence[Any]) -> WorkflowObject:
    w, t, i, inst, step, at = tuple(row)
    return WorkflowObject(str(w), str(t), str(i), str(inst), str(step), float(at))
