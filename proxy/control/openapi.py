"""The control API's OpenAPI 3.1 document, generated from the route table below and the models.

Nothing here is written by hand but the route table: one `Route` per endpoint
(method, path, summary, who may call it, its path/query/body models and its
answers). The document served at `GET /v1/openapi.json` is built from it
once, at import: the schemas come from the pydantic models (proxy/control/
models.py for what is accepted, models_responses.py for what is answered)
through pydantic's JSON Schema generator, so the validation a handler applies
and the document cannot disagree.

A route registered in the app but missing here fails tests/test_openapi.py;
tests/test_control_api_fuzz.py runs schemathesis against the live document.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from . import models as rq
from . import models_responses as rs
from .claims_api import (
    ClaimAcquired,
    ClaimAcquireRequest,
    ClaimList,
    ClaimListQuery,
    ClaimPath,
    ClaimRelease,
    ClaimReleaseRequest,
    ClaimTransfer,
    ClaimTransferRequest,
    Inbox,
)
from .budgets_api import BudgetDetail, BudgetList, BudgetPath, BudgetQuery, BudgetShowQuery
from .duplicates_api import DuplicateList, DuplicateListQuery
from .rate_limits_api import RateLimitList, RateLimitQuery
from .workflow_export_api import ExportQuery, OcelLog
from . import workflow_inbox_api as wi
from .workflows_api import (InstanceDetail, InstanceList, InstanceListQuery, InstancePath, KpiDocument, KpiQuery,
                            WorkflowList)

REF = "#/components/schemas/{model}"
JSON = "application/json"
PROBLEM = "application/problem+json"

# Who may call: the security requirement alternatives of each kind of caller.
SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "public": [],  # health and status: the control port is meant for operators, not agents
    "approver": [{"approverBearer": []}],
    "operator": [{"operatorBearer": []}],
    "agent-or-approver": [{"agentBearer": []}, {"approverBearer": []}],
    "agent-or-operator": [{"agentBearer": []}, {"operatorBearer": []}],
}

# The error answers routes share (problem+json), by status.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The input is invalid: `errors` names each field at fault (bad JSON, filter, paging, "
          "reason...). A request line or header over 8 KiB is refused by the HTTP parser itself, as text/plain."),
    401: ("Unauthorized", "No token, or the token failed verification (expired, wrong audience, unknown issuer...)."),
    403: ("Forbidden", "Refused: a cross-site Origin; for approvals, the approver's own request or not in an "
          "approving group; for operator routes, not in the operators' group."),
    404: ("NotFound", "No such approval, agent, suspension or revision (for this caller)."),
    409: ("Conflict", "No longer possible: the approval is decided or expired, this approver already voted, a "
          "rollback could not take effect, or another agent holds the claim."),
    413: ("PayloadTooLarge", "The body is over 64 KiB (text/plain, from the HTTP server)."),
    415: ("UnsupportedMediaType", "The body must be application/json."),
    422: ("Unprocessable", "Well-formed but not possible here (e.g. no claim is declared on that resource type)."),
    503: ("Unavailable", "The state store or the identity provider cannot be reached; try again."),
}


@dataclass(frozen=True)
class Reply:
    """One documented answer: a model (JSON), or a media type with a free-form schema."""

    status: int
    description: str
    model: type[BaseModel] | None = None
    media: str = JSON
    schema: dict[str, Any] | None = None  # for non-model bodies (text, event streams, this document)
    headers: dict[str, Any] | None = None
    extensions: dict[str, Any] | None = None


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation_id: str
    summary: str
    tag: str
    security: str
    replies: tuple[Reply, ...]
    errors: tuple[int, ...] = ()
    path_model: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    description: str | None = None
    extensions: dict[str, Any] = field(default_factory=dict)


AUTH = (401, 503)  # every authenticated route: no/bad token, identity provider down
OPERATOR = (401, 403, 503)
DOWNLOAD = {"Content-Disposition": {"description": "attachment; a file name such as proctor-workflows.ocel.json.",
                                   "schema": {"type": "string"}}}
RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before asking again (pending only).",
                               "schema": {"type": "integer"}}}


def _decide(decision: str) -> Route:
    verb = "Approve" if decision == "approve" else "Deny"
    return Route(
        "post", f"/v1/approvals/{{id}}/{decision}", f"{decision}Approval", f"{verb} a held request", "approvals",
        "approver",
        (Reply(200, "The vote was recorded; the approval as it now stands (still `pending` while other groups' "
               "quorums are not met).", rs.Approval),),
        (400, 401, 403, 404, 409, 415, 503), path_model=rq.ApprovalPath, body=rq.DecisionRequest,
        description="Requires a JSON body with a reason. An approver cannot decide their own request, must be in "
        "one of the approval's groups (or the escalation group once escalated) and votes once. Requests with a "
        "foreign `Origin` header are refused (CSRF).",
    )


# ----------------------------------------------------------------------------- the route table
ROUTES: tuple[Route, ...] = (
    # health and counters (control/api.py)
    Route("get", "/healthz", "healthz", "Liveness, the policy reload status and each component's state", "health",
          "public", (Reply(200, "Alive (always 200 while the process answers).", rs.Health),)),
    Route("get", "/readyz", "readyz", "Readiness: listeners bound, store verified, policies loaded, audit gate open",
          "health", "public", (Reply(200, "Ready to take agent traffic.", rs.Ready),
                               Reply(503, "Not ready: `reasons` says which part is down.", rs.Ready))),
    Route("get", "/metrics", "metrics", "Prometheus metrics", "health", "public",
          (Reply(200, "Prometheus text exposition format.", media="text/plain", schema={"type": "string"}),)),
    Route("get", "/v1/stats", "stats", "Engine counters", "health", "public", (Reply(200, "Counters.", rs.Stats),)),
    # policies (control/api.py, governance_api.py)
    Route("get", "/v1/policies", "policyStatus", "The active policy set and reload status", "policies", "public",
          (Reply(200, "Status.", rs.PolicyStatus),)),
    Route("post", "/v1/policies/reload", "reloadPolicies", "Reload the policies now (loopback callers only)",
          "policies", "public",
          (Reply(200, "Reloaded.", rs.ReloadResult),
           Reply(422, "The new policies were rejected; the previous ones stay active.", rs.ReloadResult)),
          (403,)),
    Route("get", "/v1/policies/revisions", "policyRevisions", "The policy revisions kept (newest first) and the "
          "active one", "policies", "operator", (Reply(200, "Revisions.", rs.RevisionList),), OPERATOR),
    Route("post", "/v1/policies/rollback", "rollbackPolicies", "Restore an earlier revision: its files are written "
          "back into the policy directory and loaded", "policies", "operator",
          (Reply(200, "Rolled back.", rs.RollbackResult),), (400, 401, 403, 404, 409, 415, 503),
          body=rq.RollbackRequest),
    Route("post", "/v1/policies/push", "pushPolicies", "A policy set for every replica: validated, stored as the "
          "fleet's active revision; replicas with policies.source: store follow it", "policies", "operator",
          (Reply(200, "Pushed.", rs.PushResult),), (400, 401, 403, 413, 415, 422, 503), body=rq.PushRequest),
    # activity (activity_api.py)
    Route("get", "/v1/activity", "activity", "Recent audit events (newest first), summarised", "governance",
          "approver", (Reply(200, "A page of events.", rs.ActivityPage),), (400, 401, 503), query=rq.ActivityQuery,
          description="With `scope=fleet` (the default) every live replica is asked with your token and the "
          "events are merged newest first; page with `cursor`. A replica that did not answer makes the page "
          "`incomplete` and is named under `missing` (docs/governance.md, \"Fleet views\")."),
    Route("get", "/v1/decisions/{id}/explain", "explainDecision", "A recorded decision re-evaluated under the "
          "current policies, on whichever replica made it", "policies", "operator",
          (Reply(200, "The explanation (as `proctor policy explain --decision ID --json` prints it).",
                 rs.DecisionExplanation),), (400, 401, 403, 404, 422, 503), path_model=rq.DecisionPath,
          query=rq.ExplainQuery,
          description="Looked up in this replica's decision record, else on every live replica (your token "
          "forwarded). 404 when no replica has it (`incomplete` when some could not be asked); 422 when it was "
          "refused before any policy ran."),
    # agent registry and kill switch (governance_api.py)
    Route("get", "/v1/agents", "listAgents", "The agent registry", "governance", "operator",
          (Reply(200, "Every known agent.", rs.AgentList),), OPERATOR),
    Route("post", "/v1/agents", "registerAgent", "Register (or update) an agent", "governance", "operator",
          (Reply(201, "The agent as registered.", rs.Agent),), (400, 401, 403, 415, 503), body=rq.AgentRegistration),
    Route("get", "/v1/agents/{id}", "getAgent", "One agent", "governance", "operator",
          (Reply(200, "The agent.", rs.Agent),), (401, 403, 404, 503), path_model=rq.AgentPath),
    Route("post", "/v1/agents/{id}/suspend", "suspendAgent", "Suspend an agent (kill switch)", "governance",
          "operator", (Reply(201, "Suspended.", rs.Suspension),), (400, 401, 403, 415, 503),
          path_model=rq.AgentPath, body=rq.SuspendAgentRequest),
    Route("post", "/v1/agents/{id}/resume", "resumeAgent", "Lift an agent's suspension", "governance", "operator",
          (Reply(200, "Resumed.", rs.ResumeResult),), (400, 401, 403, 404, 415, 503),
          path_model=rq.AgentPath, body=rq.ResumeRequest, body_required=False),
    Route("get", "/v1/suspensions", "listSuspensions", "Active suspensions", "governance", "operator",
          (Reply(200, "Suspensions.", rs.SuspensionList),), OPERATOR),
    Route("post", "/v1/suspensions", "createSuspension", "Suspend an agent, connector or action", "governance",
          "operator", (Reply(201, "Suspended.", rs.Suspension),), (400, 401, 403, 415, 503),
          body=rq.SuspensionRequest),
    Route("delete", "/v1/suspensions/{kind}/{target}", "deleteSuspension", "Lift a suspension", "governance",
          "operator", (Reply(200, "Resumed.", rs.ResumeResult),), (401, 403, 404, 503),
          path_model=rq.SuspensionPath, query=rq.ResumeQuery),
    # claims on resources (claims_api.py; docs/coordination.md)
    Route("get", "/v1/claims", "listClaims", "Live claims agents hold on resources", "coordination", "operator",
          (Reply(200, "Claims, by connector and resource.", ClaimList),), (400, *OPERATOR), query=ClaimListQuery),
    Route("post", "/v1/claims", "acquireClaim", "Take or renew a claim on a resource", "coordination",
          "agent-or-operator",
          (Reply(201, "Taken: a new tenure (new id, fence bumped).", ClaimAcquired),
           Reply(200, "Renewed: the holder already held it; only the expiry moved.", ClaimAcquired)),
          (400, 401, 403, 409, 415, 422, 503), body=ClaimAcquireRequest,
          description="For routes declared `claim: {acquire: api}` (any claim-bearing route's resource type "
          "works). An agent token takes the claim for its own agent, for at most the route's `ttl_seconds`; an "
          "operator token names the `holder`. 409 (with `Retry-After` and `claim`) when another agent holds it; "
          "422 when the connector declares no claim on that resource type. Requests with a foreign `Origin` "
          "header are refused (CSRF)."),
    Route("post", "/v1/claims/{id}/release", "releaseClaim", "Release a claim", "coordination",
          "agent-or-operator",
          (Reply(200, "Released: the resource is free for the next writer (a new tenure).", ClaimRelease),),
          (400, 401, 403, 404, 415, 503), path_model=ClaimPath, body=ClaimReleaseRequest, body_required=False,
          description="An operator force-releases any claim; an agent token releases that agent's own claims "
          "only. An optional `reason` is recorded with the `released` claim event. Requests with a foreign "
          "`Origin` header are refused (CSRF)."),
    Route("post", "/v1/claims/{id}/transfer", "transferClaim", "Transfer a claim to another agent", "coordination",
          "operator", (Reply(200, "Transferred: the new holder's tenure (fence bumped); the old holder's writes get "
                                  "409.", ClaimTransfer),),
          (400, 401, 403, 404, 415, 503), path_model=ClaimPath, body=ClaimTransferRequest,
          description="Requests with a foreign `Origin` header are refused (CSRF)."),
    Route("get", "/v1/claims/inbox", "claimInbox", "Resources handed off to human groups", "coordination",
          "approver", (Reply(200, "Items in your groups' queues (operators: all), waiting or taken.", Inbox),), AUTH),
    Route("post", "/v1/claims/{id}/take", "takeClaim", "Take a handed-off item from your group's queue",
          "coordination", "approver",
          (Reply(200, "Taken: you hold the claim (holder `human:<you>`, fence bumped).", ClaimTransfer),),
          (401, 403, 404, 409, 503), path_model=ClaimPath,
          description="Requests with a foreign `Origin` header are refused (CSRF)."),
    Route("post", "/v1/claims/{id}/give-back", "giveBackClaim", "Let go of a handed-off item", "coordination",
          "approver", (Reply(200, "Released: the resource is free for the next writer.", ClaimRelease),),
          (401, 403, 404, 503), path_model=ClaimPath,
          description="Requests with a foreign `Origin` header are refused (CSRF)."),
    # duplicate work (duplicates_api.py; docs/coordination.md)
    Route("get", "/v1/duplicates", "listDuplicates", "Live idempotency keys and dedupe windows", "coordination",
          "operator", (Reply(200, "Entries, newest first: who holds each, its state and when it ends (never the "
                                  "keys or the stored responses).", DuplicateList),),
          (400, *OPERATOR), query=DuplicateListQuery),
    # rate limits (rate_limits_api.py; docs/limits.md)
    Route("get", "/v1/rate-limits", "listRateLimits", "Declared rate limits, their counts and a key's state",
          "coordination", "operator",
          (Reply(200, "Every declared limit (config and connector routes) with this process's counts; with key "
                      "values in the query, the state of each limit whose key they complete.", RateLimitList),),
          (400, *OPERATOR), query=RateLimitQuery,
          description="Key values given in the query (agent, group, connector, action, resource, workflow) read "
          "the counters of the limits keyed on them without spending anything. Limits keyed on request or token "
          "values (param:, query:, field:, claim:) show no state. `counters_available` is false when the counters "
          "did not answer (docs/limits.md, \"The control API\")."),
    # budgets (budgets_api.py; docs/limits.md, "Seeing budgets")
    Route("get", "/v1/budgets", "listBudgets", "Declared budgets and their ledgers in a window", "coordination",
          "operator",
          (Reply(200, "Every declared budget (or the one named) with its ledgers in the window asked for (the current "
                      "one by default): spent, reserved, remaining, the fraction used and, in the current window, a "
                      "projection at the rate so far.", BudgetList),),
          (400, 422, *OPERATOR), query=BudgetQuery,
          description="Ledgers are read from the ledger backend: fleet-wide. Amounts are decimal strings. Key values "
          "from requests and tokens (param:, query:, field:, claim:) are shown as sha256 digests. Filters on agent, "
          "group, connector, action, resource and workflow narrow the ledgers of budgets keyed on that dimension. "
          "422 for a `name` no budget has, or a `window` that is not `current`, `previous` or one of the budget's "
          "window ids. `ledger_available` is false when the backend did not answer (docs/limits.md, \"Seeing "
          "budgets\")."),
    Route("get", "/v1/budgets/{name}", "getBudget", "One budget, its ledgers and their burn-down", "coordination",
          "operator",
          (Reply(200, "The budget with its ledgers in the window, each with a burn-down series (cumulative spend over "
                      "time).", BudgetDetail),),
          (400, 404, 422, *OPERATOR), path_model=BudgetPath, query=BudgetShowQuery,
          description="The burn-down series come from this replica's decision records (the `budget` part of each): "
          "with several replicas each shows only what its own requests booked, while `spent` and the other totals "
          "are fleet-wide, from the ledger. `burn_down.complete` is false when the records were read back only "
          "part of the way (a bounded scan; `since` says from when). 404 for a name no budget has."),
    # workflows (workflows_api.py; docs/workflows.md)
    Route("get", "/v1/workflows", "listWorkflows", "Workflow definitions, with instance counts by state",
          "workflows", "approver", (Reply(200, "Every loaded definition.", WorkflowList),), AUTH),
    Route("get", "/v1/workflows/instances", "listWorkflowInstances", "Workflow instances, most recently moved first",
          "workflows", "approver", (Reply(200, "Instances.", InstanceList),), (400, *AUTH), query=InstanceListQuery),
    Route("get", "/v1/workflows/instances/{id}", "getWorkflowInstance", "One workflow instance with its history "
          "and business objects", "workflows", "approver", (Reply(200, "The instance.", InstanceDetail),),
          (401, 404, 503), path_model=InstancePath),
    Route("get", "/v1/workflows/inbox", "workflowInbox", "Workflow instances waiting for a person (exceptions)",
          "workflows", "approver",
          (Reply(200, "Open escalation items of your groups (operators: all), each with the instance's history.",
                 wi.WorkflowInbox),), (400, *AUTH), query=wi.InboxQuery,
          description="Items open when a step failed `escalate.after_failures` times, gave up after its retries, "
                      "or the instance stalled past its SLA (docs/workflows.md, \"Exceptions\")."),
    Route("post", "/v1/workflows/instances/{id}/escalations/{item}", "decideWorkflowEscalation",
          "Decide an escalation item: retry, take-over, complete or close", "workflows", "approver",
          (Reply(200, "Decided and recorded (a `workflow` event, `decided`).", wi.EscalationDecided),),
          (400, 401, 403, 404, 409, 415, 503), path_model=wi.EscalationPath, body=wi.DecideRequest,
          description="Members of the item's group (operators: any item). 404 for items outside your groups; 409 "
                      "when it was decided already, taken over by someone else, or the instance is closed. "
                      "Requests with a foreign `Origin` header are refused (CSRF)."),
    Route("get", "/v1/workflows/kpis", "workflowKpis", "Outcome KPIs per workflow, step and agent over a window",
          "workflows", "approver", (Reply(200, "The KPIs of every loaded workflow (or the one asked for).",
                                          KpiDocument),), (400, *AUTH), query=KpiQuery,
          description="Cycle time (p50/p90, human approval wait apart from the rest), throughput, work in "
          "progress, error and rework rates, SLA adherence, cost per instance and autonomy, computed from the "
          "store's step events (docs/workflows.md, \"Outcomes (KPIs)\"). Rates are null when their denominator "
          "is 0. 400 names the parameter at fault: a time that is neither ISO 8601 nor epoch seconds, `since` "
          "not before `until` or more than 366 days before it, an unknown workflow."),
    Route("get", "/v1/workflows/export", "exportWorkflows", "Process-mining export of the workflow history: an "
          "OCEL 2.0 JSON log or a flat CSV event log", "workflows", "approver",
          (Reply(200, "format=ocel2: the OCEL 2.0 log (application/json).", OcelLog, headers=DOWNLOAD),
           Reply(200, "format=csv: a header row, then one row per step event (case_id, activity, timestamp, "
                 "resource, ...).", media="text/csv", schema={"type": "string"})),
          (400, 401, 404, 503), query=ExportQuery,
          description="Events of the step calls in [since, until), objects as they are now: business objects, "
          "workflow instances and agents, with qualified event-object links and part-of links "
          "(docs/workflows.md, \"Process-mining export\"). Streamed; 404 for a workflow no loaded definition "
          "has; 400 names the parameter at fault."),
    # approvals (approvals_api.py)
    Route("get", "/v1/whoami", "whoami", "The calling approver and their approval groups", "approvals", "approver",
          (Reply(200, "The verified approver.", rs.WhoAmI),), AUTH),
    Route("get", "/v1/approvals", "listApprovals", "List approvals, newest first", "approvals", "approver",
          (Reply(200, "A page of approvals.", rs.ApprovalList),), (400, *AUTH), query=rq.ApprovalListQuery),
    Route("get", "/v1/approvals/events", "approvalEvents", "Live approval changes (server-sent events)",
          "approvals", "approver",
          (Reply(200, "One `approval` event per state change, data `ApprovalEvent`; comment lines keep the stream "
                 "alive every 15 s.", media="text/event-stream", schema={"type": "string"},
                 extensions={"x-event-data": {"$ref": REF.format(model="ApprovalEvent")}}),), AUTH),
    Route("get", "/v1/approvals/{id}", "getApproval", "One approval in full", "approvals", "approver",
          (Reply(200, "The approval, with `you_may_decide`.", rs.Approval),), (401, 404, 503),
          path_model=rq.ApprovalPath),
    Route("get", "/v1/approvals/{id}/status", "approvalStatus", "The state of a held request, for the agent that "
          "sent it", "approvals", "agent-or-approver",
          (Reply(200, "The approval's state.", rs.ApprovalStatus, headers=RETRY_AFTER),), (401, 404, 503),
          path_model=rq.ApprovalPath,
          description="The held agent authenticates with its own agent token (Authorization or "
          "Proxy-Authorization: Bearer) and sees only its own approvals; an approver token sees any."),
    _decide("approve"),
    _decide("deny"),
    # this document
    Route("get", "/v1/openapi.json", "openapi", "This document", "meta", "public",
          (Reply(200, "OpenAPI 3.1.", schema={"type": "object"}),)),
)

# Models the document lists although no route answers them directly.
EXTRA_MODELS: tuple[type[BaseModel], ...] = (rs.ApprovalEvent,)


# ----------------------------------------------------------------------------- generation
def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`X | None` as a parameter is just X, optional (a query string has no null)."""
    options = schema.get("anyOf")
    if not options or {"type": "null"} not in options or len(options) != 2:
        return schema
    out = {k: v for k, v in schema.items() if k != "anyOf"}
    out.update(next(o for o in options if o != {"type": "null"}))
    if out.get("default", ...) is None:
        del out["default"]
    return out


