"""Typed connector values: OData keys, typed path and query parameters, JSON body fields."""

from __future__ import annotations

import pytest

from proxy.connectors.classifier import Classifier
from proxy.connectors.manifest import ConnectorManifest, ValueSpec
from proxy.connectors.values import ValueRejected, typed, with_body_fields

ERP = {
    "name": "erp",
    "hosts": ["erp.example.com"],
    "routes": [
        {
            "method": "GET",
            "path": "/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder('{po}')",
            "action": "erp.po.read",
            "resource": {"type": "PurchaseOrder", "id": "{po}"},
            "params": {"po": {"type": "string", "pattern": "45[0-9]{8}"}},
            "query": {"$top": {"type": "long", "min": 1, "max": 100}, "sap-client": {"type": "string", "required": False}},
        },
        {
            "method": "POST",
            "path": "/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder",
            "action": "erp.po.create",
            "resource": {"type": "PurchaseOrder", "id": "new"},
            "body": {
                "total": {"path": "d.NetAmount", "type": "decimal", "required": True},
                "supplier": {"path": "d.Supplier", "type": "string"},
                "materials": {"path": "d.to_PurchaseOrderItem[*].Material", "type": "string"},
                "first_qty": {"path": "d.to_PurchaseOrderItem[0].Quantity", "type": "long"},
            },
            "resource_attributes": ["total", "supplier"],
        },
        {
            "method": "GET",
            "path": "/tenants/{tenant}/items",
            "action": "erp.items.list",
            "resource": {"type": "Tenant", "id": "{tenant}"},
            "params": {"tenant": {"type": "long", "min": 1}},
            "resource_attributes": ["tenant"],
        },
    ],
}


@pytest.fixture
def clf() -> Classifier:
    return Classifier([ConnectorManifest.model_validate(ERP)])


PO = "/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder"


def test_odata_key_and_typed_query(clf):
    c = clf.classify("GET", "erp.example.com", 443, f"{PO}('4500000001')", "$top=10&sap-client=100&other=x")
    assert c.action == "erp.po.read" and c.resource_uid == 'PurchaseOrder::"4500000001"'
    assert c.params == {"po": "4500000001"}
    assert c.query_params == {"$top": 10, "sap-client": "100"}


@pytest.mark.parametrize(
    "path, query, message",
    [
        (f"{PO}('12')", "", "pattern"),
        (f"{PO}('4500000001')", "$top=ten", "integer"),
        (f"{PO}('4500000001')", "$top=500", "at most 100"),
        (f"{PO}('4500000001')", "$top=1&$top=2", "more than once"),
        ("/tenants/abc/items", "", "integer"),
        ("/tenants/0/items", "", "at least 1"),
    ],
)
def test_values_of_the_wrong_type_are_refused(clf, path, query, message):
    with pytest.raises(ValueRejected, match=message):
        clf.classify("GET", "erp.example.com", 443, path, query)


def test_odata_key_cannot_smuggle_quotes_or_parens(clf):
    # a key containing ' or ) is not matched by the OData route at all (and nothing laxer matches)
    assert clf.classify("GET", "erp.example.com", 443, f"{PO}('45')or('1')", "") is None


def test_typed_path_param_and_resource_attribute(clf):
    c = clf.classify("GET", "erp.example.com", 443, "/tenants/42/items", "")
    assert c.params == {"tenant": 42} and c.resource_attrs["tenant"] == 42


def test_body_fields(clf):
    c = clf.classify("POST", "erp.example.com", 443, PO, "")
    doc = {"d": {"NetAmount": "1250.50", "Supplier": "17300001", "to_PurchaseOrderItem": [
        {"Material": "M-1", "Quantity": 3}, {"Material": "M-2", "Quantity": "5"}]}}
    c2 = with_body_fields(c, doc)
    assert c2.fields == {
        "total": {"__extn": {"fn": "decimal", "arg": "1250.5"}},
        "supplier": "17300001",
        "materials": ["M-1", "M-2"],
        "first_qty": 3,
    }
    assert c2.resource_attrs["total"] == {"__extn": {"fn": "decimal", "arg": "1250.5"}}
    assert c2.resource_attrs["supplier"] == "17300001"


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"d": {}}, "required"),
        ({"d": {"NetAmount": "12.34567"}}, "4 decimal places"),
        ({"d": {"NetAmount": "lots"}}, "decimal number"),
        ({"d": {"NetAmount": 1, "Supplier": 17}}, "must be a string"),
        (None, "required"),  # not JSON at all
    ],
)
def test_body_field_refusals(clf, doc, message):
    c = clf.classify("POST", "erp.example.com", 443, PO, "")
    with pytest.raises(ValueRejected, match=message):
        with_body_fields(c, doc)


