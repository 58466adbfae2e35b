"""The bundled ERP's procure-to-pay steps through a real `proctor run` in front of the real mock
ERP, with the bundled connectors/erp.yaml and policies/erp.cedar: each step classified with its
action, resource and typed fields (the amounts policies see), allowed for its agent group and
refused (403, never forwarded) for another; the ERP's own refusals (an unreleased order, the
three-way match) reach the agent unchanged.

The mock on its own: tests/test_mock_erp_p2p.py.
"""

from __future__ import annotations

import itertools

import pytest
import requests

from proxy.config import load_config
from proxy.demo import mock_erp
from proxy.identity.dev_issuer import DevIssuer
from test_bundled_connectors import Env, Mocks, assert_refused

pytestmark = pytest.mark.integration

PR = f"{mock_erp.PR_SRV}/A_PurchaseRequisitionHeader"
QTN = f"{mock_erp.QTN_SRV}/A_SupplierQuotation"
PO = f"{mock_erp.PO_SRV}/A_PurchaseOrder"
GR = f"{mock_erp.MATDOC_SRV}/A_MaterialDocumentHeader"
INV = f"{mock_erp.INV_SRV}/A_SupplierInvoice"

# agent -> groups (the bundled policies' roles)
AGENTS = {
    "buyer-bot": ["procurement"],
    "approver-bot": ["procurement-approvers"],
    "payables-bot": ["accounts-payable"],
    "payables-bot-2": ["accounts-payable"],
    "sales-bot": ["sales"],
}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mocks = Mocks()
    e = Env(tmp_path_factory.mktemp("p2p"), mocks)
    config = load_config(e.config_path)
    issuer = DevIssuer(config.dev_issuer_dir, config.dev_issuer)
    e.tokens.update({agent: issuer.issue(agent, {"groups": groups}) for agent, groups in AGENTS.items()})
    yield e
    e.p.stop()
    mocks.close()


_TAGS = itertools.count(1)


def dec(text: str) -> dict:
    return {"__extn": {"fn": "decimal", "arg": text}}


def agent_ref(agent: str) -> dict:
    return {"__entity": {"type": "Agent", "id": agent}}


def url(env: Env, path: str) -> str:
    return env.mocks.url("erp", path)


def post(env: Env, agent: str, path: str, body: dict | None = None) -> requests.Response:
    return env.call(agent, "POST", url(env, path), **({"json": body} if body is not None else {}))


def docs(env: Env) -> dict[str, dict]:
    return env.mocks.apps["erp"][mock_erp.DOCUMENTS]


def counts(env: Env) -> dict[str, int]:
    return {kind: len(d) for kind, d in docs(env).items()}


def requisition_body(tag: int) -> dict:
    return {"PurReqnDescription": "Laptops", "to_PurchaseReqnItem": [
        {"Material": f"LAPTOP-{tag}", "RequestedQuantity": "4", "PurchaseRequisitionPrice": "1200.00"}]}


def quotation_body(pr: str, tag: int, supplier: str = "17300001") -> dict:
    return {"PurchaseRequisition": pr, "Supplier": supplier, "DocumentCurrency": "EUR",
            "to_SupplierQuotationItem": [{"Material": f"LAPTOP-{tag}", "OrderQuantity": "4", "NetPriceAmount": "1150.00"}]}


def order_body(tag: int, quantity: str = "4", price: str = "1150.00", **refs: str) -> dict:
    """Materials unique to `tag`: the bundled route suppresses an equal order for 10 minutes."""
    return {"CompanyCode": "1010", "Supplier": "17300001", "DocumentCurrency": "EUR", **refs,
            "to_PurchaseOrderItem": [{"Material": f"LAPTOP-{tag}", "OrderQuantity": quantity, "NetPriceAmount": price}]}


def gr_body(*orders: str) -> dict:
    return {"GoodsMovementCode": "01", "to_MaterialDocumentItem": [
        {"PurchaseOrder": po, "QuantityInEntryUnit": "4"} for po in orders]}


def created(r: requests.Response, field: str) -> str:
    assert r.status_code == 201, r.text
    return r.json()["d"][field]


def fields(env: Env, r: requests.Response) -> dict:
    return env.decision_of(r)["cedar"]["context"]["fields"]


def released_order(env: Env, **refs: str) -> str:
    """An order raised by buyer-bot (4 x 1150.00 = 4600.00) and released by approver-bot."""
    po = created(post(env, "buyer-bot", PO, order_body(next(_TAGS), **refs)), "PurchaseOrder")
    r = post(env, "approver-bot", f"{PO}('{po}')/Release")
    assert r.status_code == 200, r.text
    return po


