"""Scripted demo agents. They are ordinary `requests` programs: nothing in here
knows about Proctor. They reach it only because the environment says
HTTP_PROXY/HTTPS_PROXY=http://<agent-id>:<jwt>@127.0.0.1:8080.

    python -m proxy.demo.agents SCRIPT [ARG]

    SCRIPT: support|support2|handoff|takeover|late|escalate|procurement|procurement2|finance|receive|invoice|
            payables|overspend|sales|runaway|rogue

Each step prints one JSON line:
{"agent", "step", "method", "url", "status", "decision_id", "detail", "created"?, "incident"?, "claim"?, "first"?,
 "workflow"?, "upstream_error"?, "retry"?, "remaining"?, "rate_limit"?, "retry_after"?, "retried"?}.

The ERP scripts walk the bundled procure-to-pay workflow (workflows/procure-to-pay.yaml):
requisition -> supplier quotation -> purchase order -> release -> goods receipt -> invoice
-> payment, each call naming the document it follows, as an ERP client would.
"""

from __future__ import annotations

import json
import re
import sys
import uuid
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

TICKETING = "http://127.0.0.1:9101/api/now/table/incident"
CRM = "http://127.0.0.1:9102/services/data/v60.0"
ERP = "http://127.0.0.1:9103/sap/opu/odata/sap"
ERP_PR = f"{ERP}/API_PURCHASEREQ_PROCESS_SRV/A_PurchaseRequisitionHeader"
ERP_QTN = f"{ERP}/API_QTN_PROCESS_SRV/A_SupplierQuotation"
ERP_PO = f"{ERP}/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder"
ERP_GR = f"{ERP}/API_MATERIAL_DOCUMENT_SRV/A_MaterialDocumentHeader"
ERP_INVOICE = f"{ERP}/API_SUPPLIERINVOICE_PROCESS_SRV/A_SupplierInvoice"
TIMEOUT = 15


def emit(agent: str, step: str, resp: requests.Response, created: str | None = None,
         incident: dict | None = None, retried: list[int] | None = None) -> dict:
    detail = ""
    ctype = resp.headers.get("content-type", "")
    problem: dict = {}
    upstream_error = None
    if ctype.startswith("application/problem+json"):
        problem = resp.json()
        detail = problem.get("detail", "")
    elif resp.status_code >= 400 and ctype.startswith("application/json"):
        # the system's own error (an OData error body): what the agent would log
        try:
            body = resp.json()
        except ValueError:
            body = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = err.get("message")
            upstream_error = {"code": err.get("code"),
                              "message": message.get("value") if isinstance(message, dict) else message}
    line: dict[str, Any] = {
        "agent": agent,
        "step": step,
        "method": resp.request.method,
        "url": resp.request.url,
        "status": resp.status_code,
        "decision_id": resp.headers.get("X-Proctor-Decision-Id"),
        "detail": detail,
    }
    if created:
        line["created"] = created
    if incident:  # a record a later scene works on (sys_id, number)
        line["incident"] = incident
    # A 409 says who is working on the record (a claim) or which request already did
    # this work (a duplicate): what an agent would read to decide what to do next.
    if isinstance(problem.get("claim"), dict):
        line["claim"] = {k: problem["claim"].get(k) for k in ("holder", "until")}
    if problem.get("first_decision_id"):
        line["first"] = {"decision_id": problem["first_decision_id"], "result": problem.get("first_result")}
    # A 409 for a workflow step out of order names the missing steps and what can be done now.
    if isinstance(problem.get("workflow"), dict):
        line["workflow"] = {k: problem["workflow"].get(k) for k in ("step", "missing", "next")}
    if upstream_error:
        line["upstream_error"] = upstream_error
    # a failed workflow step: whether to retry, and whose inbox has it now (escalated="group")
    if resp.headers.get("Proctor-Workflow-Retry"):
        line["retry"] = resp.headers["Proctor-Workflow-Retry"]
    # a rate-limited route: what is left (the RateLimit field, r=), or the 429's limit and when to retry
    left = re.search(r";r=(\d+)", resp.headers.get("RateLimit", ""))
    if left:
        line["remaining"] = int(left.group(1))
    if isinstance(problem.get("rate_limit"), dict):
        line["rate_limit"] = {k: problem["rate_limit"].get(k) for k in ("name", "limit", "period_seconds", "burst", "key")}
        line["retry_after"] = resp.headers.get("Retry-After")
    if retried:  # the answers the HTTP client's own retries got first (urllib3 Retry)
        line["retried"] = retried
    print(json.dumps(line), flush=True)
    return line


