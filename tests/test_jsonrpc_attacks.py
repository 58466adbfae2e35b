"""JSON-RPC bodies that are not one plain call, against a real Proctor and a recording upstream.

The test connector's MCP route (tests/conftest.py) maps `tools/list` (anyone) and the
`create_ticket` tool (writers; `mcp-no-p1-from-agents` forbids priority 1); everything else
is unmapped, so denied. Each case sends raw bytes through the forward proxy, as an attacker
would, and asserts the answer (never a 500, never a hang), and that the upstream never
received the body at all.

What no caller awaits an answer to (a notification, a response the agent sends back, a
batch, anything that is no single call with a usable id) is refused with the refusal's HTTP
status and a JSON-RPC error with `"id": null` (MCP Streamable HTTP: a message the server
cannot accept gets an HTTP error status); a call with an id keeps HTTP 200 and its id.
"""

from __future__ import annotations

import json

import pytest
import requests

pytestmark = pytest.mark.integration

ALLOWED = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
DENIED = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
          "params": {"name": "create_ticket", "arguments": {"priority": 1, "title": "DENIED-CONTENT"}}}


def post(proctor, upstream, token, body: str | bytes, agent: str = "writer-bot", timeout: float = 15):
    return requests.post(
        f"http://127.0.0.1:{upstream.port}/mcp",
        data=body.encode() if isinstance(body, str) else body,
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream"},
        proxies={"http": proctor.proxy_url_with(agent, token)},
        timeout=timeout,
    )


def reached_upstream(upstream) -> list[dict]:
    return [e for e in upstream.received() if e["path"] == "/mcp"]


