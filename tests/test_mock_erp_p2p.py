"""The bundled mock ERP's procure-to-pay chain (proxy/demo/mock_erp.py), driven directly over
HTTP on loopback: requisition -> supplier quotation -> purchase order -> release -> goods
receipt -> supplier invoice -> payment, each precondition the ERP checks, the three-way
match failure (the demo's deterministic failing step) and a second payment.

Through a real proxy with the bundled manifest and policies: tests/test_bundled_connectors.py.
"""

from __future__ import annotations

import asyncio
import re
import threading
from decimal import Decimal

import httpx
import pytest
from aiohttp import web

from conftest import free_port
from proxy.demo import mock_erp

PR = f"{mock_erp.PR_SRV}/A_PurchaseRequisitionHeader"
QTN = f"{mock_erp.QTN_SRV}/A_SupplierQuotation"
PO = f"{mock_erp.PO_SRV}/A_PurchaseOrder"
GR = f"{mock_erp.MATDOC_SRV}/A_MaterialDocumentHeader"
INV = f"{mock_erp.INV_SRV}/A_SupplierInvoice"


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)


class Erp:
    """One fresh mock ERP on a free loopback port."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.app = mock_erp.build_app()
        self.port = free_port()
        self.runner = web.AppRunner(self.app, access_log=None)

        async def start() -> None:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(start(), loop).result(10)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10, trust_env=False)

    def close(self) -> None:
        self.http.close()
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)

    def post(self, path: str, body=None, **kw) -> httpx.Response:
        return self.http.post(path, json=body, **kw) if body is not None else self.http.post(path, **kw)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    @property
    def docs(self) -> dict[str, dict]:
        return self.app[mock_erp.DOCUMENTS]

    def counts(self) -> dict[str, int]:
        return {kind: len(docs) for kind, docs in self.docs.items()}

    # the chain, step by step (each asserts its own success)

    def requisition(self, *items: tuple[str, str, str]) -> str:
        r = self.post(PR, {"PurReqnDescription": "Laptops for the new team", "to_PurchaseReqnItem": [
            {"Material": m, "RequestedQuantity": q, "PurchaseRequisitionPrice": p} for m, q, p in items]})
        assert r.status_code == 201, r.text
        return r.json()["d"]["PurchaseRequisition"]

    def quotation(self, pr: str, *items: tuple[str, str], supplier: str = "17300001") -> str:
        r = self.post(QTN, {"PurchaseRequisition": pr, "Supplier": supplier, "DocumentCurrency": "EUR",
                            "to_SupplierQuotationItem": [{"Material": "LAPTOP-14", "OrderQuantity": q,
                                                          "NetPriceAmount": p} for q, p in items]})
        assert r.status_code == 201, r.text
        return r.json()["d"]["SupplierQuotation"]

    def order(self, *items: tuple[str, str], supplier: str = "17300001", **refs: str) -> str:
        r = self.post(PO, order_body(*items, supplier=supplier, **refs))
        assert r.status_code == 201, r.text
        return r.json()["d"]["PurchaseOrder"]

    def released_order(self, *items: tuple[str, str], **refs: str) -> str:
        po = self.order(*items, **refs)
        assert self.post(f"{PO}('{po}')/Release").status_code == 200
        return po

    def goods_receipt(self, po: str, quantity: str = "4") -> str:
        r = self.post(GR, gr_body((po, quantity)))
        assert r.status_code == 201, r.text
        return r.json()["d"]["MaterialDocument"]

    def invoice(self, po: str, amount: str, **extra: str) -> str:
        r = self.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": amount, "DocumentCurrency": "EUR", **extra})
        assert r.status_code == 201, r.text
        return r.json()["d"]["SupplierInvoice"]

    def received_order(self, *items: tuple[str, str]) -> str:
        po = self.released_order(*items)
        self.goods_receipt(po)
        return po


@pytest.fixture
def erp(loop):
    e = Erp(loop)
    yield e
    e.close()


def order_body(*items: tuple[str, str], supplier: str = "17300001", **refs: str) -> dict:
    return {"CompanyCode": "1010", "Supplier": supplier, "DocumentCurrency": "EUR", **refs,
            "to_PurchaseOrderItem": [{"Material": "LAPTOP-14", "OrderQuantity": q, "NetPriceAmount": p}
                                     for q, p in items]}


def gr_body(*items: tuple[str, str]) -> dict:
    return {"GoodsMovementCode": "01", "to_MaterialDocumentItem": [
        {"PurchaseOrder": po, "QuantityInEntryUnit": q, "GoodsMovementType": "101"} for po, q in items]}


def odata_error(r: httpx.Response, status: int, *needles: str) -> str:
    """The OData V2 error body of a refusal; its message must contain each needle."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message"} and isinstance(err["code"], str) and err["code"]
    assert err["message"]["lang"] == "en"
    text = err["message"]["value"]
    for needle in needles:
        assert needle in text, text
    return text


