"""Workflow definitions: YAML beside the connectors, validated like manifests (docs/workflows.md).

    name: procure-to-pay
    sla_seconds: 604800
    cost: {currency: EUR}
    steps:
      - name: requisition
        actions: [erp.requisition.create]
        objects:
          - {type: Requisition, from: response, path: d.PurchaseRequisition}
      - name: quote
        actions: [erp.quote.create]
        requires: [requisition]
        objects:
          - {type: Requisition, from: field, name: requisition}   # finds the instance
          - {type: Quote, from: response, path: d.SupplierQuotation}  # links the new object

A step is one or more connector actions. An *instance* of the workflow is keyed by
the business objects its steps name: values the request carries (path parameters,
declared body values, query parameters) find the instance; values the answer
carries (JSON fields, a header) link new objects to it, so the purchase order the
ERP numbers is found again by the goods receipt that names it.

`load_workflows` reads every `*.yaml` of a directory and reports every problem at
once (unknown keys, unknown or shared actions, cyclic or unknown `requires`, steps
without actions, object values no route of the action declares).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..connectors.manifest import ConnectorManifest, ManifestError

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_TYPE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# The export's own object types (proxy/workflows/export.py); `_`-prefixed types are the fallbacks'
RESERVED_OBJECT_TYPES = frozenset({"WorkflowInstance", "Agent"})
REQUEST_SOURCES = ("param", "field", "query")  # known when the request is decided: find the instance
RESPONSE_SOURCES = ("response", "header")  # known when the answer comes back: link new objects


class WorkflowError(ManifestError):
    """Invalid workflow definitions: the message lists every problem, one per line. (A kind
    of ManifestError: definitions beside the connectors, refused at the same places.)"""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ObjectRef(_Strict):
    """A business object a step names: its type and where its id is found."""

    type: str = Field(description="Object type, e.g. PurchaseOrder (an OCEL object type too).")
    from_: Literal["param", "field", "query", "response", "header"] = Field(alias="from")
    name: str | None = Field(None, description="param/field/query: the declared value's name; header: its name.")
    path: str | None = Field(None, description="response: a JSON path in the answer's body, e.g. d.PurchaseOrder.")
    pattern: str | None = Field(None, description="header: a regex whose first group is the id (else the whole value).")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if not _TYPE_RE.match(v) or v.startswith("_"):
            raise ValueError(f"object type {v!r} must be a letter then letters, digits or _")
        if v in RESERVED_OBJECT_TYPES:
            raise ValueError(f"object type {v!r} is reserved (the process-mining export's own types: "
                             f"{', '.join(sorted(RESERVED_OBJECT_TYPES))})")
        return v

    @model_validator(mode="after")
    def _where(self) -> "ObjectRef":
        if self.from_ == "response":
            if not self.path:
                raise ValueError("an object from the response needs `path` (a JSON path in the body)")
            if self.name is not None:
                raise ValueError("an object from the response takes `path`, not `name`")
        elif not self.name:
            raise ValueError(f"an object from {self.from_} needs `name`")
        if self.pattern is not None:
            if self.from_ != "header":
                raise ValueError("`pattern` applies to objects from a header only")
            try:
                compiled = re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {e}") from None
            if compiled.groups < 1:
                raise ValueError(f"pattern {self.pattern!r} needs a group capturing the id")
        return self

    @property
    def on_request(self) -> bool:
        return self.from_ in REQUEST_SOURCES


class CompletionCheck(_Strict):
    """When a forwarded call completes its step (default: any 2xx answer)."""

    status: list[int] = Field(default_factory=list, description="Statuses that complete the step (default 2xx).")
    json_equals: dict[str, str | int | bool] = Field(
        default_factory=dict, alias="json",
        description="JSON paths in the answer and the value each must have, e.g. {d.Status: posted}.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("status")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        bad = [s for s in v if not 100 <= s <= 599]
        if bad:
            raise ValueError(f"statuses {bad} are not HTTP statuses")
        return v


class CostSpec(_Strict):
    """What a step costs, in the workflow's currency (or units): per forwarded call and per completion."""

    per_call: Decimal = Field(Decimal(0), ge=0)
    per_completion: Decimal = Field(Decimal(0), ge=0)


_GROUP_RE = r"^[A-Za-z0-9_.:@-]{1,128}$"  # a people group, spelled as approval groups are
_RESERVED_AGENTS = ("group:", "human:")  # pseudo-holders for people (coordination/claims.py)


class RetrySpec(_Strict):
    """The agent is told when to retry a failed call (`Retry-After`); after `max_attempts`
    failures the step gives up until a person acts."""

    max_attempts: int = Field(3, ge=1, le=100, description="Failures after which the step gives up.")
    after_seconds: int = Field(60, ge=1, le=7 * 24 * 3600, description="Retry-After on a failed call.")


class EscalateSpec(_Strict):
    group: str = Field(pattern=_GROUP_RE, description="The people group whose inbox gets the instance (letters, "
                                                      "digits, _ . : @ -, as approval groups).")
    after_failures: int = Field(1, ge=1, le=100)