def received_order(env: Env) -> str:
    po = released_order(env)
    created(post(env, "buyer-bot", GR, gr_body(po)), "MaterialDocument")
    return po


def invoice(env: Env, po: str, amount: str = "4600.00") -> str:
    return created(post(env, "payables-bot", INV, {"PurchaseOrder": po, "InvoiceGrossAmount": amount,
                                                     "DocumentCurrency": "EUR"}), "SupplierInvoice")


# ------------------------------------------------------------------ the story


def test_procure_to_pay_each_step_classified_and_allowed_for_its_group(env):
    tag = next(_TAGS)
    # 1. requisition (procurement)
    r = post(env, "buyer-bot", PR, requisition_body(tag))
    pr = created(r, "PurchaseRequisition")
    assert len(pr) == 10 and pr.startswith("00100")
    rec = env.decision_of(r)
    assert (rec["action"], rec["resource"], rec["decision"], rec["reasons"], rec["risk"]) == (
        "erp.requisition.create", 'PurchaseRequisition::"new"', "allow", ["procurement-raise-requisitions"], "medium")
    assert rec["cedar"]["context"]["fields"] == {"net_amount": dec("4800.0"), "item_count": 1,
                                                "materials": [f"LAPTOP-{tag}"]}
    assert rec["cedar"]["resource"]["attrs"] == {"net_amount": dec("4800.0")}
    r = env.call("buyer-bot", "GET", url(env, f"{PR}('{pr}')"))
    assert r.status_code == 200 and r.json()["d"]["PurchaseRequisition"] == pr
    rec = env.decision_of(r)
    assert (rec["action"], rec["resource"], rec["reasons"]) == (
        "erp.requisition.read", f'PurchaseRequisition::"{pr}"', ["procurement-read-erp"])
    assert rec["cedar"]["resource"]["attrs"]["created_by"] == agent_ref("buyer-bot")  # track_creator

    # 2. supplier quotation, naming the requisition
    r = post(env, "buyer-bot", QTN, quotation_body(pr, tag))
    qtn = created(r, "SupplierQuotation")
    assert r.json()["d"]["PurchaseRequisition"] == pr
    rec = env.decision_of(r)
    assert (rec["action"], rec["resource"], rec["reasons"]) == (
        "erp.quote.create", 'SupplierQuotation::"new"', ["procurement-enter-quotations"])
    f = rec["cedar"]["context"]["fields"]
    assert (f["requisition"], f["supplier"], f["currency"], f["net_amount"]) == (pr, "17300001", "EUR", dec("4600.0"))
    rec = env.decision_of(env.call("buyer-bot", "GET", url(env, f"{QTN}('{qtn}')")))
    assert (rec["action"], rec["resource"], rec["status"]) == ("erp.quote.read", f'SupplierQuotation::"{qtn}"', 200)

    # 3. purchase order from the quotation (the ERP copies its requisition over)
    r = post(env, "buyer-bot", PO, order_body(tag, SupplierQuotation=qtn))
    po = created(r, "PurchaseOrder")
    assert (r.json()["d"]["SupplierQuotation"], r.json()["d"]["PurchaseRequisition"]) == (qtn, pr)
    rec = env.decision_of(r)
    assert (rec["action"], rec["reasons"]) == ("erp.purchase_order.create", ["procurement-create-orders"])
    f = rec["cedar"]["context"]["fields"]
    assert (f["quotation"], f["net_amount"]) == (qtn, dec("4600.0")) and "requisition" not in f
    assert post(env, "approver-bot", f"{PO}('{po}')/Release").status_code == 200

    # 4. goods receipt against the released order
    r = post(env, "buyer-bot", GR, gr_body(po))
    doc = created(r, "MaterialDocument")
    assert r.json()["d"]["PurchaseOrder"] == po
    rec = env.decision_of(r)
    assert (rec["action"], rec["resource"], rec["reasons"]) == (
        "erp.goods_receipt.create", 'GoodsReceipt::"new"', ["procurement-post-goods-receipts"])
    f = rec["cedar"]["context"]["fields"]
    assert (f["purchase_order"], f["purchase_orders"], f["quantity"], f["item_count"]) == (po, [po], dec("4.0"), 1)
    year = r.json()["d"]["MaterialDocumentYear"]
    r = env.call("buyer-bot", "GET", url(env, f"{GR}(MaterialDocumentYear='{year}',MaterialDocument='{doc}')"))
    assert r.status_code == 200, r.text
    rec = env.decision_of(r)
    assert (rec["action"], rec["resource"]) == ("erp.goods_receipt.read", f'GoodsReceipt::"{doc}"')
    assert rec["cedar"]["resource"]["attrs"]["created_by"] == agent_ref("buyer-bot")

    # 5. invoice (accounts payable)
    r = post(env, "payables-bot", INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "4600.00",
                                        "DocumentCurrency": "EUR", "SupplierInvoiceIDByInvcgParty": f"ACME-{tag}"})
    inv = created(r, "SupplierInvoice")
    assert r.json()["d"]["PurchaseOrder"] == po
    rec = env.decision_of(r)
    assert (rec["action"], rec["resource"], rec["reasons"], rec["risk"]) == (
        "erp.invoice.create", 'SupplierInvoice::"new"', ["payables-enter-invoices"], "high")
    f = rec["cedar"]["context"]["fields"]
    assert (f["purchase_order"], f["gross_amount"], f["currency"], f["reference"]) == (
        po, dec("4600.0"), "EUR", f"ACME-{tag}")
    assert rec["cedar"]["resource"]["attrs"]["gross_amount"] == dec("4600.0")

    # 6. payment: the invoice as the ERP has it (lookup) and who entered it (track_creator)
    r = post(env, "payables-bot", f"{INV}('{inv}')/Pay")
    assert r.status_code == 201, r.text
    d = r.json()["d"]
    assert (d["SupplierInvoice"], d["PurchaseOrder"], d["PaidAmount"]) == (inv, po, "4600.00")
    assert len(d["PaymentDocument"]) == 10
    rec = env.decision_of(r)
    assert (rec["action"], rec["resource"], rec["reasons"], rec["risk"]) == (
        "erp.payment.create", f'SupplierInvoice::"{inv}"', ["payables-pay-invoices"], "critical")
    assert rec["cedar"]["context"]["params"] == {"invoice": inv}
    attrs = rec["cedar"]["resource"]["attrs"]
    assert (attrs["gross_amount"], attrs["currency"], attrs["purchase_order"], attrs["supplier"],
            attrs["payment_status"], attrs["created_by"]) == (
        dec("4600.0"), "EUR", po, "17300001", "NOT_PAID", agent_ref("payables-bot"))
    assert any(p == f"{INV}('{inv}')" for p in env.mocks.forwarded("erp", "GET"))  # the lookup

    # paid already: the ERP's 409 reaches the agent; the lookup now says PAID
    r = post(env, "payables-bot-2", f"{INV}('{inv}')/Pay")
    assert r.status_code == 409 and "already paid" in r.json()["error"]["message"]["value"]
    rec = env.decision_of(r)
    assert rec["decision"] == "allow" and rec["upstream_status"] == 409
    assert rec["cedar"]["resource"]["attrs"]["payment_status"] == "PAID"
    assert env.mocks.apps["erp"][mock_erp.PAYMENTS][inv] == 2


