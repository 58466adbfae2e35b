"""A small stateful mock of SAP S/4HANA's procure-to-pay OData V2 APIs.

    python -m proxy.demo.mock_erp --port 9103

Speaks the paths and JSON shapes of API_PURCHASEREQ_PROCESS_SRV (requisitions),
API_QTN_PROCESS_SRV (supplier quotations), API_PURCHASEORDER_PROCESS_SRV,
API_MATERIAL_DOCUMENT_SRV (goods receipts), API_SUPPLIERINVOICE_PROCESS_SRV
(supplier invoices, and their payment) and API_BUSINESS_PARTNER (suppliers) closely
enough for the demo and the tests: `{"d": {...}}` entity answers,
`{"d": {"results": [...]}}` collections, deep inserts of items, ten-digit document
numbers, and OData error bodies.

The chain is checked as an ERP would: a quotation names an existing requisition
and a supplier that is not blocked; a purchase order may name its quotation and
requisition (which must exist); a goods receipt needs a released order; an
invoice needs an order with a goods receipt, and is refused with 422 when its
gross amount differs from the order's net amount by more than 5 %, or the order
is already invoiced (three-way match failed: the demo's deterministic failing
step; one invoice per order, no partial invoicing), and a supplier's invoice
reference is entered once (409); an invoice is paid once
(`POST A_SupplierInvoice('…')/Pay`, a bound action like the order's `Release`;
SAP itself pays through payment runs, the mock keeps it one call).

Mock simplifications: the purchase order's quotation and requisition, and the
invoice's purchase order, are header fields (SAP keeps them on the items), and a
supplier invoice's key is its number alone (SAP adds FiscalYear).

`app[RELEASES]` counts release calls per order and `app[PAYMENTS]` pay calls per
invoice (tests use them to prove a held or refused call reached the ERP once, or
never); `app[DOCUMENTS]` holds every document by kind (`requisitions`,
`quotations`, `orders`, `goods_receipts`, `invoices`, `payments`), by number.
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
PR_SRV = "/sap/opu/odata/sap/API_PURCHASEREQ_PROCESS_SRV"
QTN_SRV = "/sap/opu/odata/sap/API_QTN_PROCESS_SRV"
MATDOC_SRV = "/sap/opu/odata/sap/API_MATERIAL_DOCUMENT_SRV"
INV_SRV = "/sap/opu/odata/sap/API_SUPPLIERINVOICE_PROCESS_SRV"
RELEASES = web.AppKey("releases", dict)
PAYMENTS = web.AppKey("payments", dict)
DOCUMENTS = web.AppKey("documents", dict)
# An invoice whose gross amount differs from its order's net amount by more than this
# share of the net amount fails the three-way match (422).
MATCH_TOLERANCE = Decimal("0.05")
LAST_AUTHORIZATION = web.AppKey("last_authorization", list)

_KEY_RE = re.compile(r"^'([^']{1,20})'$")
_NUMBER_LIMIT = Decimal(10) ** 15


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": {"lang": "en", "value": message}}}, status=status)


def _odata_date(epoch: float) -> str:
    return f"/Date({int(epoch * 1000)})/"


def _number(raw: object) -> Decimal | None:
    """An OData number (sent as a string or a JSON number) as a finite Decimal below 10^15
    (Cedar's decimal range, and beyond any real amount or quantity), else None."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        return None
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        return None
    return value if value.is_finite() and abs(value) < _NUMBER_LIMIT else None


def _amount_text(value: Decimal) -> str:
    return format(value.quantize(Decimal("0.01")), "f")


def _doc_number(raw: object) -> str | None:
    """A ten-digit document number from a body, else None."""
    return raw if isinstance(raw, str) and re.fullmatch(r"[0-9]{10}", raw) else None


async def _json_body(request: web.Request) -> dict | web.Response:
    """The request's JSON object, or the OData error to answer."""
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "CX_SXML_PARSE_ERROR", "The request body is not valid JSON")
    if not isinstance(body, dict):
        return _error(400, "CX_SXML_PARSE_ERROR", "The request body must be a JSON object")
    return body


def _items(body: dict, nav: str) -> list[dict] | None:
    """The deep-insert items under `nav` (a list of objects, at least one), else None."""
    items = body.get(nav)
    if not isinstance(items, list) or not items or not all(isinstance(i, dict) for i in items):
        return None
    return items


