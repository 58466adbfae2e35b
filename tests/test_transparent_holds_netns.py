"""Human approval of a transparent agent's held requests, proven in network namespaces.

The transparent sidecar of tests/support/transparent_netns.py (Proctor as its own
uid in the agent's namespace, the redirect written by `proctor netsetup --apply`,
both backends), with a hold policy: creating an item of amount over 500 needs
one approval by `managers` (HOLD_CEDAR; tests/data/policies forbids over 1000
outright). Approvals are async, so a held request is answered 202 at once.

The agent has no token and cannot reach the control API (netsetup refuses
Proctor's ports to it); the operator decides as Proctor's uid with
`proctor approvals approve|deny` (the CLI, a client of the control API). Shown:

- hold -> approve -> the agent's retry of the same request reaches the upstream
  exactly once (plain HTTP and HTTPS), attributed to the workload identity; a
  second retry is 409, nothing is sent twice;
- hold -> deny -> the retry is refused 403 and nothing reaches the upstream;
- the status URL the 202 names is one the agent can GET: netsetup redirects the
  agent's connections to the control port on a local address to the transparent
  listener, which answers exactly `GET /v1/approvals/{id}/status` for the
  workload's own approvals (pending -> approved -> forwarded / denied);
- another agent's approval id (held through the forward listener) and unknown ids
  are 404, whatever Authorization the agent sends; anything else at the control
  address (the approve endpoint with an approver token, /healthz, listing, a
  body, another method) is refused 508 and recorded, never reaches the control
  API (the approval stays pending).

Needs root (namespaces): skipped with the reason otherwise; CI runs as root.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import DATA
from support.transparent_netns import (
    AGENT_IP, CONTROL_PORT, FORWARD_PORT, HTTP_PORT, HTTPS_PORT, PROXY_UID, Netns, Reply, why_no_netns,
)

pytestmark = pytest.mark.integration

NO_NETNS = why_no_netns()
if NO_NETNS is not None:
    pytest.skip(NO_NETNS, allow_module_level=True)

WORKLOAD = "support-agent"
ERP = f"http://erp.test:{HTTP_PORT}"
ERPS = f"https://erp.test:{HTTPS_PORT}"
DECISION = "x-proctor-decision-id"
STATUS_BASE = f"http://127.0.0.1:{CONTROL_PORT}"

HOLD_CEDAR = """
@id("big-items-need-a-manager")
@approval("managers")
forbid (principal, action == Action::"test.item.create", resource)
when { context has body && context.body has amount && context.body.amount > 500 }
unless { context has approval && context.approval.groups.contains("managers") };
"""

APPROVAL_TYPE = (
    "type Approval = { id: String, approver: String, approvers: Set<String>, groups: Set<String>, "
    "time: datetime, note: String };\n"
)


@pytest.fixture(scope="module")
def hold_policies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("transparent-hold-policies") / "policies"
    shutil.copytree(DATA / "policies", d)
    schema = (d / "schema.cedarschema").read_text()
    create = "  body?: OrderBody,\n};"
    assert create in schema and "type Approval" not in schema
    schema = schema.replace("type OrderBody", APPROVAL_TYPE + "type OrderBody", 1)
    schema = schema.replace(create, "  body?: OrderBody,\n  approval?: Approval,\n};", 1)
    (d / "schema.cedarschema").write_text(schema)
    (d / "hold.cedar").write_text(HOLD_CEDAR)
    return d


@pytest.fixture(scope="module", params=["iptables", "nftables"])
def env(request, idp, hold_policies) -> Iterator[Netns]:
    ns = Netns(request.param)
    try:
        ns.build(idp, idp.token(WORKLOAD, groups=["readers", "writers"], ttl=3600), policies=hold_policies,
                 config={"approvals": {"mode": "async", "retry_after_seconds": 1, "expire_after_seconds": 600}})
        yield ns
    finally:
        ns.close()


@pytest.fixture
def fresh(env: Netns) -> Netns:
    env.clear_logs()
    return env


# ------------------------------------------------------------------ helpers
def problem(reply: Reply) -> dict:
    assert reply.headers.get("content-type", "").startswith("application/problem+json"), reply
    return reply.json()


def create(env: Netns, base: str, mark: str, amount: int = 700, client: str = "curl") -> Reply:
    """The agent creates an item (held over 500): the same request each time for the same mark."""
    body = json.dumps({"amount": amount, "note": mark})
    headers = {"Content-Type": "application/json"}
    if client == "node":
        return env.node(f"{base}/items", "POST", headers, body=body, ca=True)
    return env.curl(f"{base}/items", "-H", "Content-Type: application/json", "--data-binary", body, method="POST",
                    ca=base.startswith("https"))


def arrived(env: Netns, log: str, mark: str) -> list[dict]:
    return [r for r in env.received(log) if mark in (r.get("body") or "")]


def approver_token(idp, who: str = "alice", *groups: str) -> str:
    return idp.token(who, aud="proctor-approvers", approval_groups=list(groups or ("managers",)), ttl=600)


def decide(env: Netns, idp, approval_id: str, decision: str, reason: str = "checked with the customer") -> str:
    """`proctor approvals approve|deny ID` as the operator (Proctor's uid, the control API)."""
    done = env.operator("approvals", decision, approval_id, "--reason", reason, "--url", STATUS_BASE,
                        env={"PROCTOR_TOKEN": approver_token(idp)})
    assert done.returncode == 0, done
    return done.stdout


def held(env: Netns, reply: Reply) -> dict:
    """A 202 hold: its problem body, after checking what it says."""
    assert reply.status == 202, reply
    assert reply.headers["content-type"] == "application/json", reply  # (a 202 is not a problem)
    body = reply.json()
    assert body["title"] == "Held for approval" and body["reasons"] == ["big-items-need-a-manager"], body
    assert body["approval_state"] == "pending" and body["approval_groups"] == {"managers": 1}
    # the status URL is the one the agent can use: Proctor's control address in the pod
    assert body["status_url"] == f"{STATUS_BASE}/v1/approvals/{body['approval_id']}/status", body
    assert reply.headers["location"] == body["status_url"] and reply.headers["retry-after"] == "1"
    rec = env.decision(reply.headers[DECISION])
    assert (rec["agent"], rec["decision"], rec["mode"], rec["approval_id"]) == (
        WORKLOAD, "hold", "transparent", body["approval_id"])
    return body


def status(env: Netns, url: str, client: str = "curl", headers: dict[str, str] | None = None) -> Reply:
    if client == "node":
        return env.node(url, headers=headers)
    return env.curl(url, *[a for k, v in (headers or {}).items() for a in ("-H", f"{k}: {v}")])


def operator_view(env: Netns, idp, approval_id: str) -> dict:
    done = env.operator("approvals", "show", approval_id, "--json", "--url", STATUS_BASE,
                        env={"PROCTOR_TOKEN": approver_token(idp)})
    assert done.returncode == 0, done
    return json.loads(done.stdout)


# ------------------------------------------------------------------ hold -> decide -> retry
@pytest.mark.parametrize("base,log", [(ERP, "erp-http"), (ERPS, "erp-https")], ids=["http", "https"])
def test_held_approved_then_the_retry_goes_through_once(fresh: Netns, idp, base: str, log: str):
    mark = f"m-{uuid.uuid4().hex}"
    first = held(fresh, create(fresh, base, mark))
    assert arrived(fresh, log, mark) == []  # held: nothing forwarded
    # retrying before anyone decided: the same approval, still held, still nothing forwarded
    again = held(fresh, create(fresh, base, mark))
    assert again["approval_id"] == first["approval_id"]
    assert arrived(fresh, log, mark) == []

    assert "is now approved" in decide(fresh, idp, first["approval_id"], "approve")
    retry = create(fresh, base, mark)
    assert retry.status == 200, retry
    (got,) = arrived(fresh, log, mark)
    assert json.loads(got["body"]) == {"amount": 700, "note": mark}
    headers = {k.lower(): v for k, v in got["headers"]}
    assert headers["x-erp-key"]  # the connector's credential, injected
    rec = fresh.decision(retry.headers[DECISION])
    assert (rec["agent"], rec["decision"], rec["mode"], rec["approval_id"]) == (
        WORKLOAD, "allow", "transparent", first["approval_id"])

    # an approval releases one request: the same request again is not forwarded twice
    twice = create(fresh, base, mark)
    assert twice.status == 409 and problem(twice)["title"] == "Already forwarded", twice
    assert len(arrived(fresh, log, mark)) == 1


@pytest.mark.parametrize("base,log", [(ERP, "erp-http"), (ERPS, "erp-https")], ids=["http", "https"])
def test_held_denied_then_the_retry_is_refused(fresh: Netns, idp, base: str, log: str):
    mark = f"m-{uuid.uuid4().hex}"
    first = held(fresh, create(fresh, base, mark))
    assert "is now denied" in decide(fresh, idp, first["approval_id"], "deny", "not this customer")
    retry = create(fresh, base, mark)
    assert retry.status == 403, retry
    body = problem(retry)
    assert body["title"] == "Approval denied" and "not this customer" in body["detail"], body
    assert body["approval_id"] == first["approval_id"] and body["reasons"] == ["big-items-need-a-manager"]
    assert fresh.decision(retry.headers[DECISION])["agent"] == WORKLOAD
    assert arrived(fresh, log, mark) == []


# ------------------------------------------------------------------ the status URL
@pytest.mark.parametrize("client", ["curl", "node"])
def test_the_status_url_answers_the_agent_with_its_approvals_state(fresh: Netns, idp, client: str):
    mark = f"m-{uuid.uuid4().hex}"
    body = held(fresh, create(fresh, ERP, mark))
    url = body["status_url"]
    pending = status(fresh, url, client)
    assert pending.status == 200, pending
    doc = pending.json()
    assert (doc["id"], doc["state"], doc["action"]) == (body["approval_id"], "pending", "test.item.create"), doc
    assert doc["decided_by"] is None and pending.headers["retry-after"] == "1"

    decide(fresh, idp, body["approval_id"], "approve", "fine by me")
    approved = status(fresh, url, client)
    assert approved.status == 200 and approved.json()["state"] == "approved", approved
    assert (approved.json()["decided_by"], approved.json()["reason"]) == ("alice", "fine by me")
    assert "retry-after" not in approved.headers

    assert create(fresh, ERP, mark).status == 200
    assert status(fresh, url, client).json()["state"] == "forwarded"
    assert len(arrived(fresh, "erp-http", mark)) == 1


def test_the_status_url_of_a_denied_https_hold(fresh: Netns, idp):
    """Held over HTTPS, the status is still read at the plain-HTTP control address in the pod."""
    mark = f"m-{uuid.uuid4().hex}"
    body = held(fresh, create(fresh, ERPS, mark, client="node"))
    decide(fresh, idp, body["approval_id"], "deny", "no")
    denied = status(fresh, body["status_url"], "node")
    assert denied.status == 200 and denied.json()["state"] == "denied", denied
    assert arrived(fresh, "erp-https", mark) == []


def test_the_status_address_is_the_control_port_on_any_local_address(fresh: Netns):
    mark = f"m-{uuid.uuid4().hex}"
    body = held(fresh, create(fresh, ERP, mark))
    path = f"/v1/approvals/{body['approval_id']}/status"
    for base in (f"http://[::1]:{CONTROL_PORT}", f"http://{AGENT_IP}:{CONTROL_PORT}", f"http://localhost:{CONTROL_PORT}"):
        reply = fresh.curl(base + path)
        assert reply.status == 200 and reply.json()["id"] == body["approval_id"], (base, reply)


def test_another_agents_approval_is_not_the_workloads(fresh: Netns, idp):
    """An approval held for another agent (through the forward listener, which only Proctor's uid
    reaches here) is 404 at the agent's status address, like an unknown id, whatever the agent
    sends as Authorization; the control API itself still answers the other agent."""
    other = idp.token("other-agent", groups=["writers"], ttl=600)
    mark = f"m-{uuid.uuid4().hex}"
    via_forward = fresh.curl(f"{ERP}/items", "-x", f"http://other-agent:{other}@127.0.0.1:{FORWARD_PORT}",
                             "-H", "Content-Type: application/json",
                             "--data-binary", json.dumps({"amount": 600, "note": mark}), method="POST", uid=PROXY_UID)
    assert via_forward.status == 202, via_forward
    theirs = via_forward.json()["approval_id"]
    path = f"/v1/approvals/{theirs}/status"
    for headers in (None, {"Authorization": f"Bearer {other}"}, {"Authorization": f"Bearer {approver_token(idp)}"}):
        reply = fresh.curl(STATUS_BASE + path, *[a for k, v in (headers or {}).items() for a in ("-H", f"{k}: {v}")])
        assert reply.status == 404, (headers, reply)
        assert problem(reply)["title"] == "No such approval" and mark not in reply.body
    unknown = fresh.curl(f"{STATUS_BASE}/v1/approvals/apr_doesnotexist/status")
    assert unknown.status == 404, unknown
    # the other agent, with its own token, reads it at the control API (as Proctor's uid can)
    own = fresh.curl(STATUS_BASE + path, "-H", f"Authorization: Bearer {other}", uid=PROXY_UID)
    assert own.status == 200 and own.json()["state"] == "pending", own
    assert operator_view(fresh, idp, theirs)["agent"] == "other-agent"


def test_nothing_else_at_the_control_address_is_answered(fresh: Netns, idp):
    """Only GET of a status path is answered: approving (even with an approver token), listing,
    health, a body or another method is refused 508 and recorded, and never reaches the control API."""
    mark = f"m-{uuid.uuid4().hex}"
    body = held(fresh, create(fresh, ERP, mark))
    aid = body["approval_id"]
    approver = approver_token(idp)
    attempts = [
        ("POST", f"/v1/approvals/{aid}/approve", ["-H", f"Authorization: Bearer {approver}",
                                                  "-H", "Content-Type: application/json",
                                                  "--data-binary", '{"reason": "self-approved"}']),
        ("GET", f"/v1/approvals/{aid}", ["-H", f"Authorization: Bearer {approver}"]),
        ("GET", "/v1/approvals", []),
        ("GET", "/healthz", []),
        ("GET", f"/v1/approvals/{aid}/status/extra", []),
        ("POST", f"/v1/approvals/{aid}/status", ["--data-binary", "x"]),
        ("DELETE", f"/v1/approvals/{aid}/status", []),
        ("GET", f"/v1/approvals/{aid}/status", ["--data-binary", "x"]),  # a status request has no body
        ("GET", "/items/1", ["-H", f"Host: erp.test:{HTTP_PORT}"]),  # no way out through the status address
    ]
    for method, path, extra in attempts:
        reply = fresh.curl(STATUS_BASE + path, *extra, method=method)
        assert reply.status == 508, (method, path, reply)
        doc = problem(reply)
        assert doc["reasons"] == ["transparent-loop"] and "GET /v1/approvals/{id}/status" in doc["detail"], doc
        rec = fresh.decision(doc["decision_id"])
        assert (rec["agent"], rec["host"], rec["port"]) == (WORKLOAD, "127.0.0.1", CONTROL_PORT), rec
    # TLS to the status address: not the status URL (plain HTTP); closed, recorded, never looped
    tls = fresh.curl(f"https://127.0.0.1:{CONTROL_PORT}/v1/approvals/{aid}/status", ca=True)
    assert tls.status is None, tls
    view = operator_view(fresh, idp, aid)
    assert view["state"] == "pending" and view["votes"] == [], view
    assert fresh.received("erp-http") == []
    # Proctor's other listeners stay closed to the agent
    for port in (FORWARD_PORT, 8082):
        assert fresh.curl(f"http://127.0.0.1:{port}/healthz").status is None
