"""`proctor policy explain`: what Proctor derives from a request, and why it decides as it does.

Runs the same stages as the proxy (classification, body parsing, principal,
resource and context building, evaluation of the action's policies) without a
network or a token: the identity is given directly. On top of the decision it
evaluates every policy in scope on its own, so an author sees which permits and
forbids apply, not only the determining ones.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import cedarpy

from ..config import ProctorConfig
from ..connectors.classifier import Classifier
from ..core.context import principal_entity, request_context, resource_entity
from ..connectors.derive import derive_request
from ..core.model import AgentIdentity, AgentRequest, Classification
from ..record.model import DecisionRecord
from .engine import PolicyStore


class ExplainInputError(Exception):
    """The request to explain cannot be read; the message says why."""


@dataclass
class PolicyVerdict:
    policy_id: str
    effect: str
    file: str
    applies: bool
    error: str | None = None


@dataclass
class Explanation:
    request: AgentRequest
    principal: dict
    classification: Classification | None = None
    resource: dict | None = None
    context: dict | None = None
    decision: str = "deny"
    reasons: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused_before_policy: str | None = None
    verdicts: list[PolicyVerdict] = field(default_factory=list)
    policies_in_scope: int = 0
    policies_total: int = 0

    def as_dict(self) -> dict[str, Any]:
        cls = self.classification
        return {
            "request": {"method": self.request.method, "url": self.request.url},
            "principal": self.principal,
            "classification": None
            if cls is None
            else {
                "connector": cls.connector,
                "route": cls.route,
                "action": cls.action,
                "resource": cls.resource_uid,
                "risk": cls.risk,
            },
            "resource": self.resource,
            "context": self.context,
            "decision": self.decision,
            "reasons": self.reasons,
            "errors": self.errors,
            "refused_before_policy": self.refused_before_policy,
            "policies_in_scope": self.policies_in_scope,
            "policies_total": self.policies_total,
            "policies": [v.__dict__ for v in self.verdicts],
        }


def parse_curl(line: str | list[str]) -> tuple[str, str, dict[str, str], bytes]:
    """Method, URL, headers and body from a curl-like command line (curl itself optional)."""
    args = shlex.split(line) if isinstance(line, str) else list(line)
    if args and args[0] == "curl":
        args = args[1:]
    method, url, headers, body = None, None, {}, b""
    it = iter(args)
    for arg in it:
        if arg in ("-X", "--request"):
            method = next(it, "").upper()
        elif arg in ("-H", "--header"):
            k, _, v = next(it, "").partition(":")
            headers[k.strip().lower()] = v.strip()
        elif arg in ("-d", "--data", "--data-raw", "--data-binary"):
            body = next(it, "").encode()
        elif arg == "--json":
            body = next(it, "").encode()
            headers.setdefault("content-type", "application/json")
        elif arg.startswith("-"):
            continue  # flags that do not change the request's meaning (-s, -i, -k, ...)
        elif url is None:
            url = arg
    if url is None:
        raise ExplainInputError("no URL in the curl line")
    return (method or ("POST" if body else "GET")), url, headers, body


def parse_request_json(doc: dict) -> tuple[str, str, dict[str, str], bytes]:
    if not isinstance(doc, dict) or not isinstance(doc.get("url"), str):
        raise ExplainInputError('a request file is {"method": ..., "url": ..., "headers": {...}, "body": ...}')
    headers = {str(k).lower(): str(v) for k, v in (doc.get("headers") or {}).items()}
    body = doc.get("body", b"")
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        headers.setdefault("content-type", "application/json")
    if isinstance(body, str):
        body = body.encode()
    return str(doc.get("method", "GET")).upper(), doc["url"], headers, body


def build_request(method: str, url: str, headers: dict[str, str], body: bytes, client_ip: str = "127.0.0.1") -> AgentRequest:
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ExplainInputError(f"not an http(s) URL: {url!r}")
    port = u.port or (443 if u.scheme == "https" else 80)
    return AgentRequest(
        method=method,
        scheme=u.scheme,
        host=u.hostname,
        port=port,
        path=u.path or "/",
        query=u.query,
        headers=headers,
        body=body,
        client_ip=client_ip,
        mode="forward",
    )


def _verdicts(store: PolicyStore, action: str, request: dict, entities: Any) -> list[PolicyVerdict]:
    """Each policy that can match the action, evaluated alone: does it apply?"""
    b = store.bundle
    out = []
    for pid in sorted(b.part_for(action).policy_ids):
        info = b.policies[pid]
        single = cedarpy.PolicySet.from_json_str(
            json.dumps({"staticPolicies": {pid: b.policy_est[pid]}, "templates": {}, "templateLinks": []})
        )
        r = cedarpy.is_authorized(request, single, entities)
        err = "; ".join(str(e) for e in r.diagnostics.errors) or None
        out.append(PolicyVerdict(pid, info.effect, info.file, pid in r.diagnostics.reasons, err))
    return out


def explain(
    config: ProctorConfig,
    store: PolicyStore,
    classifier: Classifier,
    req: AgentRequest,
    identity: AgentIdentity,
) -> Explanation:
    settings = config.identity_settings()
    principal = principal_entity(identity, settings.principal)
    ex = Explanation(request=req, principal=principal, policies_total=store.bundle.policy_count)
    derived = derive_request(classifier, config.limits, req)
    ex.classification = derived.classification
    if derived.refusal is not None:
        r = derived.refusal
        tag = r.reasons[0] if r.reasons else r.title.lower()
        ex.refused_before_policy = f"{r.status} {tag}: {r.detail}"
        return ex
    cls = derived.classification
    assert cls is not None
    body = derived.body
    ex.resource = resource_entity(cls)
    payload = derived.payload.describe() if derived.payload is not None else None
    ex.context = request_context(req, cls, body, config.limits.context_headers, payload=payload,
                                 inexact=config.limits.inexact_numbers)
    result = store.authorize(principal, cls.action, ex.resource, ex.context, [principal, ex.resource])
    ex.decision = "allow" if result.allowed else "deny"
    ex.reasons = result.reasons
    ex.errors = result.errors
    part = store.bundle.part_for(cls.action)
    ex.policies_in_scope = len(part.policy_ids)
    b = store.bundle
    dynamic = [e for e in (principal, ex.resource) if (e["uid"]["type"], e["uid"]["id"]) not in b.static_uids]
    entities = b.entities.with_added_json_str(json.dumps(dynamic)) if dynamic else b.entities
    request = {
        "principal": principal["uid"],
        "action": {"type": "Action", "id": cls.action},
        "resource": ex.resource["uid"],
        "context": ex.context,
    }
    ex.verdicts = _verdicts(store, cls.action, request, entities)
    return ex


def render_text(ex: Explanation) -> str:
    lines = [f"request    {ex.request.method} {ex.request.url}"]
    parents = ", ".join(p["id"] for p in ex.principal.get("parents", []))
    lines.append(f"principal  Agent::{json.dumps(ex.principal['uid']['id'])}" + (f"  (groups: {parents})" if parents else ""))
    if ex.principal.get("attrs"):
        lines.append(f"           attributes {json.dumps(ex.principal['attrs'])}")
    if ex.refused_before_policy:
        lines.append(f"decision   DENY before any policy: {ex.refused_before_policy}")
        return "\n".join(lines)
    cls = ex.classification
    assert cls is not None and ex.resource is not None
    lines.append(f"connector  {cls.connector}   route {cls.route}   risk {cls.risk}")
    lines.append(f"action     Action::{json.dumps(cls.action)}")
    lines.append(f"resource   {cls.resource_uid}" + (f"  {json.dumps(ex.resource['attrs'])}" if ex.resource.get("attrs") else ""))
    if ex.errors:
        why = f"evaluation error (fail closed): {'; '.join(ex.errors)}"
    elif ex.decision == "allow":
        why = f"permitted by {', '.join(ex.reasons)}"
    elif ex.reasons:
        why = f"forbidden by {', '.join(ex.reasons)}"
    else:
        why = "no policy permits it (default deny)"
    lines.append(f"decision   {ex.decision.upper()}: {why}")
    lines.append(f"policies   {ex.policies_in_scope} of {ex.policies_total} can match this action:")
    for v in sorted(ex.verdicts, key=lambda v: (not v.applies, v.effect != "forbid", v.policy_id)):
        state = "ERROR" if v.error else ("applies" if v.applies else "does not apply")
        lines.append(f"  {v.effect:<6}  {v.policy_id:<40} {state:<15} ({v.file})")
        if v.error:
            lines.append(f"          {v.error}")
    lines.append("context    " + json.dumps(ex.context, sort_keys=True))
    return "\n".join(lines)


def recorded_explanation(store: PolicyStore, rec: DecisionRecord) -> dict[str, Any]:
    """A recorded decision re-evaluated under the current policies, policy by policy."""
    from .replay import evaluate, replay_context, unrecorded_reads

    cedar, action = rec.cedar, rec.action
    assert cedar is not None and action, "only records with policy inputs can be explained"
    principal, resource, context = cedar["principal"], cedar["resource"], replay_context(cedar["context"])
    now, reasons, errors = evaluate(store, rec)
    b = store.bundle
    dynamic = [e for e in (principal, resource) if (e["uid"]["type"], e["uid"]["id"]) not in b.static_uids]
    entities = b.entities.with_added_json_str(json.dumps(dynamic)) if dynamic else b.entities
    request = {"principal": principal["uid"], "action": {"type": "Action", "id": action}, "resource": resource["uid"],
               "context": context}
    verdicts = _verdicts(store, action, request, entities)
    missing = sorted(unrecorded_reads(b, action) & set(cedar.get("unrecorded", [])))
    return {
        "decision_id": rec.decision_id,
        "time": rec.time,
        "agent": rec.agent,
        "request": f"{rec.method or '?'} {rec.host or '?'}:{rec.port or '?'}{rec.path or ''}",
        "action": action,
        "resource": resource,
        "principal": principal,
        "context": context,
        "recorded": {"decision": rec.policy_decision, "reasons": rec.reasons,
                     "policy_revision": rec.policy_revision, "status": rec.status},
        "now": {"decision": now, "reasons": reasons, "errors": errors, "policy_revision": b.revision},
        "same_revision": rec.policy_revision == b.revision,
        "approximate_because_unrecorded": missing,
        "policies": [v.__dict__ for v in verdicts],
    }


def render_recorded(r: dict[str, Any]) -> str:
    rec, now = r["recorded"], r["now"]
    parents = ", ".join(p["id"] for p in r["principal"].get("parents", []))
    lines = [
        f"decision   {r['decision_id']} at {r['time']}",
        f"request    {r['request']}",
        f"principal  Agent::{json.dumps(r['principal']['uid']['id'])}" + (f"  (groups: {parents})" if parents else ""),
        f"action     {r['action']}",
        f"resource   {r['resource']['uid']['type']}::{json.dumps(r['resource']['uid']['id'])}",
    ]
    if r["resource"].get("attrs"):
        lines.append(f"  attrs    {json.dumps(r['resource']['attrs'], sort_keys=True)}")
    for key in ("params", "query_params", "fields", "approval"):
        if key in r["context"]:
            lines.append(f"context.{key}  {json.dumps(r['context'][key], sort_keys=True)}")
    lines.append(
        f"recorded   {rec['decision']} ({', '.join(rec['reasons']) or 'default'}) under revision {rec['policy_revision']}"
    )
    lines.append(
        f"now        {now['decision']} ({', '.join(now['reasons']) or 'default'}) under revision {now['policy_revision']}"
        + ("" if r["same_revision"] else "  [policies changed since]")
    )
    if now["errors"]:
        lines.append(f"errors     {'; '.join(now['errors'])}")
    if r["approximate_because_unrecorded"]:
        lines.append(
            f"note       policies for this action read context.{', context.'.join(r['approximate_because_unrecorded'])}, "
            "which the record does not keep: this re-evaluation is approximate"
        )
    lines.append("policies in scope:")
    for v in r["policies"]:
        state = "APPLIES" if v["applies"] else ("ERROR  " if v["error"] else "-      ")
        lines.append(f"  {state} {v['effect']:<7} {v['policy_id']}  ({v['file']})" + (f"  {v['error']}" if v["error"] else ""))
    return "\n".join(lines)
