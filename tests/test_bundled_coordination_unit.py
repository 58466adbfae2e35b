"""The bundled connectors' coordination declarations, without processes: which routes
claim, what the ERP's dedupe key treats as the same purchase order, whom a ticketing
reassignment hands the claim to, and what the bundled policies say to such handoffs.

The same behaviour through a real proxy is in tests/test_bundled_connectors.py."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from proxy.config import default_config
from proxy.connectors.classifier import Classifier
from proxy.connectors.manifest import load_manifest
from proxy.connectors.values import ValueRejected, with_body_fields
from proxy.coordination.dedupe import dedupe_key
from proxy.coordination.handoff import handoff_target
from proxy.policy.engine import load_bundle
from proxy.policy.sources import policy_source

CONNECTORS = Path(__file__).resolve().parent.parent / "connectors"
PO = "/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder"


def order(*lines: tuple[str, Any, Any], supplier: str = "17300001", company: str = "1010") -> dict:
    return {"Supplier": supplier, "CompanyCode": company, "DocumentCurrency": "EUR",
            "to_PurchaseOrderItem": [{"Material": m, "OrderQuantity": q, "NetPriceAmount": p} for m, q, p in lines]}


def key_of(body: dict) -> str:
    erp = load_manifest(CONNECTORS / "erp.yaml")
    cls = with_body_fields(Classifier([erp]).classify("POST", "127.0.0.1", 9103, PO), body)
    route = next(r for r in erp.routes if r.action == "erp.purchase_order.create")
    assert route.dedupe is not None
    return dedupe_key(cls, route.dedupe)


def test_erp_create_dedupes_on_supplier_and_item_lines_for_ten_minutes():
    route = next(r for r in load_manifest(CONNECTORS / "erp.yaml").routes if r.action == "erp.purchase_order.create")
    assert route.dedupe is not None
    assert route.dedupe.key == ["supplier", "materials", "quantities", "prices"]
    assert route.dedupe.window_seconds == 600 and route.dedupe.answer == "conflict"
    # only creates: releasing, reading and listing orders are not deduplicated here
    assert [r.action for r in load_manifest(CONNECTORS / "erp.yaml").routes if r.dedupe] == ["erp.purchase_order.create"]


def test_erp_same_order_spelled_differently_is_the_same_work():
    base = key_of(order(("LAPTOP-14", "4", "1150.00"), ("DOCK-USB-C", "4", "49.99")))
    assert key_of(order(("LAPTOP-14", 4, "1150.0"), ("DOCK-USB-C", "4.000", 49.99))) == base
    # a currency or company code outside the key does not make it another order
    assert key_of(dict(order(("LAPTOP-14", "4", "1150.00"), ("DOCK-USB-C", "4", "49.99")), DocumentCurrency="USD")) == base


def test_erp_other_supplier_quantity_price_or_material_is_another_order():
    lines = [("LAPTOP-14", "4", "1150.00"), ("DOCK-USB-C", "4", "49.99")]
    base = key_of(order(*lines))
    others = [
        order(*lines, supplier="17300002"),
        order(("LAPTOP-14", "5", "1150.00"), lines[1]),
        order(("LAPTOP-14", "4", "1150.01"), lines[1]),
        order(("LAPTOP-15", "4", "1150.00"), lines[1]),
        order(lines[0]),
        order(("LAPTOP-14", "4", "1150.00"), ("DOCK-USB-C", "5", "49.99")),
    ]
    keys = [key_of(o) for o in others]
    assert base not in keys and len(set(keys)) == len(keys)
    # quantities swapped between lines: same materials, same numbers, another order
    # (the values keep the items' order, so lines are compared line by line)
    assert key_of(order(("LAPTOP-14", "2", "1150.00"), ("DOCK-USB-C", "8", "49.99"))) != key_of(
        order(("LAPTOP-14", "8", "1150.00"), ("DOCK-USB-C", "2", "49.99")))


def test_ticketing_updates_claim_the_incident_for_fifteen_minutes():
    routes = load_manifest(CONNECTORS / "ticketing.yaml").routes
    claiming = {(r.method, r.action): r.claim for r in routes if r.claim is not None}
    assert set(claiming) == {("PATCH", "ticketing.incident.update"), ("PUT", "ticketing.incident.update")}
    for claim in claiming.values():
        assert (claim.mode, claim.ttl_seconds, claim.acquire) == ("exclusive", 900, "implicit")


# --------------------------------------------------------------------------- ticketing handoffs
INC = "/api/now/table/incident/0123456789abcdef0123456789abcdef"


def ticketing_update(method: str, body: dict):
    """The bundled manifest's reading of an incident update: (classification, route spec)."""
    ticketing = load_manifest(CONNECTORS / "ticketing.yaml")
    cls = with_body_fields(Classifier([ticketing]).classify(method, "127.0.0.1", 9101, INC), body)
    assert cls.action == "ticketing.incident.update"
    return cls, cls.spec


