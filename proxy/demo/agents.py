"""Scripted demo agents. They are ordinary `requests` programs: nothing in here
knows about Proctor. They reach it only because the environment says
HTTP_PROXY/HTTPS_PROXY=http://<agent-id>:<jwt>@127.0.0.1:8080.

    python -m proxy.demo.agents support|support2|handoff|takeover|late|escalate|procurement|procurement2|finance|sales|rogue [ARG]

Each step prints one JSON line:
{"agent", "step", "method", "url", "status", "decision_id", "detail", "created"?, "incident"?, "claim"?, "first"?}.
"""

from __future__ import annotations

import json
import sys
import uuid

import requests

TICKETING = "http://127.0.0.1:9101/api/now/table/incident"
CRM = "http://127.0.0.1:9102/services/data/v60.0"
ERP_PO = "http://127.0.0.1:9103/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder"
ERP_SUPPLIER = "http://127.0.0.1:9103/sap/opu/odata/sap/API_BUSINESS_PARTNER/A_Supplier"
TIMEOUT = 15


def emit(agent: str, step: str, resp: requests.Response, created: str | None = None,
         incident: dict | None = None) -> dict:
    detail = ""
    ctype = resp.headers.get("content-type", "")
    problem: dict = {}
    if ctype.startswith("application/problem+json"):
        problem = resp.json()
        detail = problem.get("detail", "")
    line = {
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


LAPTOP_ORDER = {
    "CompanyCode": "1010",
    "PurchaseOrderType": "NB",
    "Supplier": "17300001",
    "DocumentCurrency": "EUR",
    "to_PurchaseOrderItem": [
        {"Material": "LAPTOP-14", "OrderQuantity": "4", "NetPriceAmount": "1150.00"},
        {"Material": "DOCK-USB-C", "OrderQuantity": "4", "NetPriceAmount": "49.99"},
    ],
}


def new_order_key() -> dict[str, str]:
    """An Idempotency-Key for one order: a retry of that order sends the same key again, a new
    order (this run's, not the last run's) a new one. Without it an order byte-identical to one
    a manager denied earlier is that request again, and a denial is final (docs/approvals.md)."""
    return {"Idempotency-Key": str(uuid.uuid4())}


def procurement() -> None:
    a = "procurement-bot"
    r = requests.get(f"{ERP_SUPPLIER}('17300001')", timeout=TIMEOUT)
    emit(a, "read supplier 17300001", r)
    order = LAPTOP_ORDER
    r = requests.post(ERP_PO, json=order, headers=new_order_key(), timeout=TIMEOUT)
    po = r.json()["d"]["PurchaseOrder"] if r.status_code == 201 else None
    emit(a, "order 4 laptops (EUR 4,799.96)", r, created=po)
    big = dict(order, to_PurchaseOrderItem=[{"Material": "SERVER-2U", "OrderQuantity": "5", "NetPriceAmount": "5200.00"}])
    r = requests.post(ERP_PO, json=big, headers=new_order_key(), timeout=120)  # held for a manager: the connection waits
    emit(a, "order 5 servers (EUR 26,000)", r)
    huge = dict(order, to_PurchaseOrderItem=[{"Material": "SERVER-2U", "OrderQuantity": "20", "NetPriceAmount": "5200.00"}])
    r = requests.post(ERP_PO, json=huge, headers=new_order_key(), timeout=120)
    emit(a, "order 20 servers (EUR 104,000)", r)
    r = requests.post(f"{ERP_PO}('{po or '0000000000'}')/Release", timeout=TIMEOUT)
    emit(a, "release the order it created", r)


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


def procurement2() -> None:
    """A second procurement agent raises the order procurement-bot already raised."""
    a = "procurement-bot-2"
    r = requests.post(ERP_PO, json=LAPTOP_ORDER, headers=new_order_key(), timeout=TIMEOUT)
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


def rogue() -> None:
    r = requests.get(TICKETING, timeout=TIMEOUT)
    emit("rogue-script", "call the ticketing API without a token", r)


if __name__ == "__main__":
    script = sys.argv[1]
    with_arg = {"finance": finance, "support2": support2, "handoff": handoff, "takeover": takeover, "late": late,
                "escalate": escalate}
    if script in with_arg:
        with_arg[script](sys.argv[2])
    else:
        {"support": support, "procurement": procurement, "procurement2": procurement2, "sales": sales,
         "rogue": rogue}[script]()