def support() -> None:
    a = "support-bot"
    r = requests.get(TICKETING, timeout=TIMEOUT)
    incidents = r.json().get("result", []) if r.ok else []
    other = next((i["sys_id"] for i in incidents if i.get("assignment_group") == "network"), "0" * 32)
    # the service desk's e-mail incident: the handoff scene works on it
    mail = next(({"sys_id": i["sys_id"], "number": i.get("number")} for i in incidents
                 if i.get("assignment_group") == "service-desk"), {"sys_id": "0" * 32, "number": None})
    emit(a, "list incidents", r, incident=mail)
    r = requests.post(
        TICKETING,
        json={"short_description": "Printer on floor 3 offline", "assignment_group": "service-desk", "urgency": "3"},
        timeout=TIMEOUT,
    )
    sys_id = r.json()["result"]["sys_id"] if r.status_code == 201 else "0" * 32
    emit(a, "open an incident for its queue", r, created=sys_id)
    r = requests.patch(f"{TICKETING}/{sys_id}", json={"state": "2", "work_notes": "Rebooted the spooler"}, timeout=TIMEOUT)
    emit(a, "work its own incident", r)
    r = requests.patch(f"{TICKETING}/{other}", json={"state": "2", "work_notes": "Looking into it"}, timeout=TIMEOUT)
    emit(a, "work the network team's incident", r)
    r = requests.patch(f"{TICKETING}/{sys_id}", json={"state": "6"}, timeout=TIMEOUT)
    emit(a, "resolve without a close code", r)
    r = requests.patch(
        f"{TICKETING}/{sys_id}", json={"state": "6", "close_code": "Solved (Permanently)"}, timeout=TIMEOUT
    )
    emit(a, "resolve with a close code", r)
    r = requests.delete(f"{TICKETING}/{sys_id}", timeout=TIMEOUT)
    emit(a, "delete the incident", r)
    r = requests.post("http://127.0.0.1:9/upload", data=b"customer list", timeout=TIMEOUT)
    emit(a, "send data to an unknown host", r)


ACME, GLOBEX = "17300001", "17300002"
LAPTOPS = [("LAPTOP-14", "4", "1150.00"), ("DOCK-USB-C", "4", "49.99")]  # (material, quantity, net price)
SERVERS = [("SERVER-2U", "5", "5200.00")]


def requisition(description: str, lines: list[tuple[str, str, str]]) -> dict:
    return {"PurReqnDescription": description, "to_PurchaseReqnItem": [
        {"Material": m, "RequestedQuantity": q, "PurchaseRequisitionPrice": p} for m, q, p in lines]}


def quotation(requisition_number: str, supplier: str, lines: list[tuple[str, str, str]]) -> dict:
    return {"PurchaseRequisition": requisition_number, "Supplier": supplier, "DocumentCurrency": "EUR",
            "to_SupplierQuotationItem": [{"Material": m, "OrderQuantity": q, "NetPriceAmount": p} for m, q, p in lines]}


def order(supplier: str, lines: list[tuple[str, str, str]], **refs: str) -> dict:
    """A purchase order; `refs`: SupplierQuotation and/or PurchaseRequisition it follows."""
    return {"CompanyCode": "1010", "PurchaseOrderType": "NB", "Supplier": supplier, "DocumentCurrency": "EUR", **refs,
            "to_PurchaseOrderItem": [{"Material": m, "OrderQuantity": q, "NetPriceAmount": p} for m, q, p in lines]}


