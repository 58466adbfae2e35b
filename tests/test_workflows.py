"""Workflows end to end: real Proctor processes, a real recording upstream (docs/workflows.md).

The `flow` connector (below) has four write routes; the `orders` workflow makes
them steps: request -> quote -> order -> receipt. The instance is found from the
business objects each call names (path parameters) and new objects are linked
from the answers (a JSON field, the Location header). The policy set is
tests/data/policies plus a permit for flow and the bundled
policies/workflows.cedar.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import DATA, ROOT, SUPPORT, Proctor, free_port, port_open, start_proctor, wait_for

pytestmark = pytest.mark.integration

FLOW_CEDAR = """
@id("flow-writers")
permit (principal in AgentGroup::"writers", action in [Action::"flow.request.create", Action::"flow.quote.create",
        Action::"flow.order.create", Action::"flow.receipt.create", Action::"flow.note.create"], resource);
"""


def flow_connector(port: int) -> dict:
    return {
        "name": "flow",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [
            {"method": "POST", "path": "/requests", "action": "flow.request.create",
             "resource": {"type": "Request", "id": "new"}},
            {"method": "POST", "path": "/requests/{req}/quotes", "action": "flow.quote.create",
             "resource": {"type": "Quote", "id": "new"}, "params": {"req": {"type": "string"}}},
            {"method": "POST", "path": "/quotes/{quote}/orders", "action": "flow.order.create",
             "resource": {"type": "Order", "id": "new"}, "params": {"quote": {"type": "string"}}},
            {"method": "POST", "path": "/orders/{order}/receipts", "action": "flow.receipt.create",
             "resource": {"type": "Receipt", "id": "new"}, "params": {"order": {"type": "string"}}},
            {"method": "POST", "path": "/notes", "action": "flow.note.create",
             "resource": {"type": "Note", "id": "new"}},
        ],
    }


ORDERS = {
    "name": "orders",
    "description": "request -> quote -> order -> receipt",
    "sla_seconds": 3600,
    "cost": {"currency": "EUR"},
    "steps": [
        {"name": "request", "actions": ["flow.request.create"],
         "objects": [{"type": "Request", "from": "response", "path": "n"}]},
        {"name": "quote", "actions": ["flow.quote.create"], "requires": ["request"],
         "objects": [{"type": "Request", "from": "param", "name": "req"},
                     {"type": "Quote", "from": "header", "name": "Location", "pattern": "^/work/(\\d+)$"}]},
        {"name": "order", "actions": ["flow.order.create"], "requires": ["quote"],
         "cost": {"per_call": "0.50", "per_completion": "2"},
         "objects": [{"type": "Quote", "from": "param", "name": "quote"},
                     {"type": "Order", "from": "response", "path": "n"}]},
        {"name": "receipt", "actions": ["flow.receipt.create"], "requires": ["order"],
         "complete_when": {"status": [201]},
         "objects": [{"type": "Order", "from": "param", "name": "order"}]},
    ],
}


@dataclass
class Work:
    port: int
    log: Path
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Work]:
    port = free_port()
    log = tmp_path_factory.mktemp("flow-up") / "received.jsonl"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "work_upstream.py"), "--port", str(port), "--log", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), what="work upstream")
    yield Work(port, log, proc)
    proc.terminate()
    proc.wait(5)


def setup_dirs(base: Path, workflows: list[dict]) -> tuple[Path, Path]:
    pol = base / "policies-src"
    shutil.copytree(DATA / "policies", pol)
    (pol / "flow.cedar").write_text(FLOW_CEDAR)
    shutil.copy(ROOT / "policies" / "workflows.cedar", pol / "workflows.cedar")
    wdir = base / "workflows"
    wdir.mkdir()
    for w in workflows:
        (wdir / f"{w['name']}.yaml").write_text(yaml.safe_dump(w))
    return pol, wdir


def start(base: Path, idp, pki, upstream, upstream_tls, work: Work, workflows: list[dict] | None = None,
          overrides: dict | None = None) -> Proctor:
    base.mkdir(parents=True, exist_ok=True)
    pol, wdir = setup_dirs(base, workflows or [ORDERS])
    return start_proctor(base / "p", idp, pki, upstream, upstream_tls,
                         {"workflows_dir": str(wdir), **(overrides or {})},
                         policies_src=pol, extra_connectors=[flow_connector(work.port)])


@pytest.fixture(scope="module")
def wp(tmp_path_factory, idp, pki, upstream, upstream_tls, work) -> Iterator[Proctor]:
    p = start(tmp_path_factory.mktemp("wf"), idp, pki, upstream, upstream_tls, work)
    yield p
    p.stop()


def call(p: Proctor, work: Work, idp, agent: str, path: str, status: int | None = None,
         headers: dict | None = None) -> httpx.Response:
    token = idp.token(agent, groups=["writers"], ttl=600)
    h = dict(headers or {})
    if status is not None:
        h["X-Test-Status"] = str(status)
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=20) as c:
        return c.post(f"http://127.0.0.1:{work.port}{path}", json={"m": uuid.uuid4().hex}, headers=h)


def operator(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)


def header(r: httpx.Response) -> dict[str, str]:
    name, *rest = r.headers["Proctor-Workflow"].split("; ")
    return {"name": name, **dict(kv.split("=", 1) for kv in rest)}


def run_to_order(wp: Proctor, work: Work, idp, agent: str = "alice") -> tuple[str, str, str]:
    """request -> quote -> order; the instance id, the order number and the quote number."""
    r = call(wp, work, idp, agent, "/requests")
    assert r.status_code == 201, r.text
    inst = header(r)["instance"]
    req_no = str(r.json()["n"])
    q = call(wp, work, idp, agent, f"/requests/{req_no}/quotes")
    assert q.status_code == 201 and header(q)["instance"] == inst, q.text
    quote_no = q.headers["Location"].rsplit("/", 1)[1]
    o = call(wp, work, idp, agent, f"/quotes/{quote_no}/orders")
    assert o.status_code == 201 and header(o) == {"name": "orders", "instance": inst, "step": "order"}, o.text
    return inst, str(o.json()["n"]), quote_no


# --------------------------------------------------------------------------- tests
def test_in_order_allowed_out_of_order_refused_409(wp, work, idp) -> None:
    # a quote for a request no instance knows: 409 naming what is missing and what to do
    r = call(wp, work, idp, "alice", "/requests/999999/quotes")
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["type"].endswith("/step-precondition") and body["reasons"] == ["workflow-step-out-of-order"]
    assert body["workflow"] == {"name": "orders", "instance": None, "step": "quote", "missing": ["request"],
                                "completed": [], "next": ["request"]}
    assert "requires request first" in body["detail"] and "request (flow.request.create)" in body["detail"]
    assert body["action"] == "flow.quote.create" and body["decision_id"]
    # the steps in order pass, each naming the same instance
    inst, order_no, _ = run_to_order(wp, work, idp)
    assert inst.startswith("wfi_")
    # skipping ahead on another instance is refused: an order for a quote nobody made
    skip = call(wp, work, idp, "alice", "/orders/424242/receipts")
    assert skip.status_code == 409 and skip.json()["workflow"]["missing"] == ["order"]
    # the receipt completes the instance
    done = call(wp, work, idp, "alice", f"/orders/{order_no}/receipts")
    assert done.status_code == 201 and header(done)["instance"] == inst
    # the decision record names the workflow; policy saw context.workflow
    rec = wp.decision(done.headers["X-Proctor-Decision-Id"])
    assert rec["workflow"] == {"name": "orders", "instance": inst, "step": "receipt"}
    ctx = rec["cedar"]["context"]["workflow"]
    assert ctx["ready"] is True and ctx["completed"] == ["request", "quote", "order"] and ctx["known"] is True
    refused = wp.decision(r.headers["X-Proctor-Decision-Id"])
    assert refused["status"] == 409 and refused["refusal"]["kind"] == "step-precondition"
    # the instance's history and state, from the store (read through the control API)
    wait_for(lambda: instance(wp, idp, inst)["state"] == "completed", timeout=10, what="completed instance")
    got = instance(wp, idp, inst)
    assert got["completed"] == ["request", "quote", "order", "receipt"]
    assert [e["step"] for e in got["events"]] == ["request", "quote", "order", "receipt"]
    assert got["cost"] == "2.50"


def instance(p: Proctor, idp, inst: str) -> dict:
    r = httpx.get(f"{p.control_url}/v1/workflows/instances/{inst}", headers={"Authorization": f"Bearer {operator(idp)}"},
                  timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def test_two_agents_share_one_instance(wp, work, idp) -> None:
    """Correlation is by business object, not by agent: bob picks up alice's request."""
    r = call(wp, work, idp, "alice", "/requests")
    inst = header(r)["instance"]
    q = call(wp, work, idp, "bob", f"/requests/{r.json()['n']}/quotes")
    assert q.status_code == 201 and header(q)["instance"] == inst
    events = instance(wp, idp, inst)["events"]
    assert [(e["step"], e["agent"]) for e in events] == [("request", "alice"), ("quote", "bob")]


