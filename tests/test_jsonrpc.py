"""JSON-RPC endpoints (MCP Streamable HTTP tools/call): the operation is in the body; refusals are JSON-RPC errors."""

from __future__ import annotations

import json

import pytest
import requests

pytestmark = pytest.mark.integration


def call(proctor, upstream, token, payload, agent="writer-bot"):
    return requests.post(
        f"http://127.0.0.1:{upstream.port}/mcp",
        json=payload,
        headers={"Accept": "application/json, text/event-stream"},
        proxies={"http": proctor.proxy_url_with(agent, token) if token else proctor.proxy_url},
        timeout=10,
    )


def tool_call(name, arguments, id_=7):
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


def test_allowed_tool_call_reaches_upstream(proctor, upstream, writer_token):
    upstream.clear()
    r = call(proctor, upstream, writer_token, tool_call("create_ticket", {"priority": 3, "title": "printer"}))
    assert r.status_code == 200 and "error" not in r.json()
    assert json.loads(upstream.last()["body"])["params"]["name"] == "create_ticket"
    rec = proctor.decision(r.headers["x-proctor-decision-id"])
    assert rec["action"] == "test.mcp.create_ticket" and rec["resource"] == 'McpTool::"create_ticket"'
    assert rec["rpc"] == {"method": "tools/call", "tool": "create_ticket"}
    assert "printer" not in json.dumps(rec)  # arguments are never recorded


def test_policy_refusal_is_a_jsonrpc_error(proctor, upstream, writer_token):
    upstream.clear()
    r = call(proctor, upstream, writer_token, tool_call("create_ticket", {"priority": 1}, id_="abc"))
    assert r.status_code == 200
    body = r.json()
    assert body["jsonrpc"] == "2.0" and body["id"] == "abc"
    err = body["error"]
    assert err["code"] == -32001
    assert err["data"]["reasons"] == ["mcp-no-p1-from-agents"]
    assert err["data"]["decision_id"] == r.headers["x-proctor-decision-id"]
    assert err["data"]["action"] == "test.mcp.create_ticket"
    assert err["data"]["status"] == 403
    assert upstream.received() == []


def test_principal_without_permit_is_refused(proctor, upstream, reader_token):
    r = call(proctor, upstream, reader_token, tool_call("create_ticket", {"priority": 3}), agent="reader-bot")
    assert r.json()["error"]["code"] == -32001 and r.json()["error"]["data"]["reasons"] == []


def test_unmapped_tool_and_method_are_method_not_found(proctor, upstream, writer_token):
    upstream.clear()
    r = call(proctor, upstream, writer_token, tool_call("delete_everything", {}))
    assert r.json()["error"]["code"] == -32601
    assert "delete_everything" in r.json()["error"]["message"]
    r = call(proctor, upstream, writer_token, {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {}})
    assert r.json()["error"]["code"] == -32601
    assert upstream.received() == []


def test_generic_method_operation(proctor, upstream, reader_token):
    r = call(proctor, upstream, reader_token, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, agent="reader-bot")
    assert r.status_code == 200 and "error" not in r.json()
    assert proctor.decision(r.headers["x-proctor-decision-id"])["action"] == "test.mcp.list"


@pytest.mark.parametrize(
    "payload, status, id_",
    [
        # no single call a caller waits on: the refusal's HTTP status, id null (tests/test_jsonrpc_attacks.py)
        ([tool_call("create_ticket", {"priority": 3}), tool_call("create_ticket", {"priority": 1})], 400, None),
        ({"method": "tools/call"}, 400, None),  # not JSON-RPC 2.0
        (tool_call("create_ticket", {"priority": "high"}), 200, 7),  # a call: wrong type for a declared field
    ],
    ids=["batch", "not-jsonrpc", "field-type"],
)
def test_malformed_calls_are_invalid_params(proctor, upstream, writer_token, payload, status, id_):
    upstream.clear()
    r = call(proctor, upstream, writer_token, payload)
    assert r.status_code == status and r.json()["error"]["code"] == -32602 and r.json()["id"] == id_
    assert upstream.received() == []


def test_authentication_stays_http(proctor, upstream):
    r = call(proctor, upstream, None, tool_call("create_ticket", {"priority": 3}))
    assert r.status_code == 407
    assert r.headers["content-type"] == "application/problem+json"