def goods_receipt(po: str, quantity: str) -> dict:
    return {"GoodsMovementCode": "01", "to_MaterialDocumentItem": [
        {"PurchaseOrder": po, "PurchaseOrderItem": "00010", "QuantityInEntryUnit": quantity}]}


def number(resp: requests.Response, field: str) -> str | None:
    """The document number the ERP assigned (d.<field>) when it created one."""
    return resp.json()["d"][field] if resp.status_code == 201 else None


def new_order_key() -> dict[str, str]:
    """An Idempotency-Key for one order: a retry of that order sends the same key again, a new
    order (this run's, not the last run's) a new one. Without it an order byte-identical to one
    a manager denied earlier is that request again, and a denial is final (docs/approvals.md)."""
    return {"Idempotency-Key": str(uuid.uuid4())}


def procurement() -> None:
    """Two purchases: 4 laptops (under EUR 10,000) and 5 servers (held for a manager)."""
    a = "procurement-bot"
    r = requests.post(ERP_PR, json=requisition("Laptops for the new hires", LAPTOPS), timeout=TIMEOUT)
    pr_laptops = number(r, "PurchaseRequisition") or "0000000000"
    emit(a, "raise a requisition for 4 laptops", r, created=pr_laptops)
    # straight to the order, skipping the quotation: the workflow refuses it (409, naming the quote)
    r = requests.post(ERP_PO, json=order(ACME, LAPTOPS, PurchaseRequisition=pr_laptops), headers=new_order_key(),
                      timeout=TIMEOUT)
    emit(a, "order the laptops before a quote", r)
    r = requests.post(ERP_QTN, json=quotation(pr_laptops, ACME, LAPTOPS), timeout=TIMEOUT)
    q_laptops = number(r, "SupplierQuotation") or "0000000000"
    emit(a, "enter Acme's quotation (laptops)", r, created=q_laptops)
    r = requests.post(ERP_PO, json=order(ACME, LAPTOPS, SupplierQuotation=q_laptops), headers=new_order_key(),
                      timeout=TIMEOUT)
    emit(a, "order 4 laptops (EUR 4,799.96)", r, created=number(r, "PurchaseOrder"))

    r = requests.post(ERP_PR, json=requisition("Servers for the new cluster", SERVERS), timeout=TIMEOUT)
    pr_servers = number(r, "PurchaseRequisition") or "0000000000"
    emit(a, "raise a requisition for 5 servers", r, created=pr_servers)
    r = requests.post(ERP_QTN, json=quotation(pr_servers, GLOBEX, SERVERS), timeout=TIMEOUT)
    q_servers = number(r, "SupplierQuotation") or "0000000000"
    emit(a, "enter Globex's quotation (servers)", r, created=q_servers)
    # held for a manager: the connection waits
    r = requests.post(ERP_PO, json=order(GLOBEX, SERVERS, SupplierQuotation=q_servers), headers=new_order_key(),
                      timeout=120)
    po = number(r, "PurchaseOrder") or "0000000000"
    emit(a, "order 5 servers (EUR 26,000)", r, created=po)
    r = requests.post(ERP_PO, json=order(GLOBEX, [("SERVER-2U", "20", "5200.00")], SupplierQuotation=q_servers),
                      headers=new_order_key(), timeout=120)
    emit(a, "order 20 servers (EUR 104,000)", r)
    # the servers arrive before anyone released the order: the workflow refuses the receipt (409)
    r = requests.post(ERP_GR, json=goods_receipt(po, "5"), timeout=TIMEOUT)
    emit(a, "post the goods receipt before the release", r)
    r = requests.post(f"{ERP_PO}('{po}')/Release", timeout=TIMEOUT)
    emit(a, "release the order it created", r)


def receive(po: str) -> None:
    """procurement-bot, once the order is released: the goods receipt."""
    a = "procurement-bot"
    r = requests.post(ERP_GR, json=goods_receipt(po, "5"), timeout=TIMEOUT)
    emit(a, "post the goods receipt", r, created=number(r, "MaterialDocument"))


