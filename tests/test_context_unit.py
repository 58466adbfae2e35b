"""Cedar context building and JSON conversion (no processes)."""

from __future__ import annotations

import pytest

from proxy.config import PrincipalMapping
from proxy.core.context import BodyRejected, parse_json_body, principal_entity, to_cedar
from proxy.core.model import AgentIdentity, AgentRequest


def req(body: bytes, ctype: str = "application/json") -> AgentRequest:
    return AgentRequest("POST", "https", "h", 443, "/", "", {"content-type": ctype}, body, "127.0.0.1", "forward")


def test_json_conversion():
    assert to_cedar({"a": 1, "b": [True, "x"], "c": None, "d": 1.5, "e": 0.12345, "f": 2**70}) == {
        "a": 1,
        "b": [True, "x"],
        "d": {"__extn": {"fn": "decimal", "arg": "1.5"}},
    }


def test_body_cannot_smuggle_extension_or_entity_escapes():
    out = to_cedar({"__extn": {"fn": "ip", "arg": "10.0.0.1"}, "x": {"__entity": {"type": "Agent", "id": "admin"}}})
    assert out == {"x": {}}


def test_malformed_json_refused():
    with pytest.raises(BodyRejected):
        parse_json_body(req(b"{nope"), 32)


def test_non_json_body_not_parsed():
    assert parse_json_body(req(b"a=b", "application/x-www-form-urlencoded"), 32) is None


def test_depth_limit():
    deep = b"[" * 50 + b"]" * 50
    with pytest.raises(BodyRejected, match="deeper"):
        parse_json_body(req(deep), 32)


def test_vendor_json_content_type_parsed():
    assert parse_json_body(req(b'{"a": 1}', "application/vnd.api+json; charset=utf-8"), 32) == {"a": 1}


def test_principal_mapping():
    ident = AgentIdentity("bot", "iss", {"team": "ops", "groups": ["a", "", 3, "b"], "score": 1.25}, None)
    ent = principal_entity(ident, PrincipalMapping(attributes={"team": "team", "score": "score", "missing": "nope"}))
    assert ent["uid"] == {"type": "Agent", "id": "bot"}
    assert ent["attrs"] == {"team": "ops", "score": {"__extn": {"fn": "decimal", "arg": "1.25"}}}
    assert ent["parents"] == [{"type": "AgentGroup", "id": "a"}, {"type": "AgentGroup", "id": "b"}]


def test_pathologically_deep_json_is_a_clean_refusal():
    with pytest.raises(BodyRejected, match="deeper"):
        parse_json_body(req(b"[" * 200_000), 32)


def test_context_carries_the_target_port():
    from proxy.core.context import request_context
    from proxy.core.model import Classification

    ctx = request_context(req(b""), Classification("c", "a", "T", "i"), None, [])
    assert ctx["port"] == 443 and ctx["host"] == "h"


def test_typed_decimal_resource_attributes_survive_as_decimals():
    """Regression: typed decimals copied into resource attributes were stripped to {}
    (to_cedar drops __extn keys from agent JSON) and reached Cedar as empty records."""
    from proxy.core.context import resource_entity
    from proxy.core.model import Classification

    dec = {"__extn": {"fn": "decimal", "arg": "26000.0"}}
    cls = Classification(
        connector="erp", action="erp.purchase_order.create", resource_type="PurchaseOrder", resource_id="new",
        resource_attrs={"net_amount": dec, "prices": [dec], "static_ratio": 0.5, "supplier": "17300001"},
    )
    attrs = resource_entity(cls)["attrs"]
    assert attrs["net_amount"] == dec
    assert attrs["prices"] == [dec]
    assert attrs["static_ratio"] == {"__extn": {"fn": "decimal", "arg": "0.5"}}
    assert attrs["supplier"] == "17300001"