LAPTOPS = (("4", "1150.00"),)  # net amount 4600.00


# ------------------------------------------------------------------- happy path


def test_the_whole_chain_from_requisition_to_payment(erp):
    r = erp.post(PR, {"PurReqnDescription": "Laptops for the new team", "to_PurchaseReqnItem": [
        {"Material": "LAPTOP-14", "RequestedQuantity": "4", "PurchaseRequisitionPrice": "1200.00"},
        {"Material": "DOCK-USB-C", "RequestedQuantity": 4, "PurchaseRequisitionPrice": 49.99}]})
    assert r.status_code == 201, r.text
    d = r.json()["d"]
    pr = d["PurchaseRequisition"]
    assert pr == "0010000001" and r.headers["Location"] == f"{PR}('{pr}')"
    assert d["__metadata"]["type"] == "API_PURCHASEREQ_PROCESS_SRV.A_PurchaseRequisitionHeaderType"
    assert [(i["PurchaseRequisitionItem"], i["Material"], i["RequestedQuantity"], i["PurchaseRequisitionPrice"])
            for i in d["to_PurchaseReqnItem"]["results"]] == [
        ("00010", "LAPTOP-14", "4", "1200.00"), ("00020", "DOCK-USB-C", "4", "49.99")]
    read = erp.get(f"{PR}('{pr}')").json()["d"]
    assert read["PurchaseRequisition"] == pr and "__deferred" in read["to_PurchaseReqnItem"]
    assert len(erp.get(f"{PR}('{pr}')?$expand=to_PurchaseReqnItem").json()["d"]["to_PurchaseReqnItem"]["results"]) == 2

    r = erp.post(QTN, {"PurchaseRequisition": pr, "Supplier": "17300001", "DocumentCurrency": "EUR",
                       "to_SupplierQuotationItem": [
                           {"Material": "LAPTOP-14", "OrderQuantity": "4", "NetPriceAmount": "1150.00"},
                           {"Material": "DOCK-USB-C", "OrderQuantity": "4", "NetPriceAmount": "49.99"}]})
    assert r.status_code == 201, r.text
    d = r.json()["d"]
    qtn = d["SupplierQuotation"]
    assert qtn == "6000000001" and d["PurchaseRequisition"] == pr and d["Supplier"] == "17300001"
    assert r.headers["Location"] == f"{QTN}('{qtn}')"
    assert erp.get(f"{QTN}('{qtn}')").json()["d"]["PurchaseRequisition"] == pr

    # the order names the quotation; it takes the quotation's requisition over
    r = erp.post(PO, order_body(("4", "1150.00"), ("4", "49.99"), SupplierQuotation=qtn))
    assert r.status_code == 201, r.text
    d = r.json()["d"]
    po = d["PurchaseOrder"]
    assert po == "4500000002"  # 4500000001 is the ERP's own seed order
    assert (d["SupplierQuotation"], d["PurchaseRequisition"]) == (qtn, pr)
    assert erp.get(f"{PO}('{po}')").json()["d"]["SupplierQuotation"] == qtn
    assert erp.post(f"{PO}('{po}')/Release").status_code == 200

    r = erp.post(GR, {"GoodsMovementCode": "01", "MaterialDocumentHeaderText": "Delivery note 4711",
                      "to_MaterialDocumentItem": [
                          {"PurchaseOrder": po, "PurchaseOrderItem": "00010", "QuantityInEntryUnit": "4"},
                          {"PurchaseOrder": po, "PurchaseOrderItem": "00020", "QuantityInEntryUnit": 4}]})
    assert r.status_code == 201, r.text
    d = r.json()["d"]
    doc, year = d["MaterialDocument"], d["MaterialDocumentYear"]
    assert doc == "5000000001" and re.fullmatch(r"20\d\d", year)
    assert d["PurchaseOrder"] == po  # header-level: a response field names the order
    assert [(i["MaterialDocumentItem"], i["PurchaseOrder"], i["PurchaseOrderItem"], i["Material"],
             i["QuantityInEntryUnit"], i["GoodsMovementType"]) for i in d["to_MaterialDocumentItem"]["results"]] == [
        ("1", po, "00010", "LAPTOP-14", "4", "101"), ("2", po, "00020", "LAPTOP-14", "4", "101")]
    location = f"{GR}(MaterialDocumentYear='{year}',MaterialDocument='{doc}')"
    assert r.headers["Location"] == location
    assert erp.get(location).json()["d"]["MaterialDocument"] == doc

    r = erp.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "4799.96", "DocumentCurrency": "EUR",
                       "SupplierInvoiceIDByInvcgParty": "ACME-2026-0815"})
    assert r.status_code == 201, r.text
    d = r.json()["d"]
    inv = d["SupplierInvoice"]
    assert inv == "5105600001" and d["PurchaseOrder"] == po and d["InvoicingParty"] == "17300001"
    assert (d["InvoiceGrossAmount"], d["DocumentCurrency"], d["PaymentStatus"]) == ("4799.96", "EUR", "NOT_PAID")
    assert r.headers["Location"] == f"{INV}('{inv}')"

    r = erp.post(f"{INV}('{inv}')/Pay")
    assert r.status_code == 201, r.text
    d = r.json()["d"]
    assert d["PaymentDocument"] == "1500000001"
    assert (d["SupplierInvoice"], d["PurchaseOrder"], d["Supplier"], d["PaidAmount"], d["DocumentCurrency"]) == (
        inv, po, "17300001", "4799.96", "EUR")
    read = erp.get(f"{INV}('{inv}')").json()["d"]
    assert (read["PaymentStatus"], read["PaymentDocument"]) == ("PAID", "1500000001")
    assert erp.app[mock_erp.PAYMENTS] == {inv: 1} and erp.app[mock_erp.RELEASES] == {po: 1}
    assert erp.counts() == {"requisitions": 1, "quotations": 1, "orders": 2, "goods_receipts": 1,
                            "invoices": 1, "payments": 1}


