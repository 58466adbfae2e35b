"""A small stateful mock of SAP S/4HANA's purchase-order and supplier OData V2 APIs.

    python -m proxy.demo.mock_erp --port 9103

Speaks the paths and JSON shapes of API_PURCHASEORDER_PROCESS_SRV and
API_BUSINESS_PARTNER closely enough for the demo and the tests: `{"d": {...}}`
entity answers, `{"d": {"results": [...]}}` collections, deep insert of
`to_PurchaseOrderItem`, and OData error bodies. `app[RELEASES]` counts release
calls per order (tests use it to prove a held call reached the ERP once).
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from decimal import Decimal, InvalidOperation

from aiohttp import web

PO_SRV = "/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV"
BP_SRV = "/sap/opu/odata/sap/API_BUSINESS_PARTNER"
RELEASES = web.AppKey("releases", dict)
LAST_AUTHORIZATION = web.AppKey("last_authorization", list)

_KEY_RE = re.compile(r"^'([^']{1,20})'$")


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": {"lang": "en", "value": message}}}, status=status)


def _odata_date(epoch: float) -> str:
    return f"/Date({int(epoch * 1000)})/"


def build_app() -> web.Application:
    suppliers = {
        "17300001": {"Supplier": "17300001", "SupplierName": "Acme Office Supplies", "Country": "DE", "PostingIsBlocked": False},
        "17300002": {"Supplier": "17300002", "SupplierName": "Globex Industrial", "Country": "US", "PostingIsBlocked": False},
        "17300099": {"Supplier": "17300099", "SupplierName": "Shady Trading Ltd", "Country": "XX", "PostingIsBlocked": True},
    }
    orders: dict[str, dict] = {}
    numbers = itertools.count(4500000001)
    releases: dict[str, int] = {}

    def po_view(po: dict, expand: bool) -> dict:
        out = {k: v for k, v in po.items() if k != "items"}
        out["__metadata"] = {"uri": f"{PO_SRV}/A_PurchaseOrder('{po['PurchaseOrder']}')", "type": "API_PURCHASEORDER_PROCESS_SRV.A_PurchaseOrderType"}
        if expand:
            out["to_PurchaseOrderItem"] = {"results": po["items"]}
        else:
            out["to_PurchaseOrderItem"] = {"__deferred": {"uri": f"{PO_SRV}/A_PurchaseOrder('{po['PurchaseOrder']}')/to_PurchaseOrderItem"}}
        return out

    def add_order(body: dict, created_by: str = "PROCTOR_TECH") -> dict:
        number = str(next(numbers))
        items = []
        for i, item in enumerate(body.get("to_PurchaseOrderItem") or [], start=1):
            items.append({
                "PurchaseOrder": number,
                "PurchaseOrderItem": f"{i * 10:05d}",
                "Material": str(item.get("Material", "")),
                "OrderQuantity": str(item.get("OrderQuantity", "1")),
                "NetPriceAmount": str(item.get("NetPriceAmount", "0")),
                "PurchaseOrderQuantityUnit": item.get("PurchaseOrderQuantityUnit", "EA"),
            })
        po = {
            "PurchaseOrder": number,
            "PurchaseOrderType": body.get("PurchaseOrderType", "NB"),
            "CompanyCode": body["CompanyCode"],
            "Supplier": body["Supplier"],
            "DocumentCurrency": body.get("DocumentCurrency", "EUR"),
            "PurchasingOrganization": body.get("PurchasingOrganization", "1010"),
            "CreatedByUser": created_by,
            "CreationDate": _odata_date(time.time()),
            "ReleaseStatus": "NOT_RELEASED",
            "items": items,
        }
        orders[number] = po
        return po

    add_order({"CompanyCode": "1010", "Supplier": "17300001", "to_PurchaseOrderItem": [
        {"Material": "PAPER-A4", "OrderQuantity": "50", "NetPriceAmount": "4.20"}]}, created_by="J.DOE")

    def key(request: web.Request, name: str) -> str | None:
        m = _KEY_RE.match(request.match_info[name])
        return m.group(1) if m else None

    async def remember_auth(request: web.Request) -> None:
        request.app[LAST_AUTHORIZATION][:] = [request.headers.get("Authorization")]

    async def list_suppliers(request: web.Request) -> web.Response:
        await remember_auth(request)
        top = int(request.query.get("$top", "100"))
        return web.json_response({"d": {"results": list(suppliers.values())[:top]}})

    async def get_supplier(request: web.Request) -> web.Response:
        await remember_auth(request)
        s = suppliers.get(key(request, "key") or "")
        if s is None:
            return _error(404, "SY/530", "Resource not found for segment 'A_Supplier'")
        return web.json_response({"d": s})

    async def list_orders(request: web.Request) -> web.Response:
        await remember_auth(request)
        top = int(request.query.get("$top", "100"))
        expand = request.query.get("$expand") == "to_PurchaseOrderItem"
        return web.json_response({"d": {"results": [po_view(p, expand) for p in list(orders.values())[:top]]}})

    async def get_order(request: web.Request) -> web.Response:
        await remember_auth(request)
        po = orders.get(key(request, "key") or "")
        if po is None:
            return _error(404, "SY/530", "Resource not found for segment 'A_PurchaseOrder'")
        return web.json_response({"d": po_view(po, request.query.get("$expand") == "to_PurchaseOrderItem")})

    async def create_order(request: web.Request) -> web.Response:
        await remember_auth(request)
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "CX_SXML_PARSE_ERROR", "The request body is not valid JSON")
        if not isinstance(body, dict) or not body.get("Supplier") or not body.get("CompanyCode"):
            return _error(400, "ME/083", "Enter Supplier and CompanyCode")
        if body["Supplier"] not in suppliers:
            return _error(400, "06/042", f"Supplier {body['Supplier']} does not exist")
        if suppliers[body["Supplier"]]["PostingIsBlocked"]:
            return _error(400, "06/044", f"Supplier {body['Supplier']} is blocked for posting")
        items = body.get("to_PurchaseOrderItem") or []
        if not isinstance(items, list) or not items:
            return _error(400, "ME/062", "Enter at least one item")
        try:
            for item in items:
                Decimal(str(item.get("OrderQuantity", "1")))
                Decimal(str(item.get("NetPriceAmount", "0")))
        except (InvalidOperation, AttributeError):
            return _error(400, "ME/064", "Quantity and net price must be numbers")
        po = add_order(body)
        return web.json_response({"d": po_view(po, True)}, status=201,
                                 headers={"Location": f"{PO_SRV}/A_PurchaseOrder('{po['PurchaseOrder']}')"})

    async def release_order(request: web.Request) -> web.Response:
        await remember_auth(request)
        number = key(request, "key") or ""
        po = orders.get(number)
        if po is None:
            return _error(404, "SY/530", "Resource not found for segment 'A_PurchaseOrder'")
        releases[number] = releases.get(number, 0) + 1
        if po["ReleaseStatus"] == "RELEASED":
            return _error(409, "ME/179", f"Purchase order {number} is already released")
        po["ReleaseStatus"] = "RELEASED"
        return web.json_response({"d": po_view(po, False)})

    app = web.Application()
    app[RELEASES] = releases
    app[LAST_AUTHORIZATION] = [None]
    app.router.add_get(BP_SRV + "/A_Supplier", list_suppliers)
    app.router.add_get(BP_SRV + "/A_Supplier({key})", get_supplier)
    app.router.add_get(PO_SRV + "/A_PurchaseOrder", list_orders)
    app.router.add_post(PO_SRV + "/A_PurchaseOrder", create_order)
    app.router.add_get(PO_SRV + "/A_PurchaseOrder({key})", get_order)
    app.router.add_post(PO_SRV + "/A_PurchaseOrder({key})/Release", release_order)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9103)
    args = ap.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