def invoice_body(po: str, amount: str, reference: str) -> dict:
    return {"PurchaseOrder": po, "InvoiceGrossAmount": amount, "DocumentCurrency": "EUR", "InvoicingParty": GLOBEX,
            "SupplierInvoiceIDByInvcgParty": reference}


def invoice(po: str) -> None:
    """An accounts-payable agent enters the supplier's invoice for the order."""
    a = "payables-bot"
    # Globex bills EUR 5,720 a server instead of the quoted 5,200: 10 % over the order, so the
    # ERP's three-way match (order, goods receipt, invoice) fails with 422
    r = requests.post(ERP_INVOICE, json=invoice_body(po, "28600.00", "GLX-INV-0042"), timeout=TIMEOUT)
    emit(a, "enter Globex's invoice (EUR 28,600)", r)


def payables(po: str) -> None:
    """The accounts-payable agent, once a supervisor looked at the failed invoice: Globex's
    corrected invoice, then its payment."""
    a = "payables-bot"
    r = requests.post(ERP_INVOICE, json=invoice_body(po, "26000.00", "GLX-INV-0042-C"), timeout=TIMEOUT)
    inv = number(r, "SupplierInvoice") or "0000000000"
    emit(a, "enter the corrected invoice (EUR 26,000)", r, created=inv)
    r = requests.post(f"{ERP_INVOICE}('{inv}')/Pay", timeout=TIMEOUT)
    emit(a, f"pay invoice {inv}", r, created=number(r, "PaymentDocument"))


def overspend() -> None:
    """procurement-bot-2 buys 8 laptops for more new hires: the order would take the procurement
    group over its monthly purchase-order budget (the demo's po-spend-monthly), so it is held for
    a budget extension; the connection waits until a person decides."""
    a = "procurement-bot-2"
    lines = [(m, "8", p) for m, _, p in LAPTOPS]
    r = requests.post(ERP_PR, json=requisition("Laptops for the second wave of hires", lines), timeout=TIMEOUT)
    pr = number(r, "PurchaseRequisition") or "0000000000"
    emit(a, "raise a requisition for 8 laptops", r, created=pr)
    r = requests.post(ERP_QTN, json=quotation(pr, ACME, lines), timeout=TIMEOUT)
    q = number(r, "SupplierQuotation") or "0000000000"
    emit(a, "enter Acme's quotation (8 laptops)", r, created=q)
    r = requests.post(ERP_PO, json=order(ACME, lines, SupplierQuotation=q), headers=new_order_key(), timeout=120)
    emit(a, "order 8 laptops (EUR 9,599.92)", r, created=number(r, "PurchaseOrder"))


def support2(sys_id: str) -> None:
    """A second support agent picks up the incident support-bot is working on."""
    a = "support-bot-2"
    r = requests.patch(f"{TICKETING}/{sys_id}", json={"state": "2", "work_notes": "Taking this one"}, timeout=TIMEOUT)
    emit(a, "work support-bot's incident", r)


# The handoff scene, on the service desk's e-mail incident (connectors/ticketing.yaml `handoff`):
# support-bot works it, then reassigns it to support-bot-2, which takes the claim over.
def handoff(sys_id: str) -> None:
    a = "support-bot"
    r = requests.patch(f"{TICKETING}/{sys_id}", json={"state": "2", "work_notes": "Mail relay queue backing up"},
                       timeout=TIMEOUT)
    emit(a, "work the e-mail incident", r)
    r = requests.patch(f"{TICKETING}/{sys_id}",
                       json={"assigned_to": "support-bot-2", "work_notes": "Shift over: support-bot-2 takes it"},
                       timeout=TIMEOUT)
    emit(a, "hand the e-mail incident to support-bot-2", r)


def takeover(sys_id: str) -> None:
    a = "support-bot-2"
    r = requests.patch(f"{TICKETING}/{sys_id}", json={"state": "2", "work_notes": "Restarting the relay"},
                       timeout=TIMEOUT)
    emit(a, "work the e-mail incident handed to it", r)


