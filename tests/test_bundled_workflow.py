"""The bundled procure-to-pay workflow (workflows/procure-to-pay.yaml) with the bundled connectors
and policies, through a real `proctor run` in front of the real mock ERP: the order of the steps
across agents (409 step-precondition naming the missing and the next steps, never forwarded),
one instance found from each step's document, a failing step (the ERP's three-way match) recorded
as failed and escalated to the accounts-payable supervisors (the invoice step's on_error), and the
instance completed once paid.

The bundled tests in test_bundled_connectors.py and test_bundled_erp_p2p.py copy the connectors
(other ports), so the bundled workflow is not on there (config.effective_workflows_dir); here it
is put on explicitly, as `proctor run` with the embedded default has it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import pytest
import requests
import yaml

from proxy.config import DEFAULTS_DIR, ProctorConfig, default_config, load_config
from proxy.connectors.manifest import load_manifests
from proxy.demo import mock_erp
from proxy.identity.dev_issuer import DevIssuer
from proxy.workflows.spec import load_workflows
from test_bundled_connectors import Env, Mocks, assert_refused

ROOT = Path(__file__).resolve().parent.parent
PR = f"{mock_erp.PR_SRV}/A_PurchaseRequisitionHeader"
QTN = f"{mock_erp.QTN_SRV}/A_SupplierQuotation"
PO = f"{mock_erp.PO_SRV}/A_PurchaseOrder"
GR = f"{mock_erp.MATDOC_SRV}/A_MaterialDocumentHeader"
INV = f"{mock_erp.INV_SRV}/A_SupplierInvoice"
STEPS = ["requisition", "quote", "purchase_order", "release", "goods_receipt", "invoice", "payment"]
AGENTS = {"buyer-bot": ["procurement"], "approver-bot": ["procurement-approvers"],
          "payables-bot": ["accounts-payable"]}
_TAGS = itertools.count(1)


# ------------------------------------------------------------------ the definition


def test_the_embedded_default_loads_the_bundled_workflow(tmp_path):
    cfg = default_config()
    assert cfg.effective_workflows_dir == DEFAULTS_DIR / "workflows"
    assert cfg.effective_workflows_dir.resolve() == (ROOT / "workflows").resolve()
    workflows = load_workflows(cfg.effective_workflows_dir, load_manifests(cfg.connectors_dir))
    spec = workflows.get("procure-to-pay")
    assert spec is not None and [s.name for s in spec.steps] == STEPS
    assert {s.name: s.requires for s in spec.steps} == {
        "requisition": [], "quote": ["requisition"], "purchase_order": ["quote"], "release": ["purchase_order"],
        "goods_receipt": ["release"], "invoice": ["goods_receipt"], "payment": ["invoice"]}
    # every step after the first finds its instance from the document it follows
    assert all(s.request_objects for s in spec.steps[1:])
    assert workflows.for_action("erp.purchase_order.create").step.name == "purchase_order"
    # other connectors: not the bundled workflow (it names the bundled connectors' actions)
    other = ProctorConfig(state_dir=tmp_path, connectors_dir=tmp_path)
    assert other.effective_workflows_dir is None


# ------------------------------------------------------------------ through a real proxy


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mocks = Mocks()
    e = Env(tmp_path_factory.mktemp("p2p-workflow"), mocks)
    cfg = yaml.safe_load(e.config_path.read_text())
    cfg["workflows_dir"] = str(ROOT / "workflows")
    e.config_path.write_text(yaml.safe_dump(cfg))
    e.restart()
    config = load_config(e.config_path)
    issuer = DevIssuer(config.dev_issuer_dir, config.dev_issuer)
    e.tokens.update({agent: issuer.issue(agent, {"groups": groups}) for agent, groups in AGENTS.items()})
    e.person = issuer.issue("olga", {config.approvals.approver_groups_claim: ["procurement-managers"]},
                            audience=config.approvals.approver_audience)
    e.supervisor = issuer.issue("paula", {config.approvals.approver_groups_claim: ["accounts-payable-supervisors"]},
                                audience=config.approvals.approver_audience)
    yield e
    e.p.stop()
    mocks.close()


def post(env: Env, agent: str, path: str, body: dict | None = None) -> requests.Response:
    return env.call(agent, "POST", env.mocks.url("erp", path), **({"json": body} if body is not None else {}))


def created(r: requests.Response, field: str) -> str:
    assert r.status_code == 201, r.text
    return r.json()["d"][field]


def documents(env: Env) -> dict[str, int]:
    return {kind: len(d) for kind, d in env.mocks.apps["erp"][mock_erp.DOCUMENTS].items()}


def instance_of(r: requests.Response) -> str:
    """The instance a step's answer names (Proctor-Workflow: procure-to-pay; instance=...; step=...)."""
    parts = dict(p.strip().split("=", 1) for p in r.headers["Proctor-Workflow"].split(";")[1:])
    return parts["instance"]