def _parameters(model: type[BaseModel] | None, where: str) -> list[dict[str, Any]]:
    if model is None:
        return []
    schema = model.model_json_schema(ref_template=REF)
    assert "$defs" not in schema, f"{model.__name__}: parameters are flat"
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema["properties"].items():
        prop = _without_null({k: v for k, v in prop.items() if k != "title"})
        description = prop.pop("description", None)
        param: dict[str, Any] = {"name": name, "in": where, "required": where == "path" or name in required,
                                 "schema": prop}
        if description:
            param["description"] = description
        if prop.get("type") == "array":  # state=pending,approved
            param.update(style="form", explode=False)
        out.append(param)
    return out


def _responses(route: Route, refs: dict[type[BaseModel], dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in route.replies:
        media: dict[str, Any] = {"schema": refs[r.model] if r.model is not None else r.schema}
        media.update(r.extensions or {})
        answer: dict[str, Any] = {"description": r.description, "content": {r.media: media}}
        if r.headers:
            answer["headers"] = r.headers
        if str(r.status) in out:  # one status, several media types (chosen by a query parameter)
            same = out[str(r.status)]
            same["description"] += " " + r.description
            same["content"].update(answer["content"])
            same.setdefault("headers", {}).update(r.headers or {})
            continue
        out[str(r.status)] = answer
    for status in (*route.errors, *((413,) if route.body is not None else ())):
        out[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
    return dict(sorted(out.items()))


def _operation(route: Route, refs: dict[type[BaseModel], dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": route.summary, "operationId": route.operation_id, "tags": [route.tag],
                          "security": SECURITY[route.security]}
    if route.description:
        op["description"] = route.description
    params = _parameters(route.path_model, "path") + _parameters(route.query, "query")
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {"required": route.body_required, "content": {JSON: {"schema": refs[route.body]}}}
    op["responses"] = _responses(route, refs)
    return op


def _error_response(status: int, description: str, problem: dict[str, str]) -> dict[str, Any]:
    text = {"schema": {"type": "string"}}
    content: dict[str, Any] = {PROBLEM: {"schema": problem}}
    if status == 400:  # also aiohttp's own answer to a request line or header over 8 KiB
        content["text/plain"] = text
    if status == 413:  # only ever aiohttp's own answer: the body is refused before any handler reads it
        content = {"text/plain": text}
    out: dict[str, Any] = {"description": description, "content": content}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


def build_document(routes: tuple[Route, ...] = ROUTES) -> dict[str, Any]:
    bodies: set[type[BaseModel]] = {r.body for r in routes if r.body is not None}
    answers: set[type[BaseModel]] = {rep.model for r in routes for rep in r.replies if rep.model is not None}
    answers |= {rs.Problem, *EXTRA_MODELS}
    # requests are described as accepted (validation), answers as sent (serialization)
    pairs: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        *((m, "validation") for m in sorted(bodies, key=lambda m: m.__name__)),
        *((m, "serialization") for m in sorted(answers, key=lambda m: m.__name__)),
    ]
    keyed, defs = models_json_schema(pairs, ref_template=REF)
    refs: dict[type[BaseModel], dict[str, Any]] = {model: ref for (model, _mode), ref in keyed.items()}  # type: ignore[misc]
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        assert route.method not in paths.get(route.path, {}), f"{route.method} {route.path} twice"
        paths.setdefault(route.path, {})[route.method] = _operation(route, refs)
    problem = refs[rs.Problem]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Proctor control API",
            "version": __version__,
            "description": "Health, policy status, metrics, human approval of held agent requests, the agent "
            "registry and the kill switch. Served on the control port (default 127.0.0.1:8081). Generated from "
            "the route table and pydantic models in proxy/control/.",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "health", "description": "Liveness, readiness, metrics and counters."},
            {"name": "policies", "description": "The active policy set, its history and rollback."},
            {"name": "approvals", "description": "Requests held by @approval policies, decided by people."},
            {"name": "governance", "description": "The activity view, the agent registry and the kill switch."},
            {"name": "coordination", "description": "Claims on resources, handoffs to people, and duplicate-work "
             "suppression (idempotency keys, dedupe windows)."},
            {"name": "workflows", "description": "Workflow definitions, instances and their history."},
            {"name": "meta", "description": "This document."},
        ],
        "paths": paths,
        "components": {
            "securitySchemes": SECURITY_SCHEMES,
            "responses": {name: _error_response(status, text, problem) for status, (name, text) in ERRORS.items()},
            "schemas": dict(sorted(defs["$defs"].items())),
        },
    }


SECURITY_SCHEMES = {
    "approverBearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "A human approver's JWT from a trusted issuer for the approver audience "
        "(`approvals.approver_audience`, default `proctor-approvers`); the approval groups come from the "
        "`approvals.approver_groups_claim` claim (default `approval_groups`). Dev: "
        "`proctor token issue --approver alice --group procurement-managers`.",
    },
    "operatorBearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "An operator's JWT: like an approver token (same audience and groups claim), and the "
        "groups must include `control.admin_group` (default `proctor-admins`).",
    },
    "agentBearer": {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": "The agent's own token (the agent audience), accepted by the status endpoint only.",
    },
}

OPENAPI: dict[str, Any] = build_document()


def add_openapi_route(app: web.Application) -> None:
    """Serve OPENAPI at GET /v1/openapi.json."""

    async def openapi(_: web.Request) -> web.Response:
        return web.json_response(OPENAPI, headers={"Cache-Control": "no-cache"})

    app.router.add_get("/v1/openapi.json", openapi)