def test_failed_step_counts_attempts_then_completes(wp, work, idp) -> None:
    r = call(wp, work, idp, "alice", "/requests")
    inst = header(r)["instance"]
    q = call(wp, work, idp, "alice", f"/requests/{r.json()['n']}/quotes")
    quote_no = q.headers["Location"].rsplit("/", 1)[1]
    failed = call(wp, work, idp, "alice", f"/quotes/{quote_no}/orders", status=500)
    assert failed.status_code == 500  # the upstream's answer, as it was
    ok = call(wp, work, idp, "alice", f"/quotes/{quote_no}/orders")
    assert ok.status_code == 201
    # the decision record of the retry saw one attempt and one failure before it
    ctx = wp.decision(ok.headers["X-Proctor-Decision-Id"])["cedar"]["context"]["workflow"]
    assert (ctx["attempts"], ctx["failures"]) == (1, 1)
    got = instance(wp, idp, inst)
    assert [(e["step"], e["outcome"], e["status"]) for e in got["events"]][-2:] == [
        ("order", "failed", 500), ("order", "completed", 201)]
    assert got["tally"]["order"] == {"attempts": 2, "failures": 1, "completions": 1, "refusals": 0}
    # a 200 is not a receipt's completion (complete_when: status 201): the step stays open
    order_no = str(ok.json()["n"])
    wrong = call(wp, work, idp, "alice", f"/orders/{order_no}/receipts", status=200)
    assert wrong.status_code == 200
    assert "receipt" not in instance(wp, idp, inst)["completed"]


