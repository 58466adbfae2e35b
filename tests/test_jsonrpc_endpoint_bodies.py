"""A JSON-RPC endpoint's path reached with another HTTP method, and held messages no caller awaits.

Against real Proctor processes (forward proxy, and the gateway on both engines) and the
recording upstream. The test connector is tests/conftest.py's `testsvc` plus what an MCP
connector declares next to its JSON-RPC route (examples/mcp/helpdesk-mcp.yaml): plain
routes for the GET stream and the DELETE that ends a session on the same path, the
client's answers (`rpc.response`), and a second JSON-RPC endpoint under a wildcard path
with a plain route inside it.

1. A body sent to such a path with another method than the JSON-RPC one is classified
   by the plain route (`test.mcp.stream`, `test.mcp.end`): no policy judged the call it
   may hold, and a server that runs any body as JSON-RPC would run it. It is refused
   (400, `body-not-allowed`) and never forwarded, whichever way the body is framed; the
   same request without a body goes through. A plain REST route keeps its bodies (they
   are read into `context.body` like any other).
2. In `approvals.mode: sync`, a held notification or client response is answered at once
   (429 + Retry-After, its approval pending) instead of keeping the POST open for
   `sync_wait_seconds`; a held call still waits.
"""

from __future__ import annotations

import json
import shutil
import socket
import time

import httpx
import pytest
import requests
import yaml

from conftest import DATA, GATEWAY_ENGINES, connector_manifest, start_proctor

pytestmark = pytest.mark.integration

MANAGERS = "managers"
CALL = {"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "create_ticket", "arguments": {"priority": 1, "title": "SMUGGLED"}}}
NOTE = {"jsonrpc": "2.0", "method": "tools/list"}
ANSWER = {"jsonrpc": "2.0", "id": 3, "result": {"action": "accept", "content": {"confirm": True}}}

POLICY = """
@id("anyone-streams-and-ends")
permit (principal, action in [Action::"test.mcp.stream", Action::"test.mcp.end", Action::"test.rpc.health",
                              Action::"test.rpc.call", Action::"test.item.search"], resource);

@id("anyone-answers")
permit (principal, action == Action::"test.mcp.respond", resource);

@id("held-agents-need-a-manager")
@approval("managers")
forbid (principal in AgentGroup::"held",
        action in [Action::"test.mcp.list", Action::"test.mcp.respond"], resource)
unless { context has approval && context.approval.groups.contains("managers") };
"""

APPROVAL_TYPE = (
    "type Approval = { id: String, approver: String, approvers: Set<String>, groups: Set<String>, "
    "time: datetime, note: String };\n"
)


def manifest(http_port: int, https_port: int) -> dict:
    m = connector_manifest(http_port, https_port)
    [mcp] = [r for r in m["routes"] if r["path"] == "/mcp"]
    mcp["jsonrpc"].append({"method": "rpc.response", "action": "test.mcp.respond",
                           "resource": {"type": "McpTool", "id": "*"}})
    server = {"type": "McpTool", "id": "server"}
    m["routes"] += [
        {"method": "GET", "path": "/mcp", "action": "test.mcp.stream", "resource": server},
        {"method": "DELETE", "path": "/mcp", "action": "test.mcp.end", "resource": server},
        # a JSON-RPC endpoint under a wildcard, with a plain route inside its path
        {"method": "POST", "path": "/rpc/{*}",
         "jsonrpc": [{"method": "tools/list", "action": "test.rpc.call", "resource": server}]},
        {"method": "GET", "path": "/rpc/health", "action": "test.rpc.health", "resource": server},
        # plain REST: a GET whose body is read like any other (Elasticsearch-style search)
        {"method": "GET", "path": "/search", "action": "test.item.search",
         "resource": {"type": "Item", "id": "search"}},
    ]
    return m


@pytest.fixture(scope="module", params=GATEWAY_ENGINES)
def rpc_proctor(request, tmp_path_factory, idp, pki, upstream, upstream_tls):
    """A proctor in sync approval mode (3 s wait), its gateway served by each engine in turn."""
    base = tmp_path_factory.mktemp(f"rpc-bodies-{request.param}")
    policies = base / "policies-src"
    shutil.copytree(DATA / "policies", policies)
    schema = (policies / "schema.cedarschema").read_text()
    assert "rpc: { method: String, tool?: String }," in schema and "type Approval" not in schema
    schema = schema.replace("type McpContext", APPROVAL_TYPE + "type McpContext", 1)
    schema = schema.replace("rpc: { method: String, tool?: String },",
                            "rpc: { method: String, tool?: String },\n  approval?: Approval,", 1)
    (policies / "schema.cedarschema").write_text(schema)
    (policies / "rpc-bodies.cedar").write_text(POLICY)
    connectors = base / "connectors-src"
    connectors.mkdir()
    (connectors / "testsvc.yaml").write_text(yaml.safe_dump(manifest(upstream.port, upstream_tls.port)))
    p = start_proctor(base / "p", idp, pki, upstream, upstream_tls, policies_src=policies, overrides={
        "connectors_dir": str(connectors),
        "gateway": {"engine": request.param},
        "approvals": {"mode": "sync", "sync_wait_seconds": 3, "expire_after_seconds": 60},
    })
    yield p
    p.stop()


def seen(upstream, path: str = "/mcp") -> list[dict]:
    return [e for e in upstream.received() if e["path"] == path]


def assert_body_refused(p, r, method: str) -> None:
    """400 problem+json naming the reason, recorded as a refusal; nothing forwarded (checked by the caller)."""
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    body = r.json()
    assert body["title"] == "Request body not allowed" and body["reasons"] == ["body-not-allowed"]
    assert "POST" in body["detail"] and method in body["detail"]
    rec = p.decision(r.headers["x-proctor-decision-id"])
    assert rec["decision"] == "deny" and rec["status"] == 400 and rec["reasons"] == ["body-not-allowed"]


def send(p, upstream, idp, method: str, path: str, via: str, agent: str = "writer-bot", **kw):
    token = idp.token(agent, groups=["writers"])
    if via == "gateway":
        return requests.request(method, f"{p.gateway_url}/svc{path}", timeout=15,
                                headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})}, **kw)
    return requests.request(method, f"http://127.0.0.1:{upstream.port}{path}", timeout=15,
                            proxies={"http": p.proxy_url_with(agent, token)}, **kw)


