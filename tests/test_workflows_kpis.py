"""Workflow outcome KPIs end to end: a real Proctor process, a real recording upstream, agents
writing through the forward proxy with plain HTTP clients, a manager approving held orders
(docs/workflows.md, "Outcomes (KPIs)").

The `orders` workflow of tests/test_workflows.py (request -> quote -> order -> receipt, SLA 1 h,
the order costing 0.50 per call and 2 per completion), with every order held for a manager:

- A (alice): every step once; the order held, then approved: the human wait;
- B (bob): the quote twice (rework), an order the upstream fails (500) and the good one, both
  held and approved, then the receipt;
- C (carol): the request only: running.

Then GET /v1/workflows/kpis, the Prometheus metrics and `proctor workflows list|show|kpis`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import yaml
from click.testing import CliRunner

from conftest import DATA, ROOT, Proctor, start_proctor, wait_for
from test_workflows import FLOW_CEDAR, ORDERS, Work, call, flow_connector, header, operator, work  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HOLD_CEDAR = FLOW_CEDAR + """
@id("flow-orders-need-a-manager")
@approval("managers")
forbid (principal, action == Action::"flow.order.create", resource)
unless { context has approval && context.approval.groups.contains("managers") };
"""
WAIT = 0.6  # how long the manager takes (at least): each order's human wait


@pytest.fixture(scope="module")
def kp(tmp_path_factory, idp, pki, upstream, upstream_tls, work) -> Iterator[Proctor]:  # noqa: F811
    base = tmp_path_factory.mktemp("wfk")
    pol = base / "policies-src"
    shutil.copytree(DATA / "policies", pol)
    (pol / "flow.cedar").write_text(HOLD_CEDAR)
    shutil.copy(ROOT / "policies" / "workflows.cedar", pol / "workflows.cedar")
    wdir = base / "workflows"
    wdir.mkdir()
    (wdir / "orders.yaml").write_text(yaml.safe_dump(ORDERS))
    p = start_proctor(base / "p", idp, pki, upstream, upstream_tls, {"workflows_dir": str(wdir)},
                      policies_src=pol, extra_connectors=[flow_connector(work.port)])
    yield p
    p.stop()


def manager(idp) -> str:
    return idp.token("mia", aud="proctor-approvers", approval_groups=["managers"], ttl=600)


def approved(p: Proctor, work: Work, idp, agent: str, path: str, status: int | None = None) -> httpx.Response:  # noqa: F811
    """A call held for a manager (the agent's connection waits), approved after WAIT seconds."""
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call, p, work, idp, agent, path, status)
        pending: list[str] = []

        def held() -> bool:
            r = httpx.get(f"{p.control_url}/v1/approvals", params={"state": "pending", "agent": agent},
                          headers={"Authorization": f"Bearer {manager(idp)}"}, timeout=10)
            pending[:] = [a["id"] for a in r.json()["approvals"]]
            return bool(pending)

        wait_for(held, timeout=15, what=f"{agent}'s order to be held")
        time.sleep(WAIT)
        vote = httpx.post(f"{p.control_url}/v1/approvals/{pending[0]}/approve", json={"reason": "within budget"},
                          headers={"Authorization": f"Bearer {manager(idp)}"}, timeout=10)
        assert vote.status_code == 200, vote.text
        return answer.result(30)


@dataclass
class Driven:
    a: str
    b: str
    c: str
    started: float
    ended: float


def control(p: Proctor, idp, path: str, params: dict | None = None, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or operator(idp)}"} if token != "" else {}
    return httpx.get(f"{p.control_url}{path}", params=params, headers=headers, timeout=20)


@pytest.fixture(scope="module")
def driven(kp, work, idp) -> Driven:  # noqa: F811
    started = time.time()
    # A: in order, the order held and approved
    r = call(kp, work, idp, "alice", "/requests")
    a = header(r)["instance"]
    q = call(kp, work, idp, "alice", f"/requests/{r.json()['n']}/quotes")
    o = approved(kp, work, idp, "alice", f"/quotes/{q.headers['Location'].rsplit('/', 1)[1]}/orders")
    assert o.status_code == 201 and header(o)["instance"] == a, o.text
    assert call(kp, work, idp, "alice", f"/orders/{o.json()['n']}/receipts").status_code == 201
    # B: the quote twice, a failed order, the good one, the receipt
    r = call(kp, work, idp, "bob", "/requests")
    b = header(r)["instance"]
    q = call(kp, work, idp, "bob", f"/requests/{r.json()['n']}/quotes")
    again = call(kp, work, idp, "bob", f"/requests/{r.json()['n']}/quotes")
    assert again.status_code == 201 and header(again)["instance"] == b
    quote_no = q.headers["Location"].rsplit("/", 1)[1]
    assert approved(kp, work, idp, "bob", f"/quotes/{quote_no}/orders", status=500).status_code == 500
    o = approved(kp, work, idp, "bob", f"/quotes/{quote_no}/orders")
    assert o.status_code == 201, o.text
    assert call(kp, work, idp, "bob", f"/orders/{o.json()['n']}/receipts").status_code == 201
    # C: started only
    r = call(kp, work, idp, "carol", "/requests")
    c = header(r)["instance"]
    wait_for(lambda: all(control(kp, idp, f"/v1/workflows/instances/{i}").json()["state"] == "completed"
                         for i in (a, b)), timeout=10, what="A and B completed")
    return Driven(a, b, c, started, time.time())