def test_numbers_count_up_per_document_kind(erp):
    prs = [erp.requisition(("PAPER-A4", "10", "4.20")) for _ in range(2)]
    assert prs == ["0010000001", "0010000002"]
    assert [erp.quotation(prs[0], ("1", "5")) for _ in range(2)] == ["6000000001", "6000000002"]
    po, po2 = erp.received_order(("4", "10")), erp.received_order(("2", "10"))
    assert erp.goods_receipt(po, "1") == "5000000003"
    assert [erp.invoice(po, "40.00"), erp.invoice(po2, "20.00")] == ["5105600001", "5105600002"]


def test_an_order_without_references_keeps_working_and_may_name_a_requisition_alone(erp):
    r = erp.post(PO, order_body(*LAPTOPS))
    assert r.status_code == 201
    assert (r.json()["d"]["SupplierQuotation"], r.json()["d"]["PurchaseRequisition"]) == ("", "")
    pr = erp.requisition(("LAPTOP-14", "4", "1200"))
    r = erp.post(PO, order_body(*LAPTOPS, PurchaseRequisition=pr))
    assert r.status_code == 201 and r.json()["d"]["PurchaseRequisition"] == pr
    # the quotation and its own requisition, both named: fine
    qtn = erp.quotation(pr, ("4", "1150"))
    r = erp.post(PO, order_body(*LAPTOPS, SupplierQuotation=qtn, PurchaseRequisition=pr))
    assert r.status_code == 201 and r.json()["d"]["SupplierQuotation"] == qtn


# -------------------------------------------------------------- preconditions