VIAS = ("forward", "gateway")


# -- 1. bodies on a JSON-RPC endpoint's path ----------------------------------------------------

@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_with_another_method_on_the_jsonrpc_path_is_refused(rpc_proctor, upstream, idp, via, method,
                                                                   framing):
    upstream.clear()
    data = json.dumps(CALL).encode()
    body = data if framing == "content-length" else iter([data[:10], data[10:]])  # a generator: chunked
    r = send(rpc_proctor, upstream, idp, method, "/mcp", via, data=body,
             headers={"Content-Type": "application/json"})
    assert_body_refused(rpc_proctor, r, method)
    assert seen(upstream) == []


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_without_a_body_the_stream_and_the_end_go_through(rpc_proctor, upstream, idp, via, method):
    upstream.clear()
    r = send(rpc_proctor, upstream, idp, method, "/mcp", via)
    assert r.status_code == 200, r.text
    assert r.json()["method"] == method
    [got] = seen(upstream)
    assert got["method"] == method and got["body"] == ""
    assert rpc_proctor.decision(r.headers["x-proctor-decision-id"])["action"] == f"test.mcp.{'stream' if method == 'GET' else 'end'}"


def raw_request(port: int, head: str, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(head.encode() + body)  # (Connection: close: read to the end)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("headers", [
    "Transfer-Encoding: chunked\r\n",
    "Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",  # a zero declared length, the body chunked
], ids=["chunked", "zero-length-and-chunked"])
def test_a_chunked_body_on_a_get_of_the_endpoint_never_reaches_the_upstream(rpc_proctor, upstream, idp, via, headers):
    """Raw bytes, as an attacker would frame them: whatever the engine makes of the framing
    (this refusal, or its own 400 for an ambiguous one), the call is not forwarded."""
    upstream.clear()
    data = json.dumps(CALL).encode()
    chunked = f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n"
    token = idp.token("writer-bot", groups=["writers"])
    if via == "gateway":
        port, target, auth = rpc_proctor.gateway_port, "/svc/mcp", f"Authorization: Bearer {token}\r\n"
    else:
        port, target = rpc_proctor.port, f"http://127.0.0.1:{upstream.port}/mcp"
        auth = "Proxy-Authorization: " + requests.auth._basic_auth_str("writer-bot", token) + "\r\n"
    head = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n{auth}"
            f"Content-Type: application/json\r\nConnection: close\r\n{headers}\r\n")
    answer = raw_request(port, head, chunked)
    status = int(answer.split(b" ", 2)[1])
    assert status == 400, answer[:400]
    assert seen(upstream) == []
    if "Content-Length" not in headers:
        assert b"body-not-allowed" in answer, answer[:600]
    else:  # both framings: refused as ambiguous (request smuggling) before any route is asked
        low = answer.lower()
        assert b"body-not-allowed" in low or (b"transfer-encoding" in low and b"content-length" in low), answer


