"""Workflow exceptions end to end (docs/workflows.md, "Exceptions"): real Proctor processes,
a real recording upstream that fails on demand (X-Test-Status), webhooks to a real receiver,
people deciding through the control API.

The `orders` workflow of test_workflows.py, with exceptions:
- quote:   reroute to bob after 2 failures (retry up to 3, Retry-After 5);
- order:   retry up to 3 (Retry-After 7), escalate to the `buyers` group after 2 failures;
- receipt: sla_seconds 2, escalate to `receivers` (a stalled instance waits on it).
The stall sweep runs every 0.3 s.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import Proctor, wait_for
from test_workflows import ORDERS, Work, call, header, operator, start, work  # noqa: F401 (work: a fixture)

pytestmark = pytest.mark.integration

BUYERS, RECEIVERS = "buyers", "receivers"
HOOK_EVENTS = ["workflow-escalated", "workflow-rerouted", "workflow-decided"]


def exceptions_workflow() -> dict:
    wf = copy.deepcopy(ORDERS)
    steps = {s["name"]: s for s in wf["steps"]}
    steps["quote"]["on_error"] = {"reroute": {"to": "bob", "after_failures": 2},
                                  "retry": {"max_attempts": 3, "after_seconds": 5}}
    steps["order"]["on_error"] = {"retry": {"max_attempts": 3, "after_seconds": 7},
                                  "escalate": {"group": BUYERS, "after_failures": 2}}
    steps["receipt"]["sla_seconds"] = 2
    steps["receipt"]["on_error"] = {"escalate": {"group": RECEIVERS, "after_failures": 1}}
    return wf


def hooks_config(upstream) -> dict:
    return {"webhooks": [{"url": f"http://127.0.0.1:{upstream.port}/wf-hooks", "events": HOOK_EVENTS,
                          "max_attempts": 1}]}


@pytest.fixture(scope="module")
def xp(tmp_path_factory, idp, pki, upstream, upstream_tls, work) -> Iterator[Proctor]:  # noqa: F811
    p = start(tmp_path_factory.mktemp("wfx"), idp, pki, upstream, upstream_tls, work, [exceptions_workflow()],
              {"workflows": {"sweep_interval_seconds": 0.3}, "approvals": hooks_config(upstream)})
    yield p
    p.stop()


# ---------------------------------------------------------------------------- helpers
def person(idp, who: str, *groups: str) -> str:
    return idp.token(who, aud="proctor-approvers", approval_groups=list(groups), ttl=600)


def control(p: Proctor, method: str, path: str, token: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, f"{p.control_url}{path}", headers={"Authorization": f"Bearer {token}"},
                         json=body, timeout=10)


def inbox(p: Proctor, token: str) -> list[dict]:
    r = control(p, "GET", "/v1/workflows/inbox", token)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def items_of(p: Proctor, token: str, inst: str) -> list[dict]:
    return [i for i in inbox(p, token) if i["instance"] == inst]


def instance(p: Proctor, idp, inst: str) -> dict:
    r = control(p, "GET", f"/v1/workflows/instances/{inst}", operator(idp))
    assert r.status_code == 200, r.text
    return r.json()


def wf_events(p: Proctor, inst: str) -> list[dict]:
    return [r for r in p.decisions() if r.get("type") == "workflow" and r["instance"] == inst]


def audit_ops(p: Proctor, inst: str) -> list[str]:
    path = p.dir / "state" / "audit.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return [e["api"]["operation"] for e in lines if e.get("unmapped", {}).get("proctor", {}).get("record") == "workflow"
            and e["unmapped"]["proctor"].get("instance") == inst]


def hooks(upstream, inst: str) -> list[tuple[str, dict]]:
    return [(dict(e["headers"]).get("X-Proctor-Event", ""), json.loads(e["body"])) for e in upstream.received()
            if e["path"] == "/wf-hooks" and inst in e["body"]]


def upstream_calls(work: Work, path: str) -> int:  # noqa: F811
    return sum(1 for line in work.log.read_text().splitlines() if json.loads(line)["path"] == path)


def retry_header(r: httpx.Response) -> str:
    return r.headers.get("Proctor-Workflow-Retry", "")


def to_quote(p: Proctor, work: Work, idp, agent: str = "alice") -> tuple[str, str]:  # noqa: F811
    """request -> quote: the instance and the quote number."""
    r = call(p, work, idp, agent, "/requests")
    assert r.status_code == 201, r.text
    q = call(p, work, idp, agent, f"/requests/{r.json()['n']}/quotes")
    assert q.status_code == 201, q.text
    return header(r)["instance"], q.headers["Location"].rsplit("/", 1)[1]


# ---------------------------------------------------------------------------- tests
def test_retry_after_attempts_counted_then_gives_up_and_a_person_allows_retries(xp, work, idp, upstream) -> None:  # noqa: F811
    inst, quote_no = to_quote(xp, work, idp)
    path = f"/quotes/{quote_no}/orders"
    first = call(xp, work, idp, "alice", path, status=500)
    # the upstream's own answer, with when to retry and how many attempts are left
    assert first.status_code == 500 and first.json()["path"] == path
    assert first.headers["Retry-After"] == "7"
    assert retry_header(first) == "attempt=1; max=3"
    assert header(first) == {"name": "orders", "instance": inst, "step": "order"}
    second = call(xp, work, idp, "alice", path, status=503)
    assert second.headers["Retry-After"] == "7"
    assert retry_header(second) == f'attempt=2; max=3; escalated="{BUYERS}"'
    # escalated after 2 failures: the buyers see it in their inbox, with the instance's history
    buyer = person(idp, "bea", BUYERS)
    (item,) = items_of(xp, buyer, inst)
    assert (item["step"], item["group"], item["reason"], item["state"], item["failures"]) == (
        "order", BUYERS, "failures", "open", 2)
    assert [(h["step"], h["outcome"], h["status"]) for h in item["history"]] == [
        ("request", "completed", 201), ("quote", "completed", 201), ("order", "failed", 500),
        ("order", "failed", 503)]
    assert item["agent"] == "alice" and item["decision_id"] == second.headers["X-Proctor-Decision-Id"]
    # another group's people do not see it (operators do)
    assert items_of(xp, person(idp, "rita", RECEIVERS), inst) == []
    assert [i["id"] for i in items_of(xp, operator(idp), inst)] == [item["id"]]
    third = call(xp, work, idp, "alice", path, status=500)
    assert third.status_code == 500 and "Retry-After" not in third.headers
    assert retry_header(third) == f'attempt=3; max=3; gave-up; escalated="{BUYERS}"'
    # given up: the next call is refused 409 without reaching the upstream, saying whose inbox has it
    before = upstream_calls(work, path)
    refused = call(xp, work, idp, "alice", path)
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["type"].endswith("/step-gave-up") and body["reasons"] == ["workflow-step-gave-up"]
    assert body["workflow"]["escalation"]["id"] == item["id"] and body["workflow"]["escalation"]["group"] == BUYERS
    assert (body["workflow"]["failures"], body["workflow"]["max_attempts"]) == (3, 3)
    assert f"the inbox of {BUYERS}" in body["detail"] and "Do not retry" in body["detail"]
    assert call(xp, work, idp, "bob", path).status_code == 409  # for every agent
    assert upstream_calls(work, path) == before
    ctx = xp.decision(refused.headers["X-Proctor-Decision-Id"])["cedar"]["context"]["workflow"]
    assert ctx["gave_up"] is True and ctx["escalated"] is True and ctx["failures"] == 3
    # recorded: escalated (failures), gave up, the item now says gave-up; OCSF events too
    events = [(e["event"], e.get("reason"), e.get("failures")) for e in wf_events(xp, inst)]
    assert events == [("escalated", "failures", 2), ("gave-up", None, 3), ("escalated", "gave-up", 3)], events
    wait_for(lambda: "proctor.workflow.gave-up" in audit_ops(xp, inst), timeout=10, what="the OCSF event")
    # the webhook heard both escalations, with its own event name
    wait_for(lambda: len(hooks(upstream, inst)) >= 2, timeout=10, what="the escalation webhooks")
    heard = hooks(upstream, inst)
    assert [(name, b["workflow"]["reason"]) for name, b in heard] == [
        ("proctor.workflow.escalated", "failures"), ("proctor.workflow.escalated", "gave-up")]
    assert heard[0][1]["type"] == "proctor.workflow.escalated" and heard[0][1]["workflow"]["group"] == BUYERS
    # someone outside the group cannot decide (the item looks absent)
    url = f"/v1/workflows/instances/{inst}/escalations/{item['id']}"
    assert control(xp, "POST", url, person(idp, "rita", RECEIVERS), {"resolution": "retry"}).status_code == 404
    # a buyer allows retries: a fresh budget, the step passes, and it counts as not autonomous
    ok = control(xp, "POST", url, buyer, {"resolution": "retry", "note": "supplier fixed the catalogue"})
    assert ok.status_code == 200, ok.text
    assert control(xp, "POST", url, buyer, {"resolution": "retry"}).status_code == 409  # decided already
    assert items_of(xp, buyer, inst) == []
    again = call(xp, work, idp, "alice", path, status=500)
    assert retry_header(again) == "attempt=1; max=3" and again.headers["Retry-After"] == "7"
    done = call(xp, work, idp, "alice", path)
    assert done.status_code == 201, done.text
    got = instance(xp, idp, inst)
    assert "order" in got["completed"]
    last = got["events"][-1]
    assert (last["step"], last["outcome"], last["human"]) == ("order", "completed", True)
    decided = [e for e in wf_events(xp, inst) if e["event"] == "decided"]
    assert [(e["by"], e["resolution"], e["note"]) for e in decided] == [
        ("bea", "retry", "supplier fixed the catalogue")]
    wait_for(lambda: any(n == "proctor.workflow.decided" for n, _ in hooks(upstream, inst)), timeout=10,
             what="the decision webhook")


def test_reroute_moves_the_step_to_another_agent(xp, work, idp, upstream) -> None:  # noqa: F811
    r = call(xp, work, idp, "alice", "/requests")
    inst, req_no = header(r)["instance"], r.json()["n"]
    path = f"/requests/{req_no}/quotes"
    one = call(xp, work, idp, "alice", path, status=500)
    assert retry_header(one) == "attempt=1; max=3" and one.headers["Retry-After"] == "5"
    two = call(xp, work, idp, "alice", path, status=502)
    # the second failure moves the step to bob: alice is told not to retry, and who has it
    assert two.status_code == 502 and "Retry-After" not in two.headers
    assert retry_header(two) == 'attempt=2; max=3; rerouted-to="bob"'
    for agent in ("alice", "carol"):
        refused = call(xp, work, idp, agent, path)
        assert refused.status_code == 409, refused.text
        body = refused.json()
        assert body["type"].endswith("/step-rerouted") and body["reasons"] == ["workflow-step-rerouted"]
        assert body["workflow"]["rerouted_to"] == "bob" and body["workflow"]["rerouted_from"] == "alice"
        assert "only bob may do it" in body["detail"]
    ctx = xp.decision(refused.headers["X-Proctor-Decision-Id"])["cedar"]["context"]["workflow"]
    assert (ctx["rerouted_to"], ctx["rerouted_away"]) == ("bob", True)
    # bob's calls pass, with a fresh retry budget of his own
    bob_fail = call(xp, work, idp, "bob", path, status=500)
    assert retry_header(bob_fail) == "attempt=1; max=3" and bob_fail.headers["Retry-After"] == "5"
    ok = call(xp, work, idp, "bob", path)
    assert ok.status_code == 201 and header(ok)["instance"] == inst
    ctx = xp.decision(ok.headers["X-Proctor-Decision-Id"])["cedar"]["context"]["workflow"]
    assert (ctx["rerouted_to"], ctx["rerouted_away"]) == ("bob", False)
    events = [(e["event"], e.get("agent"), e.get("to"), e.get("failures")) for e in wf_events(xp, inst)]
    assert events == [("rerouted", "alice", "bob", 2)], events
    wait_for(lambda: any(n == "proctor.workflow.rerouted" for n, _ in hooks(upstream, inst)), timeout=10,
             what="the reroute webhook")
    (_, hook), = [h for h in hooks(upstream, inst) if h[0] == "proctor.workflow.rerouted"]
    assert hook["workflow"]["to"] == "bob" and hook["workflow"]["agent"] == "alice"
    metrics = httpx.get(f"{xp.control_url}/metrics", timeout=5).text
    assert 'proctor_workflow_exceptions_total{event="rerouted",step="quote",workflow="orders"}' in metrics
    # the activity view shows it, filtered by record kind
    def rerouted_rows() -> list[dict]:
        r = control(xp, "GET", "/v1/activity?record=workflow&limit=500", operator(idp))
        assert r.status_code == 200, r.text
        return [e for e in r.json()["events"] if e["operation"] == "proctor.workflow.rerouted"
                and inst in (e.get("message") or "")]
    wait_for(rerouted_rows, timeout=10, what="the activity row")
    assert "rerouted from alice to bob after 2 failure(s)" in rerouted_rows()[0]["message"]


def give_up_order(p: Proctor, work: Work, idp) -> tuple[str, str, dict]:  # noqa: F811
    inst, quote_no = to_quote(p, work, idp)
    path = f"/quotes/{quote_no}/orders"
    for _ in range(3):
        assert call(p, work, idp, "alice", path, status=500).status_code == 500
    (item,) = items_of(p, operator(idp), inst)
    assert item["reason"] == "gave-up"
    return inst, path, item


def test_a_person_takes_over_and_completes_the_step(xp, work, idp) -> None:  # noqa: F811
    inst, path, item = give_up_order(xp, work, idp)
    buyer = person(idp, "bea", BUYERS)
    url = item["decide_url"]
    # bad decisions are refused, saying why
    assert control(xp, "POST", url, buyer, {"resolution": "maybe"}).status_code == 400
    bad = control(xp, "POST", url, buyer, {"resolution": "complete", "objects": [{"type": "Nope", "id": "1"}]})
    assert bad.status_code == 400 and "Nope" in bad.json()["detail"], bad.text
    taken = control(xp, "POST", url, buyer, {"resolution": "take-over"})
    assert taken.status_code == 200, taken.text
    (row,) = items_of(xp, buyer, inst)
    assert (row["state"], row["taken_by"]) == ("taken", "bea")
    assert control(xp, "POST", url, person(idp, "bob-the-buyer", BUYERS),
                   {"resolution": "take-over"}).status_code == 409  # taken by bea
    # agents are refused while a person has the step: the 409 names the person
    refused = call(xp, work, idp, "alice", path)
    assert refused.status_code == 409 and refused.json()["type"].endswith("/step-rerouted")
    assert "a person (bea) has taken this step over" in refused.json()["detail"]
    # bea placed the order herself: the workflow moves on and finds the instance by her order number
    order_no = f"PO-{uuid.uuid4().hex[:8]}"
    done = control(xp, "POST", url, buyer, {"resolution": "complete", "objects": [{"type": "Order", "id": order_no}]})
    assert done.status_code == 200, done.text
    assert done.json()["completed"] == ["request", "quote", "order"]
    receipt = call(xp, work, idp, "carol", f"/orders/{order_no}/receipts")
    assert receipt.status_code == 201 and header(receipt)["instance"] == inst, receipt.text
    got = instance(xp, idp, inst)
    by_step = {e["step"]: e for e in got["events"] if e["outcome"] == "completed"}
    assert (by_step["order"]["agent"], by_step["order"]["human"]) == ("human:bea", True)
    assert got["state"] == "completed"
    decided = [(e["resolution"], e["by"]) for e in wf_events(xp, inst) if e["event"] == "decided"]
    assert decided == [("take-over", "bea"), ("complete", "bea")]


def test_a_person_closes_the_instance_as_failed(xp, work, idp) -> None:  # noqa: F811
    inst, path, item = give_up_order(xp, work, idp)
    closed = control(xp, "POST", item["decide_url"], operator(idp), {"resolution": "close", "note": "duplicate order"})
    assert closed.status_code == 200 and closed.json()["closed"] is True, closed.text
    assert items_of(xp, operator(idp), inst) == []
    refused = call(xp, work, idp, "alice", path)
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["type"].endswith("/instance-closed") and "workflow-instance-closed" in body["reasons"]
    assert "closed as failed by olga (duplicate order)" in body["detail"]
    assert body["workflow"]["closed"]["by"] == "olga"


def test_a_stalled_instance_is_escalated_once_and_resolved_by_progress(xp, work, idp, upstream) -> None:  # noqa: F811
    r = call(xp, work, idp, "alice", "/requests")
    inst = header(r)["instance"]
    q = call(xp, work, idp, "alice", f"/requests/{r.json()['n']}/quotes")
    o = call(xp, work, idp, "alice", f"/quotes/{q.headers['Location'].rsplit('/', 1)[1]}/orders")
    assert o.status_code == 201
    # waiting on the receipt (sla_seconds 2): the sweep escalates it to the receivers
    receiver = person(idp, "rita", RECEIVERS)
    wait_for(lambda: items_of(xp, receiver, inst), timeout=15, what="the stalled instance's inbox item")
    (item,) = items_of(xp, receiver, inst)
    assert (item["reason"], item["step"], item["group"]) == ("stalled", "receipt", RECEIVERS)
    time.sleep(1.0)  # several sweeps later: still one stall, one item
    stalled = [e for e in wf_events(xp, inst) if e["event"] == "stalled"]
    assert len(stalled) == 1 and stalled[0]["idle_seconds"] > 2 and stalled[0]["step"] == "receipt"
    assert len(items_of(xp, receiver, inst)) == 1
    wait_for(lambda: any(b["workflow"].get("reason") == "stalled" for _, b in hooks(upstream, inst)), timeout=10,
             what="the stall webhook")
    # the receipt comes: the item resolves itself (recorded), the inbox is empty
    done = call(xp, work, idp, "alice", f"/orders/{o.json()['n']}/receipts")
    assert done.status_code == 201
    assert items_of(xp, receiver, inst) == []
    resolved = [e for e in wf_events(xp, inst) if e["event"] == "resolved"]
    assert [(e["escalation_id"], e["agent"]) for e in resolved] == [(item["id"], "alice")]


def test_inbox_needs_a_person(xp, idp) -> None:
    assert httpx.get(f"{xp.control_url}/v1/workflows/inbox", timeout=5).status_code == 401
    agent = idp.token("alice", groups=["writers"], ttl=600)  # an agent token is not a person's
    assert control(xp, "GET", "/v1/workflows/inbox", agent).status_code == 401
    url = "/v1/workflows/instances/wfi_nope/escalations/wfe_nope"
    assert control(xp, "POST", url, operator(idp), {"resolution": "retry"}).status_code == 404
    r = httpx.post(f"{xp.control_url}{url}", headers={"Authorization": f"Bearer {operator(idp)}",
                                                        "Origin": "http://evil.example"},
                   json={"resolution": "retry"}, timeout=5)
    assert r.status_code == 403


@pytest.mark.parametrize("engine", ["mitmproxy", "aiohttp"])
def test_retry_headers_through_the_gateway(engine, tmp_path, idp, pki, upstream, upstream_tls, work) -> None:  # noqa: F811
    gateway = {"engine": engine, "routes": [{"prefix": "/flow", "upstream": f"http://127.0.0.1:{work.port}"}]}
    p = start(tmp_path / engine, idp, pki, upstream, upstream_tls, work, [exceptions_workflow()],
              {"gateway": gateway})
    try:
        def gw(path: str, status: int | None = None) -> httpx.Response:
            h = {"Authorization": f"Bearer {idp.token('alice', groups=['writers'], ttl=600)}"}
            if status is not None:
                h["X-Test-Status"] = str(status)
            return httpx.post(f"{p.gateway_url}/flow{path}", json={"m": 1}, headers=h, timeout=20)

        r = gw("/requests")
        assert r.status_code == 201, r.text
        q = gw(f"/requests/{r.json()['n']}/quotes")
        path = f"/quotes/{q.headers['Location'].rsplit('/', 1)[1]}/orders"
        failed = gw(path, 500)
        assert failed.status_code == 500 and failed.headers["Retry-After"] == "7"
        assert failed.headers["Proctor-Workflow-Retry"] == "attempt=1; max=3"
        assert failed.json()["path"] == path  # the upstream's answer, headers added
        # a large failed answer (held back whole, within the message limit) carries them too
        big = httpx.post(f"{p.gateway_url}/flow{path}", json={"m": 1}, timeout=20,
                         headers={"Authorization": f"Bearer {idp.token('alice', groups=['writers'], ttl=600)}",
                                  "X-Test-Status": "500", "X-Test-Size": str(300_000)})
        assert big.status_code == 500 and len(big.content) == 300_000
        assert big.headers["Proctor-Workflow-Retry"] == f'attempt=2; max=3; escalated="{BUYERS}"'
        ok = gw(path)
        assert ok.status_code == 201 and "Retry-After" not in ok.headers and "Proctor-Workflow-Retry" not in ok.headers
    finally:
        p.stop()


def test_definitions_with_inconsistent_exceptions_stop_startup(tmp_path) -> None:
    import subprocess
    import sys

    import yaml

    wf = exceptions_workflow()
    wf["steps"][2]["on_error"] = {"retry": {"max_attempts": 2}, "escalate": {"group": "bad group!"},
                                  "reroute": {"to": "human:alice", "after_failures": 5}}
    wf["steps"][3]["on_error"] = {}
    wdir = tmp_path / "workflows"
    wdir.mkdir()
    (wdir / "orders.yaml").write_text(yaml.safe_dump(wf))
    cfg: Path = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({"workflows_dir": str(wdir), "state_dir": str(tmp_path / "state")}))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(cfg)], capture_output=True, text=True,
                       timeout=60, cwd=str(tmp_path))
    assert r.returncode != 0
    err = r.stderr
    assert "steps.2.on_error.escalate.group" in err, err
    assert "human:" in err and "steps.2.on_error.reroute.to" in err, err
    assert "steps.3.on_error: Value error, on_error needs at least one of retry, escalate, reroute" in err, err