@pytest.mark.parametrize("body, needle", [
    ({}, "at least one item"),
    ({"to_PurchaseReqnItem": []}, "at least one item"),
    ({"to_PurchaseReqnItem": {"Material": "X"}}, "at least one item"),
    ({"to_PurchaseReqnItem": ["LAPTOP-14"]}, "at least one item"),
    ({"to_PurchaseReqnItem": [{"RequestedQuantity": "1", "PurchaseRequisitionPrice": "1"}]}, "Material"),
    ({"to_PurchaseReqnItem": [{"Material": "X", "RequestedQuantity": "0", "PurchaseRequisitionPrice": "1"}]},
     "RequestedQuantity"),
    ({"to_PurchaseReqnItem": [{"Material": "X", "RequestedQuantity": "-2", "PurchaseRequisitionPrice": "1"}]},
     "RequestedQuantity"),
    ({"to_PurchaseReqnItem": [{"Material": "X", "RequestedQuantity": "1", "PurchaseRequisitionPrice": "-1"}]},
     "PurchaseRequisitionPrice"),
    ({"to_PurchaseReqnItem": [{"Material": "X", "RequestedQuantity": "1"}]}, "PurchaseRequisitionPrice"),
    ({"to_PurchaseReqnItem": [{"Material": "X", "RequestedQuantity": "NaN", "PurchaseRequisitionPrice": "1"}]},
     "RequestedQuantity"),
    ({"to_PurchaseReqnItem": [{"Material": "X", "RequestedQuantity": True, "PurchaseRequisitionPrice": "1"}]},
     "RequestedQuantity"),
    ({"to_PurchaseReqnItem": [{"Material": "X", "RequestedQuantity": "1", "PurchaseRequisitionPrice": "1e20"}]},
     "PurchaseRequisitionPrice"),
])
def test_requisition_refusals(erp, body, needle):
    odata_error(erp.post(PR, body), 400, needle)
    assert erp.docs["requisitions"] == {}


def test_bodies_that_are_not_json_objects_are_odata_errors(erp):
    for path in (PR, QTN, PO, GR, INV):
        odata_error(erp.post(path, content=b"{not json", headers={"Content-Type": "application/json"}), 400, "JSON")
        assert erp.post(path, ["a list"]).status_code == 400
    assert erp.counts() == {"requisitions": 0, "quotations": 0, "orders": 1, "goods_receipts": 0,
                            "invoices": 0, "payments": 0}


@pytest.mark.parametrize("path, entity", [
    (f"{PR}('0010009999')", "A_PurchaseRequisitionHeader"),
    (f"{QTN}('6000009999')", "A_SupplierQuotation"),
    (f"{INV}('5105609999')", "A_SupplierInvoice"),
    (f"{GR}(MaterialDocumentYear='2026',MaterialDocument='5000009999')", "A_MaterialDocumentHeader"),
    (f"{GR}(MaterialDocument='5000000001')", "A_MaterialDocumentHeader"),
    (f"{PR}(0010000001)", "A_PurchaseRequisitionHeader"),  # an unquoted key
])
def test_unknown_documents_are_404(erp, path, entity):
    odata_error(erp.get(path), 404, entity)


def test_quotation_refusals(erp):
    pr = erp.requisition(("LAPTOP-14", "4", "1200"))
    items = [{"Material": "LAPTOP-14", "OrderQuantity": "4", "NetPriceAmount": "1150"}]
    odata_error(erp.post(QTN, {"Supplier": "17300001", "to_SupplierQuotationItem": items}), 400, "PurchaseRequisition")
    odata_error(erp.post(QTN, {"PurchaseRequisition": pr, "to_SupplierQuotationItem": items}), 400, "Supplier")
    for unknown in ("0010009999", "10000001", "0010000001' or '1", 10000001):
        odata_error(erp.post(QTN, {"PurchaseRequisition": unknown, "Supplier": "17300001",
                                   "to_SupplierQuotationItem": items}), 400, "does not exist")
    odata_error(erp.post(QTN, {"PurchaseRequisition": pr, "Supplier": "99999999", "to_SupplierQuotationItem": items}),
                400, "Supplier 99999999 does not exist")
    odata_error(erp.post(QTN, {"PurchaseRequisition": pr, "Supplier": "17300099", "to_SupplierQuotationItem": items}),
                400, "blocked")
    odata_error(erp.post(QTN, {"PurchaseRequisition": pr, "Supplier": "17300001"}), 400, "at least one item")
    for bad in ({"OrderQuantity": "0", "NetPriceAmount": "1"}, {"OrderQuantity": "1", "NetPriceAmount": "-1"},
                {"OrderQuantity": "1"}, {"OrderQuantity": "x", "NetPriceAmount": "1"}):
        odata_error(erp.post(QTN, {"PurchaseRequisition": pr, "Supplier": "17300001",
                                   "to_SupplierQuotationItem": [bad]}), 400, "Item 1")
    assert erp.docs["quotations"] == {}


