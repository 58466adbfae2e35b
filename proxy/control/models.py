"""What the control API accepts: request bodies and query strings as pydantic models.

Every handler reads its body and query string through `read_body` / `read_query` and one of
these models, never from the raw request: an invalid input is answered with a
400 problem+json whose `errors` name each field at fault, and whose `title`
keeps the wording clients already match on ("Reason required", "Bad filter",
"Bad paging"...). proxy/control/openapi.py generates `/v1/openapi.json` from
these models (and the response models in models_responses.py), so what is
documented is what is enforced.

Query strings: an empty value counts as absent; the first of repeated keys
wins; comma-separated lists (`state=pending,approved`) are arrays in the
document (`style: form, explode: false`). Unknown keys are ignored, in queries
and bodies alike (older and newer clients keep working).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

from aiohttp import web
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
)

from ..store.models import APPROVAL_STATES, SUSPENSION_KINDS
from .auth import foreign_origin, problem

MAX_REASON_CHARS = 2000  # as the approval service enforces (proxy/approvals/service.py)
MAX_FILTER_CHARS = 256
MAX_PAGE = 1000
MAX_OFFSET = 2**53  # far past any real table; keeps the SQL integer in range on every backend

ApprovalState = Literal["pending", "approved", "denied", "expired", "forwarded", "cancelled"]
SuspensionKind = Literal["agent", "connector", "action"]
AuditRecordKind = Literal["decision", "approval", "suspension", "policy", "claim", "duplicate", "workflow", "budget"]
# the store's lists stay the source of truth: a new state or kind must be added here too
assert set(get_args(ApprovalState)) == set(APPROVAL_STATES)
assert set(get_args(SuspensionKind)) == set(SUSPENSION_KINDS)


# ----------------------------------------------------------------------------- field types
def _clamp(lo: int, hi: int) -> AfterValidator:
    # Paging values out of range are clamped, not refused (the API always did so).
    return AfterValidator(lambda v: min(max(v, lo), hi))


def _csv(value: Any) -> Any:
    """`a,b,,c` -> ["a", "b", "c"] (query strings carry lists comma-separated)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _cut(limit: int) -> AfterValidator:
    return AfterValidator(lambda v: v[:limit])


# An id or suspension target: printable, 1-256 characters (it is shown in consoles and logs).
TARGET_PATTERN = r"^[^\x00-\x1f\x7f]{1,256}$"
Target = Annotated[str, StringConstraints(pattern=TARGET_PATTERN)]
# A filter value: at most 256 characters.
FilterText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=MAX_FILTER_CHARS)]
# A reason a person must give: not blank once trimmed, at most 2000 characters.
RequiredReason = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_REASON_CHARS),
    Field(description="Mandatory (not blank); recorded.", json_schema_extra={"pattern": r"\S"}),
]
# A reason recorded as given, trimmed and cut at 2000 characters (longer ones are not refused).
RecordedReason = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1),
    _cut(MAX_REASON_CHARS),
    Field(description="Mandatory (not blank); recorded, cut at 2000 characters.", json_schema_extra={"pattern": r"\S"}),
]
OptionalReason = Annotated[str, StringConstraints(strip_whitespace=True), _cut(MAX_REASON_CHARS)]


class InputModel(BaseModel):
    """A body or query model; says how its 400 is titled."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    # the problem title when this field is the first one at fault (else BAD_TITLE)
    FIELD_TITLES: ClassVar[dict[str, str]] = {}
    BAD_TITLE: ClassVar[str] = "Bad request"


# ----------------------------------------------------------------------------- request bodies
class DecisionRequest(InputModel):
    """An approver's vote: the reason is mandatory and recorded."""

    FIELD_TITLES = {"reason": "Reason required"}
    reason: RequiredReason


class SuspensionRequest(InputModel):
    """Suspend an agent, a connector or an action (kill switch)."""

    FIELD_TITLES = {"kind": "Bad suspension", "target": "Bad target", "reason": "Reason required"}
    kind: SuspensionKind
    target: Target = Field(description="The agent id, connector name or action (1-256 printable characters).")
    reason: RecordedReason