def test_ticketing_updates_declare_a_reassignment_a_handoff():
    routes = load_manifest(CONNECTORS / "ticketing.yaml").routes
    handing = {(r.method, r.action): r.handoff for r in routes if r.handoff is not None}
    assert set(handing) == {("PATCH", "ticketing.incident.update"), ("PUT", "ticketing.incident.update")}
    for h in handing.values():
        assert (h.to.agent, h.to.group) == ("assigned_to", "assignment_group")
        # every assignment group is people: a group value is never taken for an agent id
        assert h.human_groups == ["*"] and h.is_human("service-desk") and h.is_human("network")
        assert h.ttl_seconds is None  # the new holder gets the claim's 15 minutes


@pytest.mark.parametrize("method", ["PATCH", "PUT"])
@pytest.mark.parametrize("body, target", [
    ({"assigned_to": "support-bot-2", "work_notes": "Handing over"}, ("support-bot-2", False)),
    # the assignee named wins over the group: the group stays, the agent takes over
    ({"assigned_to": "support-bot-2", "assignment_group": "service-desk"}, ("support-bot-2", False)),
    # no assignee (or an emptied one): the group's people, in their inbox
    ({"assignment_group": "service-desk", "assigned_to": ""}, ("group:service-desk", True)),
    ({"assignment_group": "service-desk"}, ("group:service-desk", True)),
    ({"assignment_group": "network"}, ("group:network", True)),
    ({"assignment_group": "no-such-team"}, ("group:no-such-team", True)),
    # an update that reassigns nothing moves nothing
    ({"state": "2", "work_notes": "Rebooted the spooler"}, None),
    ({"assigned_to": None, "state": "2"}, None),
    # a value shaped like a people holder names nobody (it would skip human_groups)
    ({"assigned_to": "group:service-desk"}, None),
    ({"assigned_to": "human:dana"}, None),
])
def test_ticketing_handoff_targets(method: str, body: dict, target):
    cls, spec = ticketing_update(method, body)
    assert spec.handoff is not None
    assert handoff_target(spec.handoff, cls.params, cls.fields) == target


def test_ticketing_assignee_of_another_type_is_refused_not_guessed():
    with pytest.raises(ValueRejected):
        ticketing_update("PATCH", {"assigned_to": {"value": "support-bot-2"}})


@functools.cache
def _bundle():
    """The bundled policies with the schema generated from the bundled connectors."""
    return load_bundle(policy_source(default_config()))