def kpis_of(p: Proctor, idp, **params) -> dict:
    r = control(p, idp, "/v1/workflows/kpis", {"workflow": "orders", **params})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_kpis_of_what_the_agents_did(kp, idp, driven) -> None:
    doc = kpis_of(kp, idp)
    assert doc["bucket_seconds"] == 3600 and doc["truncated"] is False
    [w] = doc["workflows"]
    assert (w["name"], w["currency"], w["sla_seconds"]) == ("orders", "EUR", 3600)
    assert w["instances"] == {"started": 3, "completed": 2, "running": 1, "closed": 0}
    cyc = w["cycle_time_seconds"]
    assert cyc["count"] == 2 and 0 < cyc["p50"] <= cyc["p90"] <= driven.ended - driven.started
    # A waited once for the manager, B twice: the human wait; the rest is the agents'
    assert cyc["human_wait_p50"] >= WAIT and cyc["agent_time_p50"] >= 0
    assert 0 < cyc["human_wait_share"] <= 1
    assert sum(b["count"] for b in w["cycle_time_histogram"]) == 2 and w["cycle_time_histogram"][0]["le"] == 60
    assert w["throughput"]["completed"] == 2 and sum(p["completed"] for p in w["throughput"]["series"]) == 2
    assert sum(p["started"] for p in w["throughput"]["series"]) == 3
    # 10 completed calls, 1 failed (B's first order)
    assert w["error_rate"] == round(1 / 11, 4)
    # pairs completed: A 4, B 4, C 1; B's quote twice
    assert w["rework_rate"] == round(1 / 9, 4)
    assert (w["sla"]["met"], w["sla"]["missed"], w["sla"]["adherence"], w["sla"]["at_risk"]) == (2, 0, 1.0, 0)
    # orders: A 0.50 + 2, B 0.50 (failed) + 0.50 + 2
    assert w["cost"] == {"total": "5.50", "per_instance": "2.75"}
    # the two approved orders had a person in them: 8 of 10 completions without one
    assert w["autonomy_rate"] == 0.8
    steps = {s["name"]: s for s in w["steps"]}
    order = steps["order"]
    assert (order["attempts"], order["completions"], order["failures"]) == (3, 2, 1)
    assert order["error_rate"] == 0.3333 and order["autonomy_rate"] == 0.0
    assert order["duration_ms"]["p50"] > 0
    assert steps["quote"]["rework_rate"] == 0.5 and steps["quote"]["completions"] == 3
    assert steps["request"]["completions"] == 3 and steps["request"]["autonomy_rate"] == 1.0
    agents = {a["agent"]: a for a in w["agents"]}
    assert (agents["alice"]["completions"], agents["alice"]["failures"]) == (4, 0)
    assert (agents["bob"]["completions"], agents["bob"]["failures"], agents["bob"]["error_rate"]) == (5, 1, 0.1667)
    assert agents["carol"]["completions"] == 1


def test_a_window_before_anything_happened(kp, idp, driven) -> None:
    doc = kpis_of(kp, idp, since=str(int(driven.started) - 7200), until=str(int(driven.started) - 3600),
                  bucket_seconds="600")
    [w] = doc["workflows"]
    assert doc["bucket_seconds"] == 600 and len(w["throughput"]["series"]) == 6
    assert w["instances"] == {"started": 0, "completed": 0, "running": 0, "closed": 0}
    assert w["error_rate"] is None and w["cycle_time_seconds"]["p50"] is None and w["cost"]["per_instance"] is None