# ------------------------------------------------------------ who may do what


def test_each_step_is_refused_for_the_other_groups_and_never_reaches_the_erp(env):
    po = received_order(env)
    inv = invoice(env, po)
    pr = created(post(env, "buyer-bot", PR, requisition_body(next(_TAGS))), "PurchaseRequisition")
    qtn = created(post(env, "buyer-bot", QTN, quotation_body(pr, next(_TAGS))), "SupplierQuotation")
    other = released_order(env)
    before, posts = counts(env), len(env.mocks.forwarded("erp", "POST"))
    steps = [
        ("erp.requisition.create", PR, requisition_body(next(_TAGS)), ["payables-bot", "approver-bot", "sales-bot"]),
        ("erp.quote.create", QTN, quotation_body(pr, next(_TAGS)), ["payables-bot", "approver-bot"]),
        ("erp.purchase_order.create", PO, order_body(next(_TAGS), SupplierQuotation=qtn), ["payables-bot"]),
        ("erp.goods_receipt.create", GR, gr_body(other), ["payables-bot", "approver-bot", "sales-bot"]),
        ("erp.invoice.create", INV, {"PurchaseOrder": other, "InvoiceGrossAmount": "4600.00"},
         ["buyer-bot", "approver-bot", "sales-bot"]),
        ("erp.payment.create", f"{INV}('{inv}')/Pay", None, ["buyer-bot", "approver-bot", "sales-bot"]),
    ]
    for action, path, body, agents in steps:
        for agent in agents:
            r = post(env, agent, path, body)
            refused = assert_refused(r, 403, [])
            assert refused["action"] == action and refused["agent"] == agent, (agent, refused)
            assert "no policy permits this request (default deny)" in refused["detail"], refused
    assert counts(env) == before and len(env.mocks.forwarded("erp", "POST")) == posts
    assert docs(env)["invoices"][inv]["PaymentStatus"] == "NOT_PAID"
    # reads: procurement reads requisitions and quotations, accounts payable invoices, not the other way
    assert env.call("payables-bot", "GET", url(env, f"{INV}('{inv}')")).status_code == 200
    assert env.call("payables-bot", "GET", url(env, f"{PO}('{po}')")).status_code == 200
    assert_refused(env.call("buyer-bot", "GET", url(env, f"{INV}('{inv}')")), 403, [])
    assert_refused(env.call("payables-bot", "GET", url(env, f"{PR}('{pr}')")), 403, [])
    assert_refused(env.call("payables-bot", "GET", url(env, f"{QTN}('{qtn}')")), 403, [])