class SuspendAgentRequest(InputModel):
    FIELD_TITLES = {"reason": "Reason required"}
    reason: RecordedReason


class ResumeRequest(InputModel):
    """The reason is optional when lifting a suspension."""

    FIELD_TITLES = {"reason": "Bad reason"}
    reason: OptionalReason = Field("", description="Recorded with the resumption.")


class AgentRegistration(InputModel):
    """Register (or update) an agent in the registry."""

    FIELD_TITLES = {"id": "Bad agent id"}
    BAD_TITLE = "Bad field"
    id: Target = Field(description="The agent id (1-256 printable characters), as its tokens' subject.")
    owner: str = Field("", max_length=1000)
    team: str = Field("", max_length=1000)
    description: str = Field("", max_length=1000)


class PushRequest(InputModel):
    """A policy set for the whole fleet (`proctor policy push DIR`)."""

    FIELD_TITLES = {"files": "Files required", "reason": "Reason required"}
    files: dict[str, str] = Field(description="File name -> text: the schema file, *.cedar policies and entities.json.")
    reason: RecordedReason


class RollbackRequest(InputModel):
    """Restore an earlier policy revision."""

    FIELD_TITLES = {"revision": "Revision required", "reason": "Reason required"}
    revision: str = Field(min_length=1, max_length=256, description="A revision from GET /v1/policies/revisions.")
    reason: RecordedReason


# ----------------------------------------------------------------------------- query strings
class ApprovalListQuery(InputModel):
    FIELD_TITLES = {"limit": "Bad paging", "offset": "Bad paging"}
    BAD_TITLE = "Bad filter"
    state: Annotated[list[ApprovalState] | None, BeforeValidator(_csv)] = Field(
        None, description="Comma-separated states; all states when absent.", examples=[["pending", "approved"]]
    )
    agent: FilterText | None = Field(None, description="Only this agent's requests.")
    action: FilterText | None = Field(None, description="Only this action.")
    limit: Annotated[int, _clamp(1, MAX_PAGE)] = Field(100, description="Page size, clamped to 1..1000.")
    offset: Annotated[int, _clamp(0, MAX_OFFSET)] = Field(0, description="Approvals to skip (negative counts as 0).")


# Fleet views (control/fleet_views.py): every live replica, or only the one asked.
FleetScope = Literal["fleet", "replica"]


class ActivityQuery(InputModel):
    FIELD_TITLES = {"limit": "Bad paging", "before_sequence": "Bad paging"}
    BAD_TITLE = "Bad filter"
    limit: Annotated[int, _clamp(1, MAX_PAGE)] = Field(100, description="Page size, clamped to 1..1000.")
    before_sequence: int | None = Field(
        None, description="Only events older than this sequence number: the previous page's `next_before_sequence`."
    )
    agent: FilterText | None = Field(None, description="The agent the event is about.")
    action: FilterText | None = Field(
        None, description="The operation or approval action; exact, or a prefix when it ends with `*` (`erp.*`)."
    )
    decision: Annotated[list[FilterText] | None, BeforeValidator(_csv)] = Field(
        None, description="Comma-separated: allow, deny, hold, or a state change (requested, approved, suspended...)."
    )
    record: Annotated[list[AuditRecordKind] | None, BeforeValidator(_csv)] = Field(
        None, description="Comma-separated record kinds (`duplicate`: writes not forwarded because they repeated "
        "earlier work; `claim`: claims acquired, moved, released or expired; `workflow`: workflow exceptions; "
        "`budget`: budget windows at their soft threshold or exhausted)."
    )
    scope: FleetScope = Field(
        "fleet", description="`fleet` (default): every live replica's events, merged newest first (the replicas "
        "the store lists are asked with your token); `replica`: this replica's own audit file only. "
        "`before_sequence` pages this replica's file (a sequence is one replica's): it implies `replica`."
    )
    cursor: Annotated[str, StringConstraints(max_length=8192)] | None = Field(
        None, description="Fleet paging: the previous page's `next_cursor`."
    )