def test_routes_outside_workflows_are_untouched(wp, work, idp) -> None:
    r = call(wp, work, idp, "alice", "/notes")
    assert r.status_code == 201 and "Proctor-Workflow" not in r.headers
    assert "workflow" not in wp.decision(r.headers["X-Proctor-Decision-Id"])


def test_metrics_by_workflow_step_outcome(wp, work, idp) -> None:
    call(wp, work, idp, "alice", "/requests/31337/quotes")
    text = httpx.get(f"{wp.control_url}/metrics", timeout=5).text
    assert 'proctor_workflow_steps_total{outcome="refused",step="quote",workflow="orders"}' in text
    assert 'proctor_workflow_steps_total{outcome="completed",step="request",workflow="orders"}' in text


def test_instances_survive_a_restart(tmp_path, idp, pki, upstream, upstream_tls, work) -> None:
    p = start(tmp_path / "a", idp, pki, upstream, upstream_tls, work)
    try:
        inst, order_no, _ = run_to_order(p, work, idp)
    finally:
        p.stop()
    # the same state directory, a new process: the order is still found, the receipt passes
    again = start_again(p)
    try:
        done = call(again, work, idp, "carol", f"/orders/{order_no}/receipts")
        assert done.status_code == 201 and header(done)["instance"] == inst
    finally:
        again.stop()