def test_order_references_must_exist_and_agree(erp):
    pr = erp.requisition(("LAPTOP-14", "4", "1200"))
    other_pr = erp.requisition(("LAPTOP-14", "8", "1200"))
    qtn = erp.quotation(pr, ("4", "1150"))
    before = set(erp.docs["orders"])
    odata_error(erp.post(PO, order_body(*LAPTOPS, SupplierQuotation="6000009999")), 400,
                "Supplier quotation 6000009999 does not exist")
    odata_error(erp.post(PO, order_body(*LAPTOPS, SupplierQuotation=6000000001)), 400, "does not exist")
    odata_error(erp.post(PO, order_body(*LAPTOPS, PurchaseRequisition="0010009999")), 400,
                "Purchase requisition 0010009999 does not exist")
    # the quotation is Acme's: an order to Globex cannot claim it
    odata_error(erp.post(PO, order_body(*LAPTOPS, supplier="17300002", SupplierQuotation=qtn)), 400,
                "is from supplier 17300001, not 17300002")
    odata_error(erp.post(PO, order_body(*LAPTOPS, SupplierQuotation=qtn, PurchaseRequisition=other_pr)), 400,
                f"belongs to purchase requisition {pr}")
    assert set(erp.docs["orders"]) == before


def test_goods_receipt_needs_a_released_order(erp):
    po = erp.order(*LAPTOPS)
    r = erp.post(GR, gr_body((po, "4")))
    odata_error(r, 400, "purchase order not released", po)
    # the ERP's seed order was never released either
    odata_error(erp.post(GR, gr_body(("4500000001", "50"))), 400, "not released")
    assert erp.post(f"{PO}('{po}')/Release").status_code == 200
    assert erp.post(GR, gr_body((po, "4"))).status_code == 201


def test_goods_receipt_refusals(erp):
    po = erp.released_order(*LAPTOPS)
    unreleased = erp.order(*LAPTOPS)
    odata_error(erp.post(GR, {"to_MaterialDocumentItem": [{"QuantityInEntryUnit": "1"}]}), 400, "PurchaseOrder")
    odata_error(erp.post(GR, gr_body(("4500009999", "1"))), 400, "purchase order 4500009999 does not exist")
    odata_error(erp.post(GR, gr_body(("450000000", "1"))), 400, "does not exist")
    odata_error(erp.post(GR, {"to_MaterialDocumentItem": []}), 400, "at least one item")
    odata_error(erp.post(GR, {"GoodsMovementCode": "03", "to_MaterialDocumentItem": [
        {"PurchaseOrder": po, "QuantityInEntryUnit": "1"}]}), 400, "GoodsMovementCode 01")
    odata_error(erp.post(GR, {"to_MaterialDocumentItem": [
        {"PurchaseOrder": po, "QuantityInEntryUnit": "1", "GoodsMovementType": "102"}]}), 400, "101")
    odata_error(erp.post(GR, {"to_MaterialDocumentItem": [
        {"PurchaseOrder": po, "PurchaseOrderItem": "00090", "QuantityInEntryUnit": "1"}]}), 400, "no item 00090")
    for quantity in ("0", "-1", "many", None):
        odata_error(erp.post(GR, gr_body((po, quantity))), 400, "QuantityInEntryUnit")
    # all or nothing: a released order's line next to an unreleased order's refuses the whole receipt
    odata_error(erp.post(GR, gr_body((po, "4"), (unreleased, "4"))), 400, "Item 2", "not released")
    assert erp.docs["goods_receipts"] == {}


def test_invoice_needs_an_order_with_a_goods_receipt(erp):
    po = erp.released_order(*LAPTOPS)
    odata_error(erp.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "4600.00"}), 400, "no goods receipt", po)
    erp.goods_receipt(po)
    r = erp.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "4600.00"})  # currency: the order's
    assert r.status_code == 201 and r.json()["d"]["DocumentCurrency"] == "EUR"