def build_app() -> web.Application:
    suppliers = {
        "17300001": {"Supplier": "17300001", "SupplierName": "Acme Office Supplies", "Country": "DE", "PostingIsBlocked": False},
        "17300002": {"Supplier": "17300002", "SupplierName": "Globex Industrial", "Country": "US", "PostingIsBlocked": False},
        "17300099": {"Supplier": "17300099", "SupplierName": "Shady Trading Ltd", "Country": "XX", "PostingIsBlocked": True},
    }
    requisitions: dict[str, dict] = {}
    quotations: dict[str, dict] = {}
    orders: dict[str, dict] = {}
    goods_receipts: dict[str, dict] = {}
    invoices: dict[str, dict] = {}
    payments: dict[str, dict] = {}
    numbers = itertools.count(4500000001)
    pr_numbers = itertools.count(10000001)  # "0010000001": SAP pads requisition numbers to ten digits
    qtn_numbers = itertools.count(6000000001)
    matdoc_numbers = itertools.count(5000000001)
    invoice_numbers = itertools.count(5105600001)
    payment_numbers = itertools.count(1500000001)
    releases: dict[str, int] = {}
    paid: dict[str, int] = {}

    def view(doc: dict, srv: str, entity_set: str, key: str, nav: str, expand: bool) -> dict:
        """An entity as OData V2 answers it: `__metadata`, and its items expanded or deferred."""
        uri = f"{srv}/{entity_set}({key})"
        out = {k: v for k, v in doc.items() if k != "items"}
        out["__metadata"] = {"uri": uri, "type": f"{srv.rsplit('/', 1)[-1]}.{entity_set}Type"}
        out[nav] = {"results": doc["items"]} if expand else {"__deferred": {"uri": f"{uri}/{nav}"}}
        return out

    def po_view(po: dict, expand: bool) -> dict:
        return view(po, PO_SRV, "A_PurchaseOrder", f"'{po['PurchaseOrder']}'", "to_PurchaseOrderItem", expand)

    def po_net_amount(po: dict) -> Decimal:
        return sum((Decimal(i["OrderQuantity"]) * Decimal(i["NetPriceAmount"]) for i in po["items"]), Decimal(0))

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
            "PurchaseRequisition": body.get("PurchaseRequisition") or "",
            "SupplierQuotation": body.get("SupplierQuotation") or "",
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

    def supplier_error(supplier: object) -> web.Response | None:
        if not isinstance(supplier, str) or supplier not in suppliers:
            return _error(400, "06/042", f"Supplier {supplier} does not exist")
        if suppliers[supplier]["PostingIsBlocked"]:
            return _error(400, "06/044", f"Supplier {supplier} is blocked for posting")
        return None

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

    # ---- purchase requisitions (API_PURCHASEREQ_PROCESS_SRV) ----

    def pr_view(pr: dict, expand: bool) -> dict:
        return view(pr, PR_SRV, "A_PurchaseRequisitionHeader", f"'{pr['PurchaseRequisition']}'",
                    "to_PurchaseReqnItem", expand)

    async def create_requisition(request: web.Request) -> web.Response:
        await remember_auth(request)
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        items = _items(body, "to_PurchaseReqnItem")
        if items is None:
            return _error(400, "ME/062", "Enter at least one item (to_PurchaseReqnItem)")
        lines = []
        for i, item in enumerate(items, start=1):
            material = item.get("Material")
            quantity, price = _number(item.get("RequestedQuantity")), _number(item.get("PurchaseRequisitionPrice"))
            if not isinstance(material, str) or not material:
                return _error(400, "ME/083", f"Item {i}: enter a Material")
            if quantity is None or quantity <= 0 or price is None or price < 0:
                return _error(400, "ME/064", f"Item {i}: RequestedQuantity must be a positive number and "
                                             "PurchaseRequisitionPrice a number of at least 0")
            lines.append((material, quantity, price, item))
        number = f"{next(pr_numbers):010d}"
        pr = {
            "PurchaseRequisition": number,
            "PurchaseRequisitionType": body.get("PurchaseRequisitionType", "NB"),
            "PurReqnDescription": str(body.get("PurReqnDescription", "")),
            "CreatedByUser": "PROCTOR_TECH",
            "CreationDate": _odata_date(time.time()),
            "items": [{
                "PurchaseRequisition": number,
                "PurchaseRequisitionItem": f"{i * 10:05d}",
                "Material": material,
                "RequestedQuantity": format(quantity, "f"),
                "PurchaseRequisitionPrice": format(price, "f"),
                "PurReqnItemCurrency": item.get("PurReqnItemCurrency", "EUR"),
                "BaseUnit": item.get("BaseUnit", "EA"),
                "Plant": item.get("Plant", "1010"),
            } for i, (material, quantity, price, item) in enumerate(lines, start=1)],
        }
        requisitions[number] = pr
        return web.json_response({"d": pr_view(pr, True)}, status=201,
                                 headers={"Location": f"{PR_SRV}/A_PurchaseRequisitionHeader('{number}')"})

    async def get_requisition(request: web.Request) -> web.Response:
        await remember_auth(request)
        pr = requisitions.get(key(request, "key") or "")
        if pr is None:
            return _error(404, "SY/530", "Resource not found for segment 'A_PurchaseRequisitionHeader'")
        return web.json_response({"d": pr_view(pr, request.query.get("$expand") == "to_PurchaseReqnItem")})

    # ---- supplier quotations (API_QTN_PROCESS_SRV) ----

    def qtn_view(qtn: dict, expand: bool) -> dict:
        return view(qtn, QTN_SRV, "A_SupplierQuotation", f"'{qtn['SupplierQuotation']}'",
                    "to_SupplierQuotationItem", expand)

    async def create_quotation(request: web.Request) -> web.Response:
        await remember_auth(request)
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        if not body.get("PurchaseRequisition") or not body.get("Supplier"):
            return _error(400, "ME/083", "Enter PurchaseRequisition and Supplier")
        requisition = _doc_number(body["PurchaseRequisition"])
        if requisition is None or requisition not in requisitions:
            return _error(400, "06/301", f"Purchase requisition {body['PurchaseRequisition']} does not exist")
        refused = supplier_error(body["Supplier"])
        if refused is not None:
            return refused
        items = _items(body, "to_SupplierQuotationItem")
        if items is None:
            return _error(400, "ME/062", "Enter at least one item (to_SupplierQuotationItem)")
        lines = []
        for i, item in enumerate(items, start=1):
            quantity, price = _number(item.get("OrderQuantity")), _number(item.get("NetPriceAmount"))
            if quantity is None or quantity <= 0 or price is None or price < 0:
                return _error(400, "ME/064", f"Item {i}: OrderQuantity must be a positive number and "
                                             "NetPriceAmount a number of at least 0")
            lines.append((quantity, price, item))
        number = str(next(qtn_numbers))
        qtn = {
            "SupplierQuotation": number,
            "PurchaseRequisition": requisition,
            "Supplier": body["Supplier"],
            "CompanyCode": body.get("CompanyCode", "1010"),
            "PurchasingOrganization": body.get("PurchasingOrganization", "1010"),
            "DocumentCurrency": body.get("DocumentCurrency", "EUR"),
            "QuotationSubmissionDate": _odata_date(time.time()),
            "CreatedByUser": "PROCTOR_TECH",
            "items": [{
                "SupplierQuotation": number,
                "SupplierQuotationItem": f"{i * 10:05d}",
                "Material": str(item.get("Material", "")),
                "OrderQuantity": format(quantity, "f"),
                "NetPriceAmount": format(price, "f"),
                "OrderQuantityUnit": item.get("OrderQuantityUnit", "EA"),
            } for i, (quantity, price, item) in enumerate(lines, start=1)],
        }
        quotations[number] = qtn
        return web.json_response({"d": qtn_view(qtn, True)}, status=201,
                                 headers={"Location": f"{QTN_SRV}/A_SupplierQuotation('{number}')"})

    async def get_quotation(request: web.Request) -> web.Response:
        await remember_auth(request)
        qtn = quotations.get(key(request, "key") or "")
        if qtn is None:
            return _error(404, "SY/530", "Resource not found for segment 'A_SupplierQuotation'")
        return web.json_response({"d": qtn_view(qtn, request.query.get("$expand") == "to_SupplierQuotationItem")})

    # ---- purchase orders (API_PURCHASEORDER_PROCESS_SRV) ----

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

    def reference_error(body: dict) -> web.Response | None:
        """An order's optional SupplierQuotation and PurchaseRequisition: each must exist, the
        quotation must be the order's supplier's, and name the same requisition. An order naming
        only the quotation takes over the quotation's requisition (written into `body`)."""
        raw_qtn, raw_pr = body.get("SupplierQuotation"), body.get("PurchaseRequisition")
        if raw_pr not in (None, ""):
            requisition = _doc_number(raw_pr)
            if requisition is None or requisition not in requisitions:
                return _error(400, "06/301", f"Purchase requisition {raw_pr} does not exist")
        if raw_qtn not in (None, ""):
            number = _doc_number(raw_qtn)
            qtn = quotations.get(number or "")
            if qtn is None:
                return _error(400, "06/302", f"Supplier quotation {raw_qtn} does not exist")
            if qtn["Supplier"] != body["Supplier"]:
                return _error(400, "06/303", f"Supplier quotation {number} is from supplier {qtn['Supplier']}, "
                                             f"not {body['Supplier']}")
            if raw_pr in (None, ""):
                body["PurchaseRequisition"] = qtn["PurchaseRequisition"]
            elif raw_pr != qtn["PurchaseRequisition"]:
                return _error(400, "06/304", f"Supplier quotation {number} belongs to purchase requisition "
                                             f"{qtn['PurchaseRequisition']}, not {raw_pr}")
        return None

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
        for item in items:
            if not isinstance(item, dict) or _number(item.get("OrderQuantity", "1")) is None \
                    or _number(item.get("NetPriceAmount", "0")) is None:
                return _error(400, "ME/064", "Quantity and net price must be numbers")
        refused = reference_error(body)
        if refused is not None:
            return refused
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

    # ---- goods receipts (API_MATERIAL_DOCUMENT_SRV) ----

    def matdoc_key(doc: dict) -> str:
        return f"MaterialDocumentYear='{doc['MaterialDocumentYear']}',MaterialDocument='{doc['MaterialDocument']}'"

    def gr_view(doc: dict, expand: bool) -> dict:
        return view(doc, MATDOC_SRV, "A_MaterialDocumentHeader", matdoc_key(doc), "to_MaterialDocumentItem", expand)

    async def create_goods_receipt(request: web.Request) -> web.Response:
        await remember_auth(request)
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        if body.get("GoodsMovementCode", "01") != "01":
            return _error(400, "M7/001", "Only goods receipts for purchase orders (GoodsMovementCode 01) are supported")
        items = _items(body, "to_MaterialDocumentItem")
        if items is None:
            return _error(400, "M7/062", "Enter at least one item (to_MaterialDocumentItem)")
        lines = []
        for i, item in enumerate(items, start=1):
            raw = item.get("PurchaseOrder")
            if not raw:
                return _error(400, "M7/018", f"Item {i}: enter the PurchaseOrder the goods are received for")
            po = orders.get(_doc_number(raw) or "")
            if po is None:
                return _error(400, "M7/019", f"Item {i}: purchase order {raw} does not exist")
            if po["ReleaseStatus"] != "RELEASED":
                return _error(400, "M7/021", f"Item {i}: purchase order not released: {po['PurchaseOrder']} must be "
                                             "released before goods are received against it")
            po_item = next((p for p in po["items"]
                            if p["PurchaseOrderItem"] == item.get("PurchaseOrderItem", po["items"][0]["PurchaseOrderItem"])),
                           None)
            if po_item is None:
                return _error(400, "M7/020", f"Item {i}: purchase order {po['PurchaseOrder']} has no item "
                                             f"{item.get('PurchaseOrderItem')}")
            if item.get("GoodsMovementType", "101") != "101":
                return _error(400, "M7/001", f"Item {i}: only movement type 101 (goods receipt) is supported")
            quantity = _number(item.get("QuantityInEntryUnit"))
            if quantity is None or quantity <= 0:
                return _error(400, "M7/064", f"Item {i}: QuantityInEntryUnit must be a positive number")
            lines.append((po_item, quantity, item))
        number = str(next(matdoc_numbers))
        year = time.strftime("%Y", time.gmtime())
        now = _odata_date(time.time())
        doc = {
            "MaterialDocumentYear": year,
            "MaterialDocument": number,
            "GoodsMovementCode": "01",
            "PostingDate": now,
            "DocumentDate": now,
            "MaterialDocumentHeaderText": str(body.get("MaterialDocumentHeaderText", "")),
            "CreatedByUser": "PROCTOR_TECH",
            # header-level echo of the first item's order (SAP keeps it on the items only)
            "PurchaseOrder": lines[0][0]["PurchaseOrder"],
            "items": [{
                "MaterialDocumentYear": year,
                "MaterialDocument": number,
                "MaterialDocumentItem": str(i),
                "GoodsMovementType": "101",
                "PurchaseOrder": po_item["PurchaseOrder"],
                "PurchaseOrderItem": po_item["PurchaseOrderItem"],
                "Material": po_item["Material"],
                "Plant": item.get("Plant", "1010"),
                "QuantityInEntryUnit": format(quantity, "f"),
                "EntryUnit": item.get("EntryUnit", po_item["PurchaseOrderQuantityUnit"]),
            } for i, (po_item, quantity, item) in enumerate(lines, start=1)],
        }
        goods_receipts[number] = doc
        return web.json_response({"d": gr_view(doc, True)}, status=201,
                                 headers={"Location": f"{MATDOC_SRV}/A_MaterialDocumentHeader({matdoc_key(doc)})"})

    async def get_goods_receipt(request: web.Request) -> web.Response:
        await remember_auth(request)
        m = re.fullmatch(r"MaterialDocumentYear='([0-9]{4})',MaterialDocument='([0-9]{10})'", request.match_info["key"])
        doc = goods_receipts.get(m.group(2)) if m else None
        if m is None or doc is None or doc["MaterialDocumentYear"] != m.group(1):
            return _error(404, "SY/530", "Resource not found for segment 'A_MaterialDocumentHeader'")
        return web.json_response({"d": gr_view(doc, request.query.get("$expand") == "to_MaterialDocumentItem")})

    # ---- supplier invoices and their payment (API_SUPPLIERINVOICE_PROCESS_SRV) ----

    def invoice_view(inv: dict) -> dict:
        out = dict(inv)
        out["__metadata"] = {"uri": f"{INV_SRV}/A_SupplierInvoice('{inv['SupplierInvoice']}')",
                             "type": "API_SUPPLIERINVOICE_PROCESS_SRV.A_SupplierInvoiceType"}
        return out

    async def create_invoice(request: web.Request) -> web.Response:
        await remember_auth(request)
        body = await _json_body(request)
        if isinstance(body, web.Response):
            return body
        raw_po, gross = body.get("PurchaseOrder"), _number(body.get("InvoiceGrossAmount"))
        if not raw_po or body.get("InvoiceGrossAmount") is None:
            return _error(400, "M8/083", "Enter PurchaseOrder and InvoiceGrossAmount")
        po = orders.get(_doc_number(raw_po) or "")
        if po is None:
            return _error(400, "M8/019", f"Purchase order {raw_po} does not exist")
        number_po = po["PurchaseOrder"]
        if not any(i["PurchaseOrder"] == number_po for gr in goods_receipts.values() for i in gr["items"]):
            return _error(400, "M8/021", f"Purchase order {number_po} has no goods receipt: "
                                         "post the goods receipt before the invoice")
        if gross is None or gross < 0 or gross != gross.quantize(Decimal("0.01")):
            return _error(400, "M8/064", "InvoiceGrossAmount must be a number of at least 0 with at most 2 decimals")
        currency = body.get("DocumentCurrency") or po["DocumentCurrency"]
        if currency != po["DocumentCurrency"]:
            return _error(400, "M8/130", f"Currency {currency} differs from purchase order {number_po}'s "
                                         f"{po['DocumentCurrency']}")
        party = body.get("InvoicingParty") or po["Supplier"]
        if party != po["Supplier"]:
            return _error(400, "M8/131", f"Invoicing party {party} is not purchase order {number_po}'s supplier "
                                         f"{po['Supplier']}")
        reference = body.get("SupplierInvoiceIDByInvcgParty") or ""
        if not isinstance(reference, str):
            return _error(400, "M8/064", "SupplierInvoiceIDByInvcgParty must be a string")
        twin = next((i for i in invoices.values()
                     if reference and i["InvoicingParty"] == party and i["SupplierInvoiceIDByInvcgParty"] == reference),
                    None)
        if twin is not None:
            return _error(409, "M8/108", f"Invoice {reference} of supplier {party} is already entered as "
                                         f"{twin['SupplierInvoice']}")
        # Three-way match (order, goods receipt, invoice): one invoice per order, whose gross
        # amount is the order's net amount within 5 %; an order already invoiced fails it too.
        net = po_net_amount(po)
        invoiced = [i["SupplierInvoice"] for i in invoices.values() if i["PurchaseOrder"] == number_po]
        if abs(gross - net) > net * MATCH_TOLERANCE or invoiced:
            why = (f"purchase order {number_po} is already invoiced ({', '.join(invoiced)})" if invoiced else
                   f"invoice {_amount_text(gross)} {currency}, purchase order {number_po} "
                   f"{_amount_text(net)} {po['DocumentCurrency']} (tolerance 5 %)")
            return _error(422, "M8/087", f"amount does not match the purchase order (three-way match failed): {why}")
        number = str(next(invoice_numbers))
        now = time.time()
        inv = {
            "SupplierInvoice": number,
            "FiscalYear": time.strftime("%Y", time.gmtime(now)),
            "CompanyCode": body.get("CompanyCode") or po["CompanyCode"],
            "InvoicingParty": party,
            "SupplierInvoiceIDByInvcgParty": reference,
            "DocumentDate": _odata_date(now),
            "PostingDate": _odata_date(now),
            "DocumentCurrency": currency,
            "InvoiceGrossAmount": _amount_text(gross),
            "PurchaseOrder": number_po,
            "CreatedByUser": "PROCTOR_TECH",
            "PaymentStatus": "NOT_PAID",
            "PaymentDocument": "",
        }
        invoices[number] = inv
        return web.json_response({"d": invoice_view(inv)}, status=201,
                                 headers={"Location": f"{INV_SRV}/A_SupplierInvoice('{number}')"})

    async def get_invoice(request: web.Request) -> web.Response:
        await remember_auth(request)
        inv = invoices.get(key(request, "key") or "")
        if inv is None:
            return _error(404, "SY/530", "Resource not found for segment 'A_SupplierInvoice'")
        return web.json_response({"d": invoice_view(inv)})

    async def pay_invoice(request: web.Request) -> web.Response:
        await remember_auth(request)
        number = key(request, "key") or ""
        inv = invoices.get(number)
        if inv is None:
            return _error(404, "SY/530", "Resource not found for segment 'A_SupplierInvoice'")
        paid[number] = paid.get(number, 0) + 1
        if inv["PaymentStatus"] == "PAID":
            return _error(409, "F5/263", f"Supplier invoice {number} is already paid "
                                         f"(payment document {inv['PaymentDocument']})")
        doc_number = str(next(payment_numbers))
        now = time.time()
        payment = {
            "PaymentDocument": doc_number,
            "FiscalYear": time.strftime("%Y", time.gmtime(now)),
            "CompanyCode": inv["CompanyCode"],
            "SupplierInvoice": number,
            "PurchaseOrder": inv["PurchaseOrder"],
            "Supplier": inv["InvoicingParty"],
            "PaidAmount": inv["InvoiceGrossAmount"],
            "DocumentCurrency": inv["DocumentCurrency"],
            "PostingDate": _odata_date(now),
            "CreatedByUser": "PROCTOR_TECH",
        }
        payments[doc_number] = payment
        inv["PaymentStatus"], inv["PaymentDocument"] = "PAID", doc_number
        return web.json_response({"d": payment}, status=201)

    app = web.Application()
    app[RELEASES] = releases
    app[PAYMENTS] = paid
    app[DOCUMENTS] = {"requisitions": requisitions, "quotations": quotations, "orders": orders,
                      "goods_receipts": goods_receipts, "invoices": invoices, "payments": payments}
    app[LAST_AUTHORIZATION] = [None]
    app.router.add_get(BP_SRV + "/A_Supplier", list_suppliers)
    app.router.add_get(BP_SRV + "/A_Supplier({key})", get_supplier)
    app.router.add_post(PR_SRV + "/A_PurchaseRequisitionHeader", create_requisition)
    app.router.add_get(PR_SRV + "/A_PurchaseRequisitionHeader({key})", get_requisition)
    app.router.add_post(QTN_SRV + "/A_SupplierQuotation", create_quotation)
    app.router.add_get(QTN_SRV + "/A_SupplierQuotation({key})", get_quotation)
    app.router.add_get(PO_SRV + "/A_PurchaseOrder", list_orders)
    app.router.add_post(PO_SRV + "/A_PurchaseOrder", create_order)
    app.router.add_get(PO_SRV + "/A_PurchaseOrder({key})", get_order)
    app.router.add_post(PO_SRV + "/A_PurchaseOrder({key})/Release", release_order)
    app.router.add_post(MATDOC_SRV + "/A_MaterialDocumentHeader", create_goods_receipt)
    app.router.add_get(MATDOC_SRV + "/A_MaterialDocumentHeader({key})", get_goods_receipt)
    app.router.add_post(INV_SRV + "/A_SupplierInvoice", create_invoice)
    app.router.add_get(INV_SRV + "/A_SupplierInvoice({key})", get_invoice)
    app.router.add_post(INV_SRV + "/A_SupplierInvoice({key})/Pay", pay_invoice)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9103)
    args = ap.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
