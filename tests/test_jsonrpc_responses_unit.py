"""JSON-RPC responses the agent sends back (an MCP client answering the server's own
requests: elicitation, sampling, roots/list, ping) are mapped by the reserved method
`rpc.response` (proxy/connectors/values.py); the example MCP connector loads; and the
refusal of a message no caller awaits (notification, response, batch) is an HTTP error."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from proxy.connectors.classifier import Classifier
from proxy.connectors.manifest import ConnectorManifest
from proxy.connectors.values import (
    RESPONSE_METHOD,
    ValueRejected,
    is_jsonrpc_response,
    jsonrpc_request_id,
    with_body_fields,
)
from proxy.core.exchange import HOLD_KIND, Exchange
from proxy.core.model import AgentRequest, Refusal
from proxy.core.problem import DECISION_HEADER, refusal_answer

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mcp" / "helpdesk-mcp.yaml"


def _connector(ops: list[dict]) -> Classifier:
    return Classifier([ConnectorManifest.model_validate({
        "name": "mcp", "hosts": ["tools.example.com"],
        "routes": [{"method": "POST", "path": "/mcp", "jsonrpc": ops}],
    })])


WITH_RESPONSES = _connector([
    {"method": "tools/call", "action": "mcp.call", "resource": {"type": "Tool"}},
    {"method": RESPONSE_METHOD, "action": "mcp.respond", "resource": {"type": "Server", "id": "s"},
     "body": {"answer": {"path": "result.action", "type": "string", "pattern": "accept|decline|cancel"}}},
])
WITHOUT_RESPONSES = _connector([{"method": "tools/call", "action": "mcp.call", "resource": {"type": "Tool"}}])


def _resolve(classifier: Classifier, doc):
    c = classifier.classify("POST", "tools.example.com", 443, "/mcp", "")
    assert c is not None
    return with_body_fields(c, doc)


@pytest.mark.parametrize("doc, expected", [
    ({"jsonrpc": "2.0", "id": 3, "result": {}}, True),
    ({"jsonrpc": "2.0", "id": "a", "error": {"code": -1, "message": "no"}}, True),
    ({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse"}}, True),
    ({"jsonrpc": "2.0", "result": {}}, False),  # no id
    ({"jsonrpc": "2.0", "id": 1, "result": {}, "error": {}}, False),  # both
    ({"jsonrpc": "2.0", "id": 1}, False),  # neither
    ({"jsonrpc": "2.0", "id": 1, "result": {}, "method": "tools/call"}, False),  # a call in disguise
    ({"jsonrpc": "2.0", "id": 1, "result": {}, "params": {"name": "x"}}, False),  # extra members
    ({"jsonrpc": "1.0", "id": 1, "result": {}}, False),
    ([{"jsonrpc": "2.0", "id": 1, "result": {}}], False),
])
def test_what_counts_as_a_response(doc, expected):
    assert is_jsonrpc_response(doc) is expected


def test_a_response_takes_the_rpc_response_operation_with_its_fields():
    c = _resolve(WITH_RESPONSES, {"jsonrpc": "2.0", "id": 0, "result": {"action": "accept", "content": {"ok": True}}})
    assert (c.action, c.resource_uid) == ("mcp.respond", 'Server::"s"')
    assert c.rpc == {"method": RESPONSE_METHOD}
    assert c.fields == {"answer": "accept"}
    assert c.arguments is None


def test_a_response_value_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueRejected):
        _resolve(WITH_RESPONSES, {"jsonrpc": "2.0", "id": 0, "result": {"action": "exfiltrate"}})


def test_without_an_operation_for_responses_they_are_unmapped():
    """Unmapped means denied by default (egress-default-deny), like any unmapped call."""
    c = _resolve(WITHOUT_RESPONSES, {"jsonrpc": "2.0", "id": 0, "result": {}})
    assert c.action == "" and c.rpc == {"method": RESPONSE_METHOD}


def test_a_call_cannot_pass_as_a_response():
    """A message with a method and a result or error is refused: servers differ on which it is
    (the MCP SDK reads the call; a dispatcher testing for `result` first, an answer to its own
    request), so an answer policy would deny could pass as an allowed call; and
    calling the reserved name itself is refused (-32602), so only a real response is judged as one."""
    for disguised in ({"jsonrpc": "2.0", "id": 1, "result": {}, "method": "tools/call", "params": {"name": "x"}},
                      {"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": "m"}, "method": "tools/call"},
                      {"jsonrpc": "2.0", "id": 1, "method": RESPONSE_METHOD, "result": {}}):
        with pytest.raises(ValueRejected, match="not both"):
            _resolve(WITH_RESPONSES, disguised)
    with pytest.raises(ValueRejected, match="reserved"):
        _resolve(WITH_RESPONSES, {"jsonrpc": "2.0", "id": 1, "method": RESPONSE_METHOD, "params": {}})


def test_the_example_mcp_connector_maps_every_message_the_official_client_sends():
    manifest = ConnectorManifest.model_validate(yaml.safe_load(EXAMPLE.read_text()))
    post = next(r for r in manifest.routes if r.method == "POST")
    methods = {op.method for op in post.jsonrpc or []}
    assert methods >= {
        "initialize", "ping", "notifications/initialized", "notifications/cancelled", "notifications/progress",
        "notifications/roots/list_changed", RESPONSE_METHOD, "tools/list", "tools/call", "resources/list",
        "resources/templates/list", "resources/read", "prompts/list", "prompts/get"}
    assert {(r.method, r.path) for r in manifest.routes} == {("POST", "/mcp"), ("GET", "/mcp"), ("DELETE", "/mcp")}
    # no catch-all tools/call: a tool the server adds later is denied until it is mapped
    assert all(op.tool for op in post.jsonrpc or [] if op.method == "tools/call")


# -- which refusals echo an id (core/problem.py answers the others with an HTTP error status) --

@pytest.mark.parametrize("doc, expected", [
    ({"jsonrpc": "2.0", "id": 7, "method": "tools/call"}, 7),
    ({"jsonrpc": "2.0", "id": "a", "method": "tools/call"}, "a"),
    ({"jsonrpc": "2.0", "id": Decimal("2E+3"), "method": "ping"}, 2000),  # written 2e3
    ({"jsonrpc": "2.0", "method": "notifications/cancelled"}, None),  # a notification
    ({"jsonrpc": "2.0", "id": None, "method": "tools/call"}, None),  # no caller can match a null id
    ({"jsonrpc": "2.0", "id": 3, "result": {}}, None),  # the agent's answer: the id is the server's
    ({"jsonrpc": "2.0", "id": 3, "method": "ping", "result": {}}, None),  # both (refused as such)
    ({"jsonrpc": "1.0", "id": 3, "method": "ping"}, None),
    ({"id": 3, "method": "ping"}, None),
    ([{"jsonrpc": "2.0", "id": 3, "method": "ping"}], None),  # a batch
    ("ping", None),
    (None, None),
])
def test_the_id_a_refusal_echoes(doc, expected):
    assert jsonrpc_request_id(doc) == expected


@pytest.mark.parametrize("value", [
    {"a": 1}, [1], True, False, Decimal("1.5"), Decimal("1E+999999999"), Decimal("-1E+999999999"),
    Decimal("1E-999999999"), Decimal("1E+64"), 10 ** 64,
])
def test_an_id_of_no_jsonrpc_type_or_outsized_is_refused(value):
    for doc in ({"jsonrpc": "2.0", "id": value, "method": "ping"}, {"jsonrpc": "2.0", "id": value, "result": {}}):
        with pytest.raises(ValueRejected, match="JSON-RPC id"):
            jsonrpc_request_id(doc)


def _refused(refusal: Refusal, jsonrpc_id) -> Exchange:
    ex = Exchange(AgentRequest(method="POST", scheme="https", host="tools.example.com", port=443, path="/mcp",
                               query="", headers={}, body=b"", client_ip="127.0.0.1", mode="forward"),
                  is_jsonrpc=True, jsonrpc_id=jsonrpc_id)
    ex.refuse(refusal)
    return ex


DENY = Refusal(403, "Denied by policy", "no", reasons=["p1"], kind="policy")
HOLD = Refusal(202, "Held for approval", "wait", reasons=["p2"], kind=HOLD_KIND,
               headers={"Retry-After": "5", "Location": "http://c/approvals/a1"})
LIMIT = Refusal(429, "Rate limit", "slow down", kind="rate-limit", headers={"Retry-After": "3"})


@pytest.mark.parametrize("refusal, jsonrpc_id, status", [
    (DENY, 7, 200), (DENY, None, 403),
    (HOLD, "x", 200), (HOLD, None, 429),
    (LIMIT, 1, 200), (LIMIT, None, 429),
    (Refusal(503, "Unavailable", "x", kind="fail-closed"), None, 503),
    (Refusal(409, "Conflict", "x", kind="claim"), None, 409),
])
def test_a_refusal_without_caller_is_an_http_error_status(refusal, jsonrpc_id, status):
    ex = _refused(refusal, jsonrpc_id)
    got, headers, raw = refusal_answer(ex)
    body = json.loads(raw)
    assert got == status and body["id"] == jsonrpc_id and body["error"]["data"]["status"] == refusal.status
    assert headers[DECISION_HEADER] == ex.decision_id == body["error"]["data"]["decision_id"]
    for name, value in refusal.headers.items():
        assert headers[name] == value