def instance(env: Env, inst: str) -> dict:
    r = httpx.get(f"http://127.0.0.1:{env.p.control_port}/v1/workflows/instances/{inst}",
                  headers={"Authorization": f"Bearer {env.person}"}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def inbox(env: Env, token: str) -> list[dict]:
    r = httpx.get(f"http://127.0.0.1:{env.p.control_port}/v1/workflows/inbox?workflow=procure-to-pay",
                  headers={"Authorization": f"Bearer {token}"}, timeout=5)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def lines(tag: int, quantity: str = "4") -> list[tuple[str, str, str]]:
    return [(f"LAPTOP-{tag}", quantity, "1150.00")]


def order_body(tag: int, **refs: str) -> dict:
    return {"CompanyCode": "1010", "Supplier": "17300001", "DocumentCurrency": "EUR", **refs,
            "to_PurchaseOrderItem": [{"Material": m, "OrderQuantity": q, "NetPriceAmount": p} for m, q, p in lines(tag)]}


def requisition(env: Env, tag: int) -> requests.Response:
    return post(env, "buyer-bot", PR, {"PurReqnDescription": "Laptops", "to_PurchaseReqnItem": [
        {"Material": m, "RequestedQuantity": q, "PurchaseRequisitionPrice": p} for m, q, p in lines(tag)]})


def quote(env: Env, pr: str, tag: int) -> requests.Response:
    return post(env, "buyer-bot", QTN, {"PurchaseRequisition": pr, "Supplier": "17300001", "to_SupplierQuotationItem": [
        {"Material": m, "OrderQuantity": q, "NetPriceAmount": p} for m, q, p in lines(tag)]})


def gr_body(po: str) -> dict:
    return {"GoodsMovementCode": "01", "to_MaterialDocumentItem": [{"PurchaseOrder": po, "QuantityInEntryUnit": "4"}]}


def assert_out_of_order(env: Env, r: requests.Response, step: str, missing: list[str], nxt: list[str],
                        completed: list[str]) -> dict:
    body = assert_refused(r, 409, ["workflow-step-out-of-order"])
    assert body["type"].endswith("/step-precondition"), body
    wf = body["workflow"]
    assert (wf["name"], wf["step"], wf["missing"], wf["next"], wf["completed"]) == \
        ("procure-to-pay", step, missing, nxt, completed), wf
    assert f"it requires {' and '.join(missing) if len(missing) > 1 else missing[0]} first" in body["detail"], body
    assert "Steps that can be done now: " in body["detail"], body
    return body


def test_an_order_naming_no_quotation_is_refused_409_naming_quote(env):
    before = documents(env)
    r = post(env, "buyer-bot", PO, order_body(next(_TAGS)))
    body = assert_out_of_order(env, r, "purchase_order", ["quote"], ["requisition"], [])
    assert body["workflow"]["instance"] is None  # nothing it names belongs to an instance
    assert "no instance yet" in body["detail"] and "requisition (erp.requisition.create)" in body["detail"]
    assert body["action"] == "erp.purchase_order.create"
    assert documents(env) == before  # never reached the ERP
    assert "Proctor-Workflow" not in r.headers  # no instance to name
    rec = env.decision_of(r)
    assert rec["decision"] == "deny" and rec["refusal"]["kind"] == "step-precondition"


def test_a_large_order_naming_no_quotation_is_409_not_held(env):
    """Above EUR 10,000 the order also needs approval; out of order comes first: 409 naming
    the missing quote (both policies as reasons), never a hold a person would approve in vain."""
    body = order_body(next(_TAGS))
    body["to_PurchaseOrderItem"] = [{"Material": "SERVER-X", "OrderQuantity": "20", "NetPriceAmount": "5200.00"}]
    before = documents(env)
    r = post(env, "buyer-bot", PO, body)
    assert r.status_code == 409, r.text
    problem = r.json()
    assert problem["type"].endswith("/step-precondition") and problem["workflow"]["missing"] == ["quote"]
    assert sorted(problem["reasons"]) == ["po-over-10k-needs-approval", "workflow-step-out-of-order"]
    assert "also needs a person's approval" in problem["detail"]
    assert "approval_id" not in problem and documents(env) == before
    rec = env.decision_of(r)
    assert rec["decision"] == "deny" and "approval_id" not in rec


def test_an_order_on_a_requisition_without_a_quote_is_refused_naming_quote(env):
    tag = next(_TAGS)
    r = requisition(env, tag)
    pr, inst = created(r, "PurchaseRequisition"), instance_of(r)
    before = documents(env)
    r = post(env, "buyer-bot", PO, order_body(tag, PurchaseRequisition=pr))
    body = assert_out_of_order(env, r, "purchase_order", ["quote"], ["quote"], ["requisition"])
    assert body["workflow"]["instance"] == inst == instance_of(r)
    assert "quote (erp.quote.create)" in body["detail"]
    assert documents(env) == before
    # recorded on the instance as a refusal, not an attempt
    got = instance(env, inst)
    assert got["tally"]["purchase_order"] == {"attempts": 0, "failures": 0, "completions": 0, "refusals": 1}
    # with the quote, the same order goes through, on the same instance
    qtn = created(quote(env, pr, tag), "SupplierQuotation")
    r = post(env, "buyer-bot", PO, order_body(tag, SupplierQuotation=qtn))
    created(r, "PurchaseOrder")
    assert instance_of(r) == inst


def test_procure_to_pay_across_agents_in_order(env):
    tag = next(_TAGS)
    r = requisition(env, tag)
    pr, inst = created(r, "PurchaseRequisition"), instance_of(r)
    r = quote(env, pr, tag)
    qtn = created(r, "SupplierQuotation")
    assert instance_of(r) == inst
    r = post(env, "buyer-bot", PO, order_body(tag, SupplierQuotation=qtn))
    po = created(r, "PurchaseOrder")
    assert instance_of(r) == inst
    # the goods arrive before the release: refused by Proctor (409), not by the ERP (400)
    before = documents(env)
    r = post(env, "buyer-bot", GR, gr_body(po))
    assert_out_of_order(env, r, "goods_receipt", ["release"], ["release"], ["requisition", "quote", "purchase_order"])
    assert instance_of(r) == inst
    # an invoice before the goods receipt, too
    r = post(env, "payables-bot", INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "4600.00"})
    assert_out_of_order(env, r, "invoice", ["goods_receipt"], ["release"], ["requisition", "quote", "purchase_order"])
    assert documents(env) == before
    r = post(env, "approver-bot", f"{PO}('{po}')/Release")
    assert r.status_code == 200, r.text
    assert instance_of(r) == inst
    created(post(env, "buyer-bot", GR, gr_body(po)), "MaterialDocument")
    # 10 % over the order: the ERP's three-way match fails (422, passed through); the step failed
    r = post(env, "payables-bot", INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "5060.00",
                                        "SupplierInvoiceIDByInvcgParty": f"INV-{tag}"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "M8/087", r.text
    assert instance_of(r) == inst
    got = instance(env, inst)
    assert got["state"] == "running" and "invoice" not in got["completed"] and got["next"] == ["invoice"]
    assert got["tally"]["invoice"]["failures"] == 1
    # the invoice step's on_error: escalated to the accounts-payable supervisors, and the agent
    # is told so (no Retry-After: retrying the same invoice would fail the same way)
    assert r.headers["Proctor-Workflow-Retry"] == 'attempt=1; escalated="accounts-payable-supervisors"', r.headers
    assert "Retry-After" not in r.headers
    items = [i for i in inbox(env, env.supervisor) if i["instance"] == inst]
    assert [(i["step"], i["group"], i["reason"], i["state"], i["agent"], i["failures"]) for i in items] == [
        ("invoice", "accounts-payable-supervisors", "failures", "open", "payables-bot", 1)], items
    assert not [i for i in inbox(env, env.person) if i["instance"] == inst]  # another group's people: not theirs
    # the payment needs an invoice the ERP accepted: a failed invoice left none
    inv = created(post(env, "payables-bot", INV, {"PurchaseOrder": po, "InvoiceGrossAmount": "4600.00",
                                                  "SupplierInvoiceIDByInvcgParty": f"INV-{tag}-C"}),
                  "SupplierInvoice")
    # the agent completed the step: the item is resolved, the inbox empty again
    assert not [i for i in inbox(env, env.supervisor) if i["instance"] == inst]
    r = post(env, "payables-bot", f"{INV}('{inv}')/Pay")
    assert r.status_code == 201, r.text
    assert instance_of(r) == inst
    got = instance(env, inst)
    assert got["state"] == "completed" and got["completed"] == STEPS, got
    assert got["tally"]["goods_receipt"]["refusals"] == 1 and got["tally"]["invoice"] == {
        "attempts": 2, "failures": 1, "completions": 1, "refusals": 1}
    assert [(e["step"], e["outcome"], e["agent"]) for e in got["events"]] == [
        ("requisition", "completed", "buyer-bot"), ("quote", "completed", "buyer-bot"),
        ("purchase_order", "completed", "buyer-bot"), ("goods_receipt", "refused", "buyer-bot"),
        ("invoice", "refused", "payables-bot"), ("release", "completed", "approver-bot"),
        ("goods_receipt", "completed", "buyer-bot"), ("invoice", "failed", "payables-bot"),
        ("invoice", "completed", "payables-bot"), ("payment", "completed", "payables-bot")]
    objects = {(o["type"], o["id"]) for o in got["objects"]}
    assert {("PurchaseRequisition", pr), ("SupplierQuotation", qtn), ("PurchaseOrder", po),
            ("SupplierInvoice", inv)} <= objects
    assert got["cost"] == "2.05" and got["currency"] == "EUR"  # per workflows/procure-to-pay.yaml


def test_a_release_that_does_not_release_does_not_complete_the_step(env):
    """release completes only when the ERP answers the order RELEASED; a second release is the
    ERP's 409 (already released), a failed call on a step already done."""
    tag = next(_TAGS)
    pr = created(requisition(env, tag), "PurchaseRequisition")
    qtn = created(quote(env, pr, tag), "SupplierQuotation")
    r = post(env, "buyer-bot", PO, order_body(tag, SupplierQuotation=qtn))
    po, inst = created(r, "PurchaseOrder"), instance_of(r)
    assert post(env, "approver-bot", f"{PO}('{po}')/Release").status_code == 200
    r = post(env, "approver-bot", f"{PO}('{po}')/Release")
    assert r.status_code == 409 and r.json()["error"]["code"] == "ME/179", r.text
    tally = instance(env, inst)["tally"]["release"]
    assert (tally["completions"], tally["failures"]) == (1, 1)


def test_an_order_made_outside_proctor_cannot_be_released_through_it(env):
    """The mock's order 4500000001 was raised by a person in the ERP: no instance has it, so its
    release is a step whose prerequisites are not known to be done (409, not forwarded)."""
    releases = dict(env.mocks.apps["erp"][mock_erp.RELEASES])
    r = post(env, "approver-bot", f"{PO}('4500000001')/Release")
    assert_out_of_order(env, r, "release", ["purchase_order"], ["requisition"], [])
    assert dict(env.mocks.apps["erp"][mock_erp.RELEASES]) == releases