def test_an_order_from_a_quotation_over_10k_is_still_held(env):
    pr = created(post(env, "buyer-bot", PR, requisition_body(next(_TAGS))), "PurchaseRequisition")
    qtn = created(post(env, "buyer-bot", QTN, quotation_body(pr, next(_TAGS))), "SupplierQuotation")
    before = counts(env)
    r = post(env, "buyer-bot", PO, order_body(next(_TAGS), quantity="20", price="1150.00", SupplierQuotation=qtn))
    assert_refused(r, 403, ["po-over-10k-needs-approval"])  # approvals are off in this config: a plain refusal
    f = env.decision_of(r)["cedar"]["context"]["fields"]
    assert (f["net_amount"], f["quotation"]) == (dec("23000.0"), qtn)
    assert counts(env) == before


def test_a_goods_receipt_naming_two_orders_is_refused(env):
    """one-order-per-goods-receipt: a receipt's purchase_order (its first item's order) is what
    the whole receipt is about, so a second order cannot ride along (on an order a workflow has
    not reached, say)."""
    first, second = released_order(env), released_order(env)
    before = counts(env)
    r = post(env, "buyer-bot", GR, gr_body(first, second))
    assert_refused(r, 403, ["one-order-per-goods-receipt"])
    f = env.decision_of(r)["cedar"]["context"]["fields"]
    assert f["purchase_order"] == first and sorted(f["purchase_orders"]) == sorted([first, second])
    assert counts(env) == before
    # two lines of the same order are one order
    r = post(env, "buyer-bot", GR, gr_body(first, first))
    assert r.status_code == 201, r.text


# ------------------------------------------------- the ERP's refusals pass through


def test_goods_receipt_for_an_unreleased_order_is_the_erps_400(env):
    po = created(post(env, "buyer-bot", PO, order_body(next(_TAGS))), "PurchaseOrder")
    r = post(env, "buyer-bot", GR, gr_body(po))
    assert r.status_code == 400 and "purchase order not released" in r.json()["error"]["message"]["value"]
    rec = env.decision_of(r)
    assert rec["decision"] == "allow" and rec["upstream_status"] == 400


def test_three_way_match_failure_is_the_erps_422(env):
    """The demo's failing step: an invoice more than 5 % off its order's net amount."""
    po = received_order(env)
    r = post(env, "payables-bot", INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "5200.00", "DocumentCurrency": "EUR"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"]["value"].startswith(
        "amount does not match the purchase order (three-way match failed)")
    rec = env.decision_of(r)
    assert (rec["decision"], rec["upstream_status"], rec["reasons"]) == ("allow", 422, ["payables-enter-invoices"])
    assert rec["cedar"]["context"]["fields"]["gross_amount"] == dec("5200.0")  # what policy saw
    assert not [i for i in docs(env)["invoices"].values() if i["PurchaseOrder"] == po]
    # the corrected invoice passes
    assert invoice(env, po, "4600.00")


def test_paying_an_unknown_invoice_is_the_erps_404(env):
    r = post(env, "payables-bot", f"{INV}('5105699999')/Pay")
    assert r.status_code == 404, r.text
    rec = env.decision_of(r)
    # the lookup found nothing: no attributes, and the permit does not need them
    assert rec["decision"] == "allow" and "gross_amount" not in rec["cedar"]["resource"].get("attrs", {})