@pytest.mark.parametrize(
    "spec, raw, expected",
    [
        ({"type": "long"}, "-7", -7),
        ({"type": "bool"}, "TRUE", True),
        ({"type": "decimal"}, 3, {"__extn": {"fn": "decimal", "arg": "3.0"}}),
        ({"type": "decimal"}, "0.0001", {"__extn": {"fn": "decimal", "arg": "0.0001"}}),
    ],
)
def test_typed_conversions(spec, raw, expected):
    assert typed(ValueSpec(**spec), raw, "v") == expected


@pytest.mark.parametrize("spec, raw", [({"type": "long"}, True), ({"type": "long"}, 2**64), ({"type": "bool"}, "yes"), ({"type": "decimal"}, "NaN")])
def test_typed_rejections(spec, raw):
    with pytest.raises(ValueRejected):
        typed(ValueSpec(**spec), raw, "v")


def test_manifest_rejects_bad_declarations():
    bad = dict(ERP["routes"][2], params={"nope": {"type": "long"}})
    with pytest.raises(Exception, match="does not define"):
        ConnectorManifest.model_validate(dict(ERP, routes=[bad]))
    bad = dict(ERP["routes"][1], resource_attributes=["unknown"])
    with pytest.raises(Exception, match="resource_attributes"):
        ConnectorManifest.model_validate(dict(ERP, routes=[bad]))
    bad = dict(ERP["routes"][1], body={"x": {"path": "a..b", "type": "string"}})
    with pytest.raises(Exception, match="body path"):
        ConnectorManifest.model_validate(dict(ERP, routes=[bad]))


MCP = {
    "name": "mcp",
    "hosts": ["tools.example.com"],
    "routes": [
        {
            "method": "POST",
            "path": "/mcp",
            "jsonrpc": [
                {"method": "tools/call", "action": "mcp.call.any", "resource": {"type": "Tool"}},
                {
                    "method": "tools/call",
                    "tool": "refund",
                    "action": "mcp.refund",
                    "resource": {"type": "Tool", "id": "{tool}"},
                    "body": {"amount": {"path": "params.arguments.amount", "type": "decimal", "required": True}},
                    "resource_attributes": ["amount"],
                },
            ],
        }
    ],
}


def _mcp(doc):
    c = Classifier([ConnectorManifest.model_validate(MCP)]).classify("POST", "tools.example.com", 443, "/mcp", "")
    assert c.action == "" and c.rpc_ops
    return with_body_fields(c, doc)


def test_jsonrpc_tool_specific_operation_wins():
    c = _mcp({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "refund", "arguments": {"amount": "12.5", "note": "x"}}})
    assert (c.action, c.resource_uid) == ("mcp.refund", 'Tool::"refund"')
    assert c.fields == {"amount": {"__extn": {"fn": "decimal", "arg": "12.5"}}}
    assert c.resource_attrs["amount"] == c.fields["amount"]
    assert c.rpc == {"method": "tools/call", "tool": "refund"}
    assert c.arguments == {"amount": "12.5", "note": "x"}


def test_jsonrpc_generic_operation_and_default_id():
    c = _mcp({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "lookup", "arguments": {}}})
    assert (c.action, c.resource_uid) == ("mcp.call.any", 'Tool::"lookup"')


def test_jsonrpc_unmapped_and_malformed():
    assert _mcp({"jsonrpc": "2.0", "id": 1, "method": "prompts/get"}).action == ""
    with pytest.raises(ValueRejected, match="batches"):
        _mcp([{"jsonrpc": "2.0", "id": 1, "method": "tools/call"}])
    with pytest.raises(ValueRejected, match="JSON-RPC 2.0"):
        _mcp({"method": "tools/call"})
    with pytest.raises(ValueRejected, match="required"):
        _mcp({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "refund", "arguments": {}}})


def test_jsonrpc_route_declaration_rules():
    bad = dict(MCP["routes"][0], action="x")
    with pytest.raises(Exception, match="operations, not the route"):
        ConnectorManifest.model_validate(dict(MCP, routes=[bad]))
    with pytest.raises(Exception, match="needs an action and a resource"):
        ConnectorManifest.model_validate(dict(MCP, routes=[{"method": "GET", "path": "/x"}]))
