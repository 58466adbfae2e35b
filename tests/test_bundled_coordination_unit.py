"""The bundled connectors' coordination declarations, without processes: which routes
claim, and what the ERP's dedupe key treats as the same purchase order.

The same behaviour through a real proxy is in tests/test_bundled_connectors.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.connectors.classifier import Classifier
from proxy.connectors.manifest import load_manifest
from proxy.connectors.values import with_body_fields
from proxy.coordination.dedupe import dedupe_key

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