def start_again(p: Proctor) -> Proctor:
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path)],
                            stdout=open(p.log_path, "a"), stderr=subprocess.STDOUT, cwd=str(p.dir))
    again = Proctor(p.dir, p.config_path, p.port, p.control_port, p.gateway_port, proc, p.log_path, p.ca_pem,
                    p.policies_dir)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(p.log_path.read_text())
        try:
            return httpx.get(f"{again.control_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=30, what="restarted proctor")
    return again


def test_invalid_definitions_stop_startup_listing_every_problem(tmp_path) -> None:
    bad = {
        "name": "bad",
        "steps": [
            {"name": "a", "actions": ["flow.nope"], "requires": ["c"], "typo": 1},
            {"name": "b", "actions": [], "requires": ["c"]},
            {"name": "c", "actions": ["flow.x"], "requires": ["b"],
             "objects": [{"type": "X", "from": "param", "name": "x"}]},
        ],
    }
    wdir = tmp_path / "workflows"
    wdir.mkdir()
    (wdir / "bad.yaml").write_text(yaml.safe_dump(bad))
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"workflows_dir": str(wdir), "state_dir": str(tmp_path / "state")}))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60, cwd=str(tmp_path))
    assert r.returncode != 0
    assert "bad.yaml: steps.0.typo: Extra inputs are not permitted" in r.stderr, r.stderr
    bad["steps"][0].pop("typo")
    (wdir / "bad.yaml").write_text(yaml.safe_dump(bad))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60, cwd=str(tmp_path))
    err = r.stderr
    assert r.returncode != 0
    for problem in ("step a: unknown action flow.nope", "step b: no actions", "requires form a cycle: c -> b -> c",
                    "step a: requires earlier steps but names no object"):
        assert problem in err, err


@pytest.mark.parametrize("engine", ["mitmproxy", "aiohttp"])
def test_an_upstream_cannot_speak_for_proctor(tmp_path, idp, pki, upstream, upstream_tls, work, engine) -> None:
    """Proctor-Workflow, Proctor-Claim, Proctor-Workflow-Retry and X-Proctor-Original-Decision-Id
    come from Proctor only: an upstream's copies are dropped, Proctor's own value stays."""
    spoof = [("X-Test-Header", h) for h in ("Proctor-Workflow: orders; instance=wfi_forged; step=receipt",
                                            "Proctor-Claim: clm_forged; mode=exclusive; fence=1",
                                            "Proctor-Workflow-Retry: attempt=1; max=9",
                                            "X-Proctor-Original-Decision-Id: forged", "X-Kept: yes")]
    p = start(tmp_path, idp, pki, upstream, upstream_tls, work,
              overrides={"gateway": {"engine": engine, "routes": [
                  {"prefix": "/flow", "upstream": f"http://127.0.0.1:{work.port}"}]}})
    try:
        token = idp.token("alice", groups=["writers"], ttl=600)
        for via in ("forward", "gateway"):
            if via == "forward":
                if engine != "mitmproxy":
                    continue
                client = httpx.Client(proxy=p.proxy_url_with("alice", token), timeout=20)
                base = f"http://127.0.0.1:{work.port}"
            else:
                client = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=20)
                base = f"{p.gateway_url}/flow"
            with client:
                plain = client.post(f"{base}/notes", json={}, headers=spoof)
                assert plain.status_code == 201 and plain.headers["X-Kept"] == "yes", (via, plain.headers)
                for name in ("Proctor-Workflow", "Proctor-Claim", "Proctor-Workflow-Retry",
                             "X-Proctor-Original-Decision-Id"):
                    assert name not in plain.headers, (via, name)
                step = client.post(f"{base}/requests", json={}, headers=spoof)
                assert step.status_code == 201
                got = step.headers.get_list("Proctor-Workflow")
                assert len(got) == 1 and "wfi_forged" not in got[0] and got[0].startswith("orders; instance=wfi_")
    finally:
        p.stop()