def test_invoice_refusals(erp):
    po = erp.received_order(*LAPTOPS)
    odata_error(erp.post(INV, {"InvoiceGrossAmount": "4600.00"}), 400, "PurchaseOrder")
    odata_error(erp.post(INV, {"PurchaseOrder": po}), 400, "InvoiceGrossAmount")
    odata_error(erp.post(INV, {"PurchaseOrder": "4500009999", "InvoiceGrossAmount": "1"}), 400,
                "Purchase order 4500009999 does not exist")
    for amount in ("4600.001", "-4600", "lots", "Infinity", True):
        odata_error(erp.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": amount}), 400, "InvoiceGrossAmount")
    odata_error(erp.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "4600.00", "DocumentCurrency": "USD"}),
                400, "Currency USD differs")
    odata_error(erp.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "4600.00", "InvoicingParty": "17300002"}),
                400, "not purchase order", "17300001")
    assert erp.docs["invoices"] == {}


@pytest.mark.parametrize("amount, ok", [
    ("4600.00", True), ("4830.00", True), ("4370.00", True),      # exactly 5 % off: within tolerance
    ("4830.01", False), ("4369.99", False), ("9200.00", False), ("0", False),
])
def test_three_way_match(erp, amount, ok):
    po = erp.received_order(*LAPTOPS)  # net 4600.00, 5 % = 230.00
    r = erp.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": amount, "DocumentCurrency": "EUR"})
    if ok:
        assert r.status_code == 201, r.text
    else:
        text = odata_error(r, 422, "amount does not match the purchase order (three-way match failed)", po)
        assert "4600.00" in text
        assert erp.docs["invoices"] == {}


def test_three_way_match_is_deterministic_and_an_order_is_not_invoiced_twice(erp):
    po = erp.received_order(*LAPTOPS)
    for _ in range(3):  # the same wrong invoice fails the same way every time
        text = odata_error(erp.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "6000.00"}), 422,
                           "three-way match failed")
        assert text.endswith(f"invoice 6000.00 EUR, purchase order {po} 4600.00 EUR (tolerance 5 %)")
    first = erp.invoice(po, "4600.00")
    # the same amount again (another supplier reference): the order is invoiced already
    for amount in ("4600.00", "0"):
        odata_error(erp.post(INV, {"PurchaseOrder": po, "InvoiceGrossAmount": amount,
                                   "SupplierInvoiceIDByInvcgParty": "ACME-9"}), 422,
                    "three-way match failed", f"already invoiced ({first})")
    assert list(erp.docs["invoices"]) == [first]


def test_the_same_supplier_invoice_is_not_entered_twice(erp):
    po, po2 = erp.received_order(*LAPTOPS), erp.received_order(*LAPTOPS)
    first = erp.invoice(po, "4600.00", SupplierInvoiceIDByInvcgParty="ACME-1")
    # the supplier's invoice ACME-1 again, even against another order: entered already
    odata_error(erp.post(INV, {"PurchaseOrder": po2, "InvoiceGrossAmount": "4600.00",
                               "SupplierInvoiceIDByInvcgParty": "ACME-1"}), 409, "already entered as " + first)
    odata_error(erp.post(INV, {"PurchaseOrder": po2, "InvoiceGrossAmount": "4600.00",
                               "SupplierInvoiceIDByInvcgParty": 42}), 400, "must be a string")
    assert erp.invoice(po2, "4600.00", SupplierInvoiceIDByInvcgParty="ACME-2")


def test_payment_unknown_invoice_and_already_paid(erp):
    odata_error(erp.post(f"{INV}('5105609999')/Pay"), 404, "A_SupplierInvoice")
    odata_error(erp.post(f"{INV}(5105600001)/Pay"), 404, "A_SupplierInvoice")
    po = erp.received_order(*LAPTOPS)
    inv = erp.invoice(po, "4600.00")
    first = erp.post(f"{INV}('{inv}')/Pay", {})
    assert first.status_code == 201, first.text
    payment = first.json()["d"]["PaymentDocument"]
    text = odata_error(erp.post(f"{INV}('{inv}')/Pay"), 409, f"{inv} is already paid", payment)
    assert "payment document" in text
    assert erp.app[mock_erp.PAYMENTS] == {inv: 2} and len(erp.docs["payments"]) == 1
    assert Decimal(erp.docs["payments"][payment]["PaidAmount"]) == Decimal("4600")