def test_payment_lookup_failure_fails_closed(env):
    inv = invoice(env, received_order(env))
    env.mocks.fail["erp"]["GET"] = 503
    try:
        r = post(env, "payables-bot", f"{INV}('{inv}')/Pay")
    finally:
        env.mocks.fail["erp"].clear()
    assert_refused(r, 503, ["resource-lookup-failed"])
    assert env.mocks.apps["erp"][mock_erp.PAYMENTS].get(inv, 0) == 0
    assert docs(env)["invoices"][inv]["PaymentStatus"] == "NOT_PAID"


# ---------------------------------------------------- values Proctor cannot read


@pytest.mark.parametrize("agent, path, body, value", [
    ("buyer-bot", QTN, {"PurchaseRequisition": "10000001", "Supplier": "17300001",
                        "to_SupplierQuotationItem": [{"OrderQuantity": "1", "NetPriceAmount": "1"}]}, "requisition"),
    ("buyer-bot", QTN, {"Supplier": "17300001",
                        "to_SupplierQuotationItem": [{"OrderQuantity": "1", "NetPriceAmount": "1"}]}, "requisition"),
    ("buyer-bot", QTN, {"PurchaseRequisition": "0010000001", "Supplier": "17300001",
                        "to_SupplierQuotationItem": [{"OrderQuantity": "1", "NetPriceAmount": "-1"}]}, "net_amount"),
    ("buyer-bot", PR, {"to_PurchaseReqnItem": [{"Material": "X", "RequestedQuantity": "1"}]}, "net_amount"),
    ("buyer-bot", PR, {"to_PurchaseReqnItem": [{"Material": "X", "RequestedQuantity": "-1",
                                                "PurchaseRequisitionPrice": "9"}]}, "net_amount"),
    ("buyer-bot", PO, {**order_body(0), "SupplierQuotation": "6000000001' or '1"}, "quotation"),
    ("buyer-bot", PO, {**order_body(0), "PurchaseRequisition": 10000001}, "requisition"),
    ("buyer-bot", GR, {"to_MaterialDocumentItem": []}, "purchase_order"),
    ("buyer-bot", GR, {"to_MaterialDocumentItem": {"0": {"PurchaseOrder": "4500000001"}}}, "purchase_order"),
    ("buyer-bot", GR, {"to_MaterialDocumentItem": [{"PurchaseOrder": "4500000001", "QuantityInEntryUnit": "4"},
                                                   {"PurchaseOrder": "45000000012", "QuantityInEntryUnit": "4"}]},
     "purchase_orders"),
    ("buyer-bot", GR, {"to_MaterialDocumentItem": [{"PurchaseOrder": "4500000001", "QuantityInEntryUnit": "-4"}]},
     "quantity"),
    ("payables-bot", INV, {"PurchaseOrder": "4500000001", "InvoiceGrossAmount": "lots"}, "gross_amount"),
    ("payables-bot", INV, {"PurchaseOrder": "4500000001", "InvoiceGrossAmount": "-4600"}, "gross_amount"),
    ("payables-bot", INV, {"PurchaseOrder": "4500000001"}, "gross_amount"),
    ("payables-bot", INV, {"purchaseorder": "4500000001", "PurchaseOrder": "4500000002",
                           "InvoiceGrossAmount": "1"}, "differ only by case"),
])
def test_a_value_of_the_wrong_shape_is_a_400_before_any_policy(env, agent, path, body, value):
    before, posts = counts(env), len(env.mocks.forwarded("erp", "POST"))
    r = post(env, agent, path, body)
    refused = assert_refused(r, 400, None)
    assert value in refused["detail"], refused
    assert counts(env) == before and len(env.mocks.forwarded("erp", "POST")) == posts


@pytest.mark.parametrize("key, status, reasons, detail", [
    ("5105600001' or '1", 403, ["egress-default-deny"], "no connector classifies"),  # a quote ends the key
    ("510560000", 400, [], "path parameter 'invoice' does not match"),
    ("51056000011", 400, [], "path parameter 'invoice' does not match"),
])
def test_a_malformed_invoice_key_is_refused(env, key, status, reasons, detail):
    posts = len(env.mocks.forwarded("erp", "POST"))
    refused = assert_refused(post(env, "payables-bot", f"{INV}('{key}')/Pay"), status, reasons)
    assert detail in refused["detail"]
    assert len(env.mocks.forwarded("erp", "POST")) == posts