class RerouteSpec(_Strict):
    to: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f\x7f]+$",
                    description="The agent id (or a group of agents, as the agent's token names its groups) "
                                "the step moves to.")
    after_failures: int = Field(1, ge=1, le=100)

    @field_validator("to")
    @classmethod
    def _agent(cls, v: str) -> str:
        if v.startswith(_RESERVED_AGENTS):
            raise ValueError(f"reroute.to {v!r}: ids starting group: or human: name people; a step is rerouted to "
                             "an agent (use escalate for people)")
        return v


class OnError(_Strict):
    """What happens when a step fails (docs/workflows.md, "Exceptions"). Failures are counted
    per instance and step, from the last time a person allowed retries (or the step moved)."""

    retry: RetrySpec | None = None
    escalate: EscalateSpec | None = None
    reroute: RerouteSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "OnError":
        if self.retry is None and self.escalate is None and self.reroute is None:
            raise ValueError("on_error needs at least one of retry, escalate, reroute")
        if self.retry is not None:
            most = self.retry.max_attempts
            if self.escalate is not None and self.escalate.after_failures > most:
                raise ValueError(f"escalate.after_failures ({self.escalate.after_failures}) is more than "
                                 f"retry.max_attempts ({most}): the step gives up (and escalates) after {most} "
                                 "failures, so it would never escalate by count")
            if self.reroute is not None and self.reroute.after_failures > most:
                raise ValueError(f"reroute.after_failures ({self.reroute.after_failures}) is more than "
                                 f"retry.max_attempts ({most}): the step gives up after {most} failures, "
                                 "before it could move")
        return self


class StepSpec(_Strict):
    name: str
    actions: list[str] = Field(default_factory=list)
    requires: list[str] = Field(default_factory=list)
    objects: list[ObjectRef] = Field(default_factory=list)
    complete_when: CompletionCheck | None = None
    sla_seconds: int | None = Field(None, ge=1, le=365 * 24 * 3600)
    cost: CostSpec | None = None
    on_error: OnError | None = None
    optional: bool = Field(False, description="Not needed for the instance to complete.")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"step name {v!r} must be lower-case letters, digits, _ or - (starting with a letter)")
        return v

    @property
    def request_objects(self) -> list[ObjectRef]:
        return [o for o in self.objects if o.on_request]

    @property
    def response_objects(self) -> list[ObjectRef]:
        return [o for o in self.objects if not o.on_request]

    def completes(self, status: int, body: object) -> bool:
        check = self.complete_when
        if check is None or not check.status:
            ok = 200 <= status < 300
        else:
            ok = status in check.status
        if not ok or check is None or not check.json_equals:
            return ok
        from .correlate import json_value

        return all(json_value(body, path) == want for path, want in check.json_equals.items())


class Correlation(_Strict):
    """How an instance is found when no business object names it (docs/workflows.md, "Correlation")."""

    fallback: Literal["none", "baggage", "trace"] = "none"
    baggage_key: str = Field("proctor.workflow", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")


class WorkflowCost(_Strict):
    currency: str = Field("", max_length=16, pattern=r"^[A-Za-z0-9 _.-]*$",
                          description="An ISO 4217 code (EUR) or any unit name (credits).")


class WorkflowSpec(_Strict):
    name: str
    description: str = ""
    sla_seconds: int | None = Field(None, ge=1, le=365 * 24 * 3600)
    escalate_group: str | None = Field(None, pattern=_GROUP_RE,
                                       description="The people group that gets stalled instances (and give-ups) "
                                                   "whose step names no escalate group (default: operators).")
    cost: "WorkflowCost" = Field(default_factory=lambda: WorkflowCost.model_validate({}),
                                 description="{currency: EUR}: the unit step costs are in (per-step costs go on "
                                             "the steps).")
    correlation: Correlation = Field(default_factory=lambda: Correlation.model_validate({}))
    steps: list[StepSpec] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"workflow name {v!r} must be lower-case letters, digits, _ or - (starting with a letter)")
        return v

    @property
    def currency(self) -> str:
        return self.cost.currency

    def step(self, name: str) -> StepSpec:
        return next(s for s in self.steps if s.name == name)

    @property
    def required_steps(self) -> list[str]:
        """The steps an instance must complete to be complete (all but the optional ones)."""
        return [s.name for s in self.steps if not s.optional]


@dataclass(frozen=True)
class Governed:
    """The step an action is in."""

    workflow: WorkflowSpec
    step: StepSpec


@dataclass(frozen=True)
class Workflows:
    """Every loaded definition, and which step each governed action is."""

    specs: tuple[WorkflowSpec, ...] = ()

    def __post_init__(self) -> None:
        index = {a: Governed(w, s) for w in self.specs for s in w.steps for a in s.actions}
        object.__setattr__(self, "_by_action", index)

    def for_action(self, action: str) -> Governed | None:
        return self._by_action.get(action)  # type: ignore[attr-defined, no-any-return]

    @property
    def actions(self) -> frozenset[str]:
        return frozenset(self._by_action)  # type: ignore[attr-defined]

    def get(self, name: str) -> WorkflowSpec | None:
        return next((w for w in self.specs if w.name == name), None)

    def __bool__(self) -> bool:
        return bool(self.specs)