def late(sys_id: str) -> None:
    """support-bot, after the handoff: the incident is its colleague's now."""
    a = "support-bot"
    r = requests.patch(f"{TICKETING}/{sys_id}", json={"work_notes": "Queue is at 4,000 messages"}, timeout=TIMEOUT)
    emit(a, "update the e-mail incident again", r)


def escalate(sys_id: str) -> None:
    """support-bot-2 gives the incident to the service desk's people (no assignee: their inbox)."""
    a = "support-bot-2"
    r = requests.patch(
        f"{TICKETING}/{sys_id}",
        json={"assignment_group": "service-desk", "assigned_to": "", "work_notes": "Relay hardware fault: needs a person"},
        timeout=TIMEOUT,
    )
    emit(a, "hand it to the service-desk people", r)


def procurement2(quote: str) -> None:
    """A second procurement agent raises the laptop order procurement-bot already raised."""
    a = "procurement-bot-2"
    r = requests.post(ERP_PO, json=order(ACME, LAPTOPS, SupplierQuotation=quote), headers=new_order_key(),
                      timeout=TIMEOUT)
    emit(a, "order the same 4 laptops again", r)


def finance(po: str) -> None:
    a = "finance-bot"
    r = requests.post(f"{ERP_PO}('{po}')/Release", timeout=TIMEOUT)
    emit(a, f"release order {po}", r)


def sales() -> None:
    a = "sales-bot"
    r = requests.get(f"{CRM}/query", params={"q": "SELECT Id, Name FROM Account LIMIT 5"}, timeout=TIMEOUT)
    emit(a, "query accounts (SOQL)", r)
    accounts = r.json().get("records", []) if r.ok else []
    account_id = accounts[0]["Id"] if accounts else "001000000000000AAA"
    r = requests.post(
        f"{CRM}/sobjects/Opportunity",
        json={"Name": "Renewal 2027", "AccountId": account_id, "StageName": "Prospecting", "Amount": 48000,
              "CloseDate": "2027-03-31"},
        timeout=TIMEOUT,
    )
    opp = r.json().get("id") if r.status_code == 201 else "006000000000000AAA"
    emit(a, "create an opportunity", r, created=opp)
    r = requests.patch(f"{CRM}/sobjects/Opportunity/{opp}", json={"StageName": "Closed Won"}, timeout=TIMEOUT)
    emit(a, "mark the deal Closed Won", r)


SOQL = {"q": "SELECT Id, Name, Industry FROM Account LIMIT 5"}


def runaway() -> None:
    """A reporting agent stuck in a loop, re-running the same query as fast as it can; then the
    same call from a client that honours Retry-After (urllib3's Retry): it waits and gets through."""
    a = "report-bot"
    for i in range(1, 6):
        r = requests.get(f"{CRM}/query", params=SOQL, timeout=TIMEOUT)
        emit(a, f"re-run its account report ({i} of 5)", r)
    session = requests.Session()
    session.mount("http://", HTTPAdapter(max_retries=Retry(
        total=3, status_forcelist=[429], allowed_methods=["GET"], respect_retry_after_header=True, backoff_factor=0)))
    r = session.get(f"{CRM}/query", params=SOQL, timeout=TIMEOUT)
    history = r.raw.retries.history if r.raw is not None and r.raw.retries is not None else ()
    emit(a, "run it again, honouring Retry-After", r, retried=[h.status for h in history if h.status])


def rogue() -> None:
    r = requests.get(TICKETING, timeout=TIMEOUT)
    emit("rogue-script", "call the ticketing API without a token", r)


if __name__ == "__main__":
    script = sys.argv[1]
    with_arg = {"finance": finance, "support2": support2, "handoff": handoff, "takeover": takeover, "late": late,
                "escalate": escalate, "procurement2": procurement2, "receive": receive, "invoice": invoice,
                "payables": payables}
    if script in with_arg:
        with_arg[script](sys.argv[2])
    else:
        {"support": support, "procurement": procurement, "overspend": overspend, "sales": sales, "runaway": runaway,
         "rogue": rogue}[script]()