def assert_refused_without_id(proctor, r, status: int, code: int) -> dict:
    """A refusal of a message no caller awaits: the HTTP status says it, the body is a JSON-RPC
    error with id null carrying the reason and the decision id, which is in the record."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"jsonrpc", "id", "error"} and body["jsonrpc"] == "2.0" and body["id"] is None
    err = body["error"]
    assert err["code"] == code, err
    data = err["data"]
    assert data["status"] == status and data["decision_id"] == r.headers["x-proctor-decision-id"]
    assert proctor.decision(data["decision_id"])["decision"] == "deny"
    return err


# -- notifications and responses -------------------------------------------------------------

def test_a_denied_notification_is_an_http_403_with_a_jsonrpc_error_without_id(proctor, upstream, writer_token):
    upstream.clear()
    note = {k: v for k, v in DENIED.items() if k != "id"}
    r = post(proctor, upstream, writer_token, json.dumps(note))
    err = assert_refused_without_id(proctor, r, 403, -32001)
    assert err["data"]["reasons"] == ["mcp-no-p1-from-agents"] and "mcp-no-p1-from-agents" in err["message"]
    rec = proctor.decision(err["data"]["decision_id"])
    assert rec["rpc"] == {"method": "tools/call", "tool": "create_ticket"} and rec["status"] == 403
    assert reached_upstream(upstream) == []


def test_an_allowed_notification_still_reaches_the_upstream(proctor, upstream, writer_token):
    upstream.clear()
    r = post(proctor, upstream, writer_token, json.dumps({"jsonrpc": "2.0", "method": "tools/list"}))
    assert r.status_code == 200 and r.json()["echo"] is True
    [seen] = reached_upstream(upstream)
    assert json.loads(seen["body"]) == {"jsonrpc": "2.0", "method": "tools/list"}


def test_an_unmapped_notification_is_refused_with_an_http_status(proctor, upstream, writer_token):
    upstream.clear()
    r = post(proctor, upstream, writer_token,
             json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}}))
    err = assert_refused_without_id(proctor, r, 403, -32601)
    assert "notifications/cancelled" in err["message"]
    assert reached_upstream(upstream) == []


@pytest.mark.parametrize("answer", [
    {"jsonrpc": "2.0", "id": 5, "result": {"action": "accept", "content": {"confirm": True}}},
    {"jsonrpc": "2.0", "id": "srv-1", "error": {"code": -1, "message": "user declined"}},
], ids=["result", "error"])
def test_a_refused_response_is_an_http_error_whose_body_has_no_id(proctor, upstream, writer_token, answer):
    """The agent's answer to a server request: its id is the server's, no caller of the agent's
    waits on it, so the refusal does not echo it as if it answered a call."""
    upstream.clear()
    r = post(proctor, upstream, writer_token, json.dumps(answer))
    err = assert_refused_without_id(proctor, r, 403, -32601)
    assert "rpc.response" in err["message"]
    assert reached_upstream(upstream) == []


def test_a_denied_call_keeps_http_200_and_its_id(proctor, upstream, writer_token):
    upstream.clear()
    for id_ in ("abc", 7, 0, -3, "", 1e3):
        r = post(proctor, upstream, writer_token, json.dumps({**DENIED, "id": id_}))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == id_ and body["error"]["code"] == -32001
        assert body["error"]["data"]["decision_id"] == r.headers["x-proctor-decision-id"]
    assert reached_upstream(upstream) == []


def test_a_denied_call_with_a_null_id_is_answered_like_a_notification(proctor, upstream, writer_token):
    """MCP forbids null ids and no JSON-RPC caller can match an answer to one."""
    upstream.clear()
    r = post(proctor, upstream, writer_token, json.dumps({**DENIED, "id": None}))
    assert_refused_without_id(proctor, r, 403, -32001)
    assert reached_upstream(upstream) == []


# -- batches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [
    [ALLOWED, DENIED],
    [DENIED, ALLOWED],
    [ALLOWED, {**ALLOWED, "id": 3}],  # every element allowed: still one decision per request
    [],
    [{**ALLOWED, "id": 1}, {**DENIED, "id": 1}],  # duplicate ids
    [{k: v for k, v in DENIED.items() if k != "id"}],  # a batch of one notification
    [{"jsonrpc": "2.0", "id": 9, "result": {}}, DENIED],  # a response and a call
    [[DENIED]],  # nested
    [ALLOWED] * 200,
], ids=["allowed-then-denied", "denied-then-allowed", "all-allowed", "empty", "duplicate-ids",
        "one-notification", "response-and-call", "nested", "many"])
def test_a_batch_is_refused_as_a_whole_and_nothing_of_it_is_forwarded(proctor, upstream, writer_token, batch):
    upstream.clear()
    r = post(proctor, upstream, writer_token, json.dumps(batch))
    err = assert_refused_without_id(proctor, r, 400, -32602)
    assert "batches are not accepted" in err["message"]
    assert reached_upstream(upstream) == []


# -- what is no JSON-RPC 2.0 message ------------------------------------------------------------

@pytest.mark.parametrize("body", [
    '"tools/list"', "42", "null", "true", "", "   ", "{}",
    json.dumps({**ALLOWED, "jsonrpc": "1.0"}),
    json.dumps({**ALLOWED, "jsonrpc": 2.0}),
    json.dumps({**ALLOWED, "jsonrpc": "2.0 "}),
    json.dumps({k: v for k, v in ALLOWED.items() if k != "jsonrpc"}),
    json.dumps({**ALLOWED, "method": ["tools/list"]}),
    json.dumps({"jsonrpc": "1.0", "id": 5, "result": {}}),  # a response of another version
    json.dumps({"jsonrpc": "2.0", "id": 5, "result": {}, "params": {"name": "create_ticket"}}),
    json.dumps({"jsonrpc": "2.0", "id": 5, "result": {}, "error": {"code": 1, "message": "x"}}),
    json.dumps({"jsonrpc": "2.0", "method": "rpc.response", "params": {}}),
], ids=["string", "number", "null", "boolean", "empty", "blank", "empty-object", "version-1.0",
        "version-number", "version-padded", "version-missing", "method-not-string", "response-1.0",
        "response-extra-member", "result-and-error", "notifies-rpc.response"])
def test_what_is_no_jsonrpc_message_is_refused_not_forwarded(proctor, upstream, writer_token, body):
    upstream.clear()
    r = post(proctor, upstream, writer_token, body)
    assert r.status_code in (400, 403), r.text
    assert r.json()["id"] is None and r.json()["error"]["code"] in (-32602, -32601)
    assert r.json()["error"]["data"]["decision_id"] == r.headers["x-proctor-decision-id"]
    assert reached_upstream(upstream) == []


def test_calling_the_reserved_response_name_is_refused(proctor, upstream, writer_token):
    """`rpc.response` names the agent's answers in a connector; a call by that name is no answer."""
    upstream.clear()
    r = post(proctor, upstream, writer_token, json.dumps({"jsonrpc": "2.0", "id": 5, "method": "rpc.response"}))
    assert r.status_code == 200 and r.json()["id"] == 5 and r.json()["error"]["code"] == -32602
    assert "reserved" in r.json()["error"]["message"]
    assert reached_upstream(upstream) == []