def test_queries_are_validated_naming_the_field(kp, idp) -> None:
    cases = [
        ({"since": "yesterday"}, "since", "Bad time"),
        ({"until": "2027-02-30T00:00:00Z"}, "until", "Bad time"),
        ({"since": "1800000000", "until": "1700000000"}, "since", "Bad time"),
        ({"since": "1000", "until": "1800000000"}, "since", "Bad time"),  # longer than 366 days
        ({"bucket_seconds": "hourly"}, "bucket_seconds", "Bad bucket"),
        ({"workflow": "nope"}, "workflow", "Bad filter"),
        ({"since": "x" * 300}, "since", "Since too long"),
    ]
    for params, field, title in cases:
        r = control(kp, idp, "/v1/workflows/kpis", params)
        assert r.status_code == 400, (params, r.text)
        body = r.json()
        assert r.headers["Content-Type"].startswith("application/problem+json")
        assert body["title"] == title and [e["field"] for e in body["errors"]] == [field], (params, body)
    # out-of-range buckets are clamped, not refused
    assert kpis_of(kp, idp, bucket_seconds="1")["bucket_seconds"] == 1210  # 7 days in at most 500 buckets
    # people only: no token 401, an agent's token 401 (wrong audience)
    assert control(kp, idp, "/v1/workflows/kpis", token="").status_code == 401
    agent = idp.token("alice", groups=["writers"], ttl=600)
    assert control(kp, idp, "/v1/workflows/kpis", token=agent).status_code == 401
    # an approver who is not an operator may read them
    assert control(kp, idp, "/v1/workflows/kpis", token=manager(idp)).status_code == 200


def test_metrics(kp, idp, driven) -> None:
    def text() -> str:
        return httpx.get(f"{kp.control_url}/metrics", timeout=5).text

    # refreshed from the store every few seconds
    wait_for(lambda: 'proctor_workflow_instances{state="running",workflow="orders"} 1.0' in text()
             and 'proctor_workflow_instances{state="completed",workflow="orders"} 2.0' in text(),
             timeout=15, what="the instances gauge")
    t = text()
    assert 'proctor_workflow_cycle_seconds_count{workflow="orders"} 2.0' in t
    assert 'proctor_workflow_cycle_seconds_bucket{le="60.0",workflow="orders"} 2.0' in t
    assert 'proctor_workflow_cost_total{workflow="orders"} 5.5' in t
    assert 'proctor_workflow_step_seconds_count{outcome="failed",step="order",workflow="orders"} 1.0' in t
    assert 'proctor_workflow_step_seconds_count{outcome="completed",step="quote",workflow="orders"} 3.0' in t
    # never an instance id or an agent in a label
    assert driven.a not in t and "wfi_" not in t and 'agent="' not in t and "alice" not in t


def cli(p: Proctor, *args: str):
    from proxy.workflows.cli import workflows

    runner = CliRunner(env={"PROCTOR_TOKEN": None, "PROCTOR_CONTROL_URL": None, "HTTP_PROXY": None,
                            "http_proxy": None})
    return runner.invoke(workflows, [*args, "--as", "olga", "--group", "proctor-admins", "-c", str(p.config_path)],
                         catch_exceptions=False)


def test_cli(kp, idp, driven) -> None:
    r = cli(kp, "kpis", "--workflow", "orders", "--since", "1h")
    assert r.exit_code == 0, r.output
    out = r.output
    for expected in ("orders", "started 3, completed 2, running 1", "9.1% of step calls failed; rework 11.1%",
                     "SLA 1h      met 2, missed 0 (100.0%); running at risk 0, overdue 0",
                     "5.50 EUR in the window; 2.75 EUR per completed instance",
                     "80.0% of step completions without a person"):
        assert expected in out, out
    order_row = next(line for line in out.splitlines() if line.strip().startswith("order "))
    assert order_row.split()[1:5] == ["3", "2", "1", "0"] and "33.3%" in order_row, order_row
    assert any(line.split()[:3] == ["bob", "5", "1"] for line in out.splitlines()), out
    # --json: the API's document
    r = cli(kp, "kpis", "--workflow", "orders", "--since", "1h", "--json")
    doc = json.loads(r.output)
    assert doc["workflows"][0]["instances"] == {"started": 3, "completed": 2, "running": 1, "closed": 0}
    # list: definitions and instances; show: one instance's history
    r = cli(kp, "list", "--workflow", "orders")
    assert r.exit_code == 0 and "request > quote > order > receipt" in r.output, r.output
    assert driven.a in r.output and driven.b in r.output and driven.c in r.output
    r = cli(kp, "list", "--state", "running", "--json")
    assert [i["id"] for i in json.loads(r.output)["instances"] if i["workflow"] == "orders"] == [driven.c]
    r = cli(kp, "show", driven.b)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "completed" in lines[0] and "request, quote, order, receipt" in r.output
    orders = [line.split() for line in lines if " order " in line and ("failed" in line or "completed" in line)]
    assert [(row[3], row[4], row[5]) for row in orders] == [("failed", "500", "bob"), ("completed", "201", "bob")]
    assert all("yes" in row for row in orders)  # a person approved each
    # errors: the API's 400 names the field; an unknown instance is 404
    r = cli(kp, "kpis", "--since", "yesterday")
    assert r.exit_code == 1 and "Bad time" in r.output and "since" in r.output, r.output
    r = cli(kp, "show", "wfi_nope")
    assert r.exit_code == 1 and "No such instance" in r.output, r.output
