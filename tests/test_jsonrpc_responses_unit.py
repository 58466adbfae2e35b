"""JSON-RPC responses the agent sends back (an MCP client answering the server's own
requests: elicitation, sampling, roots/list, ping) are mapped by the reserved method
`rpc.response` (proxy/connectors/values.py); and the example MCP connector loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.connectors.classifier import Classifier
from proxy.connectors.manifest import ConnectorManifest
from proxy.connectors.values import RESPONSE_METHOD, ValueRejected, is_jsonrpc_response, with_body_fields

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
    """A message with a method is a call, whatever else it carries; and calling the reserved
    name itself is refused (-32602), so only a real response is judged as one."""
    disguised = {"jsonrpc": "2.0", "id": 1, "result": {}, "method": "tools/call", "params": {"name": "x"}}
    assert _resolve(WITH_RESPONSES, disguised).action == "mcp.call"  # judged as the call it is
    with pytest.raises(ValueRejected, match="reserved"):
        _resolve(WITH_RESPONSES, {"jsonrpc": "2.0", "id": 1, "method": RESPONSE_METHOD, "result": {}})


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