@pytest.mark.parametrize("doc", [
    {**ALLOWED, "result": {}},
    {**ALLOWED, "error": {"code": 1, "message": "x"}},
    {**DENIED, "result": {"content": []}},
    {"jsonrpc": "2.0", "method": "tools/list", "result": {}},  # no id either
], ids=["allowed-with-result", "allowed-with-error", "denied-with-result", "notification-with-result"])
def test_a_message_both_call_and_response_is_refused(proctor, upstream, writer_token, doc):
    """Servers differ on which it is (the MCP SDK reads the call; a dispatcher testing for
    `result` first, an answer to its own request): an answer policy would deny could pass as
    an allowed call."""
    upstream.clear()
    r = post(proctor, upstream, writer_token, json.dumps(doc))
    err = assert_refused_without_id(proctor, r, 400, -32602)
    assert "not both" in err["message"]
    assert reached_upstream(upstream) == []


def test_duplicate_members_are_refused(proctor, upstream, writer_token):
    """Parsers disagree on which duplicate wins: `method` twice could be judged as one, run as the other."""
    upstream.clear()
    body = ('{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "method": "tools/call", '
            '"params": {"name": "create_ticket", "arguments": {"priority": 1}}}')
    r = post(proctor, upstream, writer_token, body)
    assert_refused_without_id(proctor, r, 400, -32602)
    assert reached_upstream(upstream) == []


# -- ids ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("id_text", [
    '{"a": 1}', "[1]", "true", "false", "1.5", "-0.25",
    "1e999999999", "-1e999999999", "1e-999999999", "1e5000", "1E+100", "123456789012345678901234567890123456789012345678901234567890123456789",
    "9" * 5000,
], ids=["object", "array", "true", "false", "fraction", "negative-fraction", "exponent-huge", "exponent-huge-negative", "exponent-tiny",
        "exponent-5000", "exponent-100", "69-digits", "5000-digits"])
@pytest.mark.parametrize("call", [ALLOWED, DENIED], ids=["allowed-method", "denied-method"])
def test_an_id_of_no_jsonrpc_type_or_outsized_is_refused_fast(proctor, upstream, writer_token, id_text, call):
    """An id must be a string, an integer or null. `1e999999999` made Proctor build a billion-digit
    integer to echo it (a hang); `1e5000` one it could not serialise (a 500)."""
    upstream.clear()
    rest = json.dumps({k: v for k, v in call.items() if k != "id"})
    body = '{"id": ' + id_text + ", " + rest[1:]
    r = post(proctor, upstream, writer_token, body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["id"] is None and r.json()["error"]["code"] == -32602
    assert r.json()["error"]["data"]["decision_id"] == r.headers["x-proctor-decision-id"]
    assert reached_upstream(upstream) == []


def test_an_id_written_with_an_exponent_is_echoed_as_the_integer(proctor, upstream, writer_token):
    upstream.clear()
    r = post(proctor, upstream, writer_token, '{"id": 2e3, ' + json.dumps({k: v for k, v in DENIED.items()
                                                                            if k != "id"})[1:])
    assert r.status_code == 200 and r.json()["id"] == 2000 and r.json()["error"]["code"] == -32001
    assert reached_upstream(upstream) == []


def test_refusals_for_messages_without_caller_on_the_gateway(gateway_proctor, upstream, idp):
    """Both gateway engines render the same answer (the refusal is rendered in one place)."""
    upstream.clear()
    note = {k: v for k, v in DENIED.items() if k != "id"}
    r = requests.post(f"{gateway_proctor.gateway_url}/svc/mcp", data=json.dumps(note),
                      headers={"Content-Type": "application/json",
                               "Authorization": f"Bearer {idp.token('writer-bot', groups=['writers'])}"},
                      timeout=15)
    err = assert_refused_without_id(gateway_proctor, r, 403, -32001)
    assert err["data"]["reasons"] == ["mcp-no-p1-from-agents"]
    r = requests.post(f"{gateway_proctor.gateway_url}/svc/mcp", data=json.dumps([ALLOWED, DENIED]),
                      headers={"Content-Type": "application/json",
                               "Authorization": f"Bearer {idp.token('writer-bot', groups=['writers'])}"},
                      timeout=15)
    assert_refused_without_id(gateway_proctor, r, 400, -32602)
    assert reached_upstream(upstream) == []