class ExplainQuery(InputModel):
    BAD_TITLE = "Bad request"
    scope: FleetScope = Field(
        "fleet", description="`fleet` (default): look the decision up on every live replica when this one did not "
        "make it; `replica`: this replica's decision record only."
    )


class ResumeQuery(InputModel):
    reason: OptionalReason = Field("", description="Recorded with the resumption.")


# ----------------------------------------------------------------------------- path parameters (documented)
class ApprovalPath(InputModel):
    id: str = Field(min_length=1, description="Approval id (`apr_` and 20 URL-safe characters).")


class DecisionPath(InputModel):
    id: str = Field(min_length=1, max_length=256, description="The decision id (`X-Proctor-Decision-Id`).")


class AgentPath(InputModel):
    id: str = Field(min_length=1, description="Agent id.")


class SuspensionPath(InputModel):
    kind: SuspensionKind = Field(description="An unknown kind is 404.")
    target: str = Field(min_length=1, description="The suspended agent id, connector name or action.")


# ----------------------------------------------------------------------------- reading them
M = TypeVar("M", bound=InputModel)


def _message(err: Any) -> str:
    """A person-readable sentence for one pydantic error (the value itself is never echoed)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "string_too_short":
        return "must not be blank" if ctx.get("min_length") == 1 else f"is shorter than {ctx['min_length']} characters"
    if kind == "string_too_long":
        return f"is longer than {ctx['max_length']} characters"
    if kind == "string_pattern_mismatch" and ctx.get("pattern") == TARGET_PATTERN:
        return "must be 1-256 printable characters"
    if kind == "string_type":
        return "must be a string"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be an integer"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind in ("model_type", "dict_type"):
        return "must be a JSON object"
    return str(err["msg"])


def invalid(model: type[InputModel], e: ValidationError, where: str) -> web.Response:
    """400 problem+json: `errors` names every field at fault (never echoing the value).

    Titled by the first field at fault: "<Field> too long" for an overlong value, else the model's
    title for that field (the wording clients match on), else its generic title."""
    details = e.errors(include_url=False, include_input=False)
    errors = [{"field": ".".join(str(part) for part in err["loc"]), "in": where, "message": _message(err)}
              for err in details]
    first = str(details[0]["loc"][0]) if details and details[0]["loc"] else ""
    if details and details[0]["type"] == "string_too_long" and first:
        title = f"{first.replace('_', ' ').capitalize()} too long"
    else:
        title = model.FIELD_TITLES.get(first, model.BAD_TITLE)
    detail = "; ".join(f"{x['field']} {x['message']}" if x["field"] else x["message"] for x in errors)
    return problem(400, title, detail, extra={"errors": errors})


def read_query(request: web.Request, model: type[M]) -> M | web.Response:
    q = request.query
    raw = {}
    for key in model.model_fields:
        value = q.get(key)  # the first of repeated keys
        if value:  # empty means absent
            raw[key] = value
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        return invalid(model, e, "query")


async def read_body(request: web.Request, model: type[M], *, cross_origin: str, hint: str,
                    optional: bool = False, raw: bytes | None = None) -> M | web.Response:
    """A state-changing call's JSON body: same-origin (CSRF), application/json, a JSON object, valid.

    `optional`: an empty body stands for `{}`. `raw`: the body, already read by the caller (a
    route that allows more than the control API's usual size)."""
    if foreign_origin(request):
        return problem(403, "Cross-origin request refused", cross_origin)
    if optional and not request.can_read_body:
        return model.model_validate({})
    if request.content_type != "application/json":
        return problem(415, "JSON required", f"send {hint} as application/json")
    try:
        body = json.loads(raw if raw is not None else await request.read())
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        return problem(400, "Bad JSON", "the body is not valid JSON")
    if not isinstance(body, dict):
        return problem(400, "Bad JSON", f"the body must be a JSON object: {hint}")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        return invalid(model, e, "body")