# ---------------------------------------------------------------------------- validation
def _cycle(steps: list[StepSpec]) -> list[str] | None:
    """One dependency cycle (step names, first repeated at the end), or None."""
    graph = {s.name: [r for r in s.requires] for s in steps}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in graph.get(n, []):
            if m not in graph:
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if state.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for s in steps:
        if state.get(s.name) is None:
            found = visit(s.name)
            if found:
                return found
    return None


def _declared(manifests: Iterable[ConnectorManifest]) -> dict[str, dict[str, set[str]]]:
    """action -> {"param": names, "field": names, "query": names} over every route declaring it."""
    out: dict[str, dict[str, set[str]]] = {}
    for m in manifests:
        for r in m.routes:
            pairs = [(r.action, r.body)] if r.jsonrpc is None else [(op.action, op.body or {}) for op in r.jsonrpc]
            for action, body in pairs:
                if not action:
                    continue
                d = out.setdefault(action, {"param": set(), "field": set(), "query": set()})
                d["param"] |= set(r.params) | set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", r.path))
                d["field"] |= set(body)
                d["query"] |= set(r.query)
    return out


def check_workflows(specs: list[WorkflowSpec], manifests: Iterable[ConnectorManifest] | None) -> list[str]:
    """Every problem across the definitions (empty: they are valid). `manifests` None skips
    the checks against connector actions (a definition checked on its own)."""
    problems: list[str] = []
    declared = _declared(manifests) if manifests is not None else None
    owner: dict[str, str] = {}
    names = [w.name for w in specs]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"workflow {dup!r} is defined more than once")
    for w in specs:
        where = f"workflow {w.name}"
        step_names = [s.name for s in w.steps]
        for dup in sorted({n for n in step_names if step_names.count(n) > 1}):
            problems.append(f"{where}: step {dup!r} is defined more than once")
        for s in w.steps:
            at = f"{where}, step {s.name}"
            if not s.actions:
                problems.append(f"{at}: no actions (a step is one or more connector actions)")
            for r in s.requires:
                if r not in step_names:
                    problems.append(f"{at}: requires unknown step {r!r} (steps: {', '.join(step_names)})")
                elif r == s.name:
                    problems.append(f"{at}: requires itself")
            for a in s.actions:
                if a in owner:
                    problems.append(f"{at}: action {a} is already step {owner[a]} (an action is one step of one "
                                    "workflow)")
                else:
                    owner[a] = f"{w.name}/{s.name}"
                if declared is not None and a not in declared:
                    problems.append(f"{at}: unknown action {a} (no connector route declares it)")
            if s.requires and not s.request_objects and w.correlation.fallback == "none":
                problems.append(
                    f"{at}: requires earlier steps but names no object from the request (objects from param, "
                    "field or query) to find its instance by, and no correlation fallback is configured")
            if declared is not None:
                for o in s.request_objects:
                    assert o.name is not None
                    lacking = [a for a in s.actions if a in declared and o.name not in declared[a][o.from_]]
                    if lacking:
                        problems.append(f"{at}: object {o.type} from {o.from_} {o.name!r}: no such declared "
                                        f"{o.from_} on the routes of {', '.join(lacking)}")
        cycle = _cycle(w.steps)
        if cycle:
            problems.append(f"{where}: requires form a cycle: {' -> '.join(cycle)}")
    return problems


def _pydantic_problems(where: str, e: ValidationError) -> list[str]:
    out = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        out.append(f"{where}: {loc + ': ' if loc else ''}{err['msg']}")
    return out


def load_workflows(directory: Path | None, manifests: Iterable[ConnectorManifest] | None = None) -> Workflows:
    """Every definition in `directory` (`*.yaml`, `*.yml`), validated together; WorkflowError
    listing every problem. None (or a missing directory): no workflows."""
    if directory is None:
        return Workflows()
    directory = Path(directory)
    if not directory.is_dir():
        raise WorkflowError(f"workflows directory {directory} does not exist")
    problems: list[str] = []
    specs: list[WorkflowSpec] = []
    for f in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            raw = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            problems.append(f"{f.name}: not readable YAML: {e}")
            continue
        if not isinstance(raw, dict):
            problems.append(f"{f.name}: a workflow definition is a mapping (name, steps, ...)")
            continue
        try:
            specs.append(WorkflowSpec.model_validate(raw))
        except ValidationError as e:
            problems += _pydantic_problems(f.name, e)
    problems += check_workflows(specs, list(manifests) if manifests is not None else None)
    if problems:
        raise WorkflowError("invalid workflow definitions:\n  " + "\n  ".join(problems))
    return Workflows(tuple(specs))