def _decide(body: dict, *, agent: str = "support-bot", agent_group: str = "service-desk",
            incident_group: str = "service-desk", holder: str | None = None) -> tuple[str, list[str]]:
    """The bundled policies' decision on an update whose fields the bundled manifest read from
    `body`, on an incident of `incident_group` (the lookup's answer) claimed by `holder`."""
    cls, _ = ticketing_update("PATCH", body)
    mine = holder == agent
    claim = {"held": holder is not None, "holder": holder or "", "holder_groups": ["support"] if holder else [],
             "mine": mine, "mode": "exclusive", "since": 1795254900 if holder else 0,
             "expires_at": 1795255800 if holder else 0, "write": True, "conflict": holder is not None and not mine}
    context = {"method": "PATCH", "path": INC, "query": "", "host": "127.0.0.1", "port": 9101, "headers": {},
               "connector": "ticketing", "risk": "medium",
               "time": {"now": {"__extn": {"fn": "datetime", "arg": "2026-11-21T10:00:00Z"}},
                        "epoch": 1795255200, "hour": 10, "weekday": 6},
               "source_ip": {"__extn": {"fn": "ip", "arg": "127.0.0.1"}}, "mode": "forward",
               "params": cls.params, "fields": cls.fields, "claim": claim}
    sys_id = cls.params["sys_id"]
    entities = [
        {"uid": {"type": "Agent", "id": agent}, "attrs": {"assignment_group": agent_group},
         "parents": [{"type": "AgentGroup", "id": "support"}]},
        {"uid": {"type": "AgentGroup", "id": "support"}, "attrs": {}, "parents": []},
        {"uid": {"type": "Incident", "id": sys_id},
         "attrs": {"table": "incident", "assignment_group": incident_group, "state": "2"}, "parents": []},
    ]
    request = {"principal": f'Agent::"{agent}"', "action": 'Action::"ticketing.incident.update"',
               "resource": f'Incident::"{sys_id}"', "context": context}
    bundle = _bundle()
    result = cedarpy.is_authorized(request, bundle.policy_set,
                                   cedarpy.Entities.from_json_str(json.dumps(entities), bundle.schema),
                                   schema=bundle.schema)  # the request must match the generated schema
    assert result.decision != cedarpy.Decision.NoDecision and not result.diagnostics.errors, result.diagnostics
    return ("allow" if result.decision == cedarpy.Decision.Allow else "deny"), sorted(result.diagnostics.reasons)


def test_bundled_policies_let_a_support_agent_hand_over_to_a_colleague_or_the_service_desk():
    # to a colleague: the group stays, so the reassignment is no move away
    assert _decide({"assigned_to": "support-bot-2"}, holder="support-bot")[0] == "allow"
    # to the people of its own group (the service desk), emptying the assignee
    assert _decide({"assignment_group": "service-desk", "assigned_to": ""}, holder="support-bot")[0] == "allow"
    # an agent of another team may return its own incident to the human service desk
    assert _decide({"assignment_group": "service-desk"}, agent="network-bot", agent_group="network",
                   incident_group="network", holder="network-bot")[0] == "allow"
    # after the handoff: the colleague's update passes, the agent that handed it over gets the claim's 409
    assert _decide({"state": "2"}, agent="support-bot-2", holder="support-bot-2")[0] == "allow"
    assert _decide({"state": "2"}, holder="support-bot-2") == ("deny", ["claim-held-by-another-agent"])
    assert _decide({"state": "2"}, agent="support-bot-2", holder="group:service-desk") == (
        "deny", ["claim-held-by-another-agent"])


def test_bundled_policies_still_keep_incidents_from_being_pushed_onto_another_team():
    away = ("deny", ["no-reassigning-incidents-away"])
    assert _decide({"assignment_group": "network"}, holder="support-bot") == away
    assert _decide({"assignment_group": "network", "assigned_to": "network-bot"}, holder="support-bot") == away
    assert _decide({"assignment_group": "database"}, agent="network-bot", agent_group="network",
                   incident_group="network", holder="network-bot") == away
    # the service-desk exception opens no other team's incident: the lookup's group decides
    assert _decide({"assignment_group": "service-desk", "state": "2"}, incident_group="network") == ("deny", [])