@pytest.mark.parametrize("via", VIAS)
def test_a_plain_route_inside_a_wildcard_jsonrpc_path_takes_no_body(rpc_proctor, upstream, idp, via):
    upstream.clear()
    r = send(rpc_proctor, upstream, idp, "GET", "/rpc/health", via, data=json.dumps(CALL),
             headers={"Content-Type": "application/json"})
    assert_body_refused(rpc_proctor, r, "GET")
    assert seen(upstream, "/rpc/health") == []
    r = send(rpc_proctor, upstream, idp, "GET", "/rpc/health", via)
    assert r.status_code == 200, r.text
    assert len(seen(upstream, "/rpc/health")) == 1


@pytest.mark.parametrize("via", VIAS)
def test_a_rest_get_keeps_its_body(rpc_proctor, upstream, idp, via):
    """Only JSON-RPC endpoints' paths: a plain REST route's body is read into context.body and
    forwarded as before (search APIs take a GET body)."""
    upstream.clear()
    r = send(rpc_proctor, upstream, idp, "GET", "/search", via, json={"query": {"match": "x"}})
    assert r.status_code == 200, r.text
    [got] = seen(upstream, "/search")
    assert json.loads(got["body"]) == {"query": {"match": "x"}}


# -- 2. held notifications and answers in sync mode -----------------------------------------------

def approver(idp) -> str:
    return idp.token("alice", aud="proctor-approvers", approval_groups=[MANAGERS], ttl=600)


def approval(p, idp, approval_id: str) -> dict:
    r = httpx.get(f"{p.control_url}/v1/approvals/{approval_id}", headers={"Authorization": f"Bearer {approver(idp)}"},
                  timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def post_held(p, upstream, idp, doc: dict, via: str):
    token = idp.token("held-bot", groups=["held"])
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if via == "gateway":
        return requests.post(f"{p.gateway_url}/svc/mcp", data=json.dumps(doc), timeout=15,
                             headers={**headers, "Authorization": f"Bearer {token}"})
    return requests.post(f"http://127.0.0.1:{upstream.port}/mcp", data=json.dumps(doc), headers=headers,
                         proxies={"http": p.proxy_url_with("held-bot", token)}, timeout=15)


@pytest.mark.parametrize("via", VIAS)
@pytest.mark.parametrize("doc", [NOTE, ANSWER], ids=["notification", "client-response"])
def test_in_sync_mode_a_held_message_no_caller_awaits_is_answered_at_once(rpc_proctor, upstream, idp, via, doc):
    upstream.clear()
    doc = {**doc, "params": {"marker": f"{via}-{time.monotonic_ns()}"}} if "method" in doc else \
        {**doc, "id": time.monotonic_ns() % 10**9}
    t0 = time.monotonic()
    r = post_held(rpc_proctor, upstream, idp, doc, via)
    waited = time.monotonic() - t0
    assert waited < 2, waited
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) > 0
    body = r.json()
    assert body["id"] is None and body["error"]["code"] == -32002
    data = body["error"]["data"]
    assert data["reasons"] == ["held-agents-need-a-manager"] and data["approval_groups"] == {MANAGERS: 1}
    got = approval(rpc_proctor, idp, data["approval_id"])
    assert got["state"] == "pending" and got["agent"] == "held-bot"
    assert got["mode"] == "async"  # what it is: the agent was answered at once, its retry is released
    assert rpc_proctor.decision(data["decision_id"])["decision"] == "hold"
    assert seen(upstream) == []

    # approved, the agent's retry goes through once
    r2 = httpx.post(f"{rpc_proctor.control_url}/v1/approvals/{data['approval_id']}/approve",
                    headers={"Authorization": f"Bearer {approver(idp)}"}, json={"reason": "ok"}, timeout=10)
    assert r2.status_code == 200, r2.text
    r = post_held(rpc_proctor, upstream, idp, doc, via)
    assert r.status_code == 200 and r.json()["echo"] is True, r.text
    [got_up] = seen(upstream)
    assert json.loads(got_up["body"]) == doc


def test_in_sync_mode_a_held_call_still_waits(rpc_proctor, upstream, idp):
    """A call's caller waits on its answer: sync mode holds it open (here 3 s), then says pending."""
    upstream.clear()
    call = {"jsonrpc": "2.0", "id": 11, "method": "tools/list", "params": {"marker": time.monotonic_ns()}}
    t0 = time.monotonic()
    r = post_held(rpc_proctor, upstream, idp, call, "gateway")  # (each engine in turn)
    waited = time.monotonic() - t0
    assert 2.5 <= waited < 10, waited
    assert r.status_code == 200 and r.json()["id"] == 11 and r.json()["error"]["code"] == -32002, r.text
    assert approval(rpc_proctor, idp, r.json()["error"]["data"]["approval_id"])["state"] == "pending"
    assert seen(upstream) == []

