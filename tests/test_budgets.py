"""Budgets through real proxies (docs/limits.md, "Budgets"): a purchase's amount reserved
against a monthly budget when decided and settled on the answer; exactly as many concurrent
calls as fit pass, on SQLite, on PostgreSQL shared by two proxy processes and on Redis shared
by two proxies; the 429 (problem+json, Retry-After to the window's end); released on upstream
failure; a hold budget held for a person and let through over the limit by a budget
extension; context.budget seen by Cedar; shadow budgets; fail closed and open."""

from __future__ import annotations

import asyncio
import json
import time
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import DATA, Proctor, start_proctor, wait_for
from test_limits_backends import REDIS_SKIP, REDIS_URL, SKIP_REDIS, _redis_cleanup
from test_store import PG_DSN, PG_SKIP, _pg_admin

pytestmark = pytest.mark.integration

BILLING_POLICIES = """
@id("buyers-charge")
permit (principal in AgentGroup::"buyers", action in [Action::"test.charge.create", Action::"test.charge.fail"],
        resource);

@id("no-charges-over-5000")
forbid (principal, action == Action::"test.charge.create", resource)
when { context has fields && context.fields has amount && context.fields.amount.greaterThan(decimal("5000.0")) };

@id("hold-large-when-budget-low")
@approval("finance")
forbid (principal, action == Action::"test.charge.create", resource)
when { context has budget && context.budget.name == "cedar-visible" && context.budget.used_percent >= 50 &&
       context.budget.estimated_cost.greaterThan(decimal("10.0")) }
unless { context has approval && context.approval.groups.contains("finance") };
"""


def billing_connector(port: int, *more_ports: int) -> dict:
    return {
        "name": "billing",
        "description": "charges",
        "hosts": [f"127.0.0.1:{p}" for p in (port, *more_ports)],
        "routes": [
            {"method": "POST", "path": "/charges/{account}", "action": "test.charge.create",
             "resource": {"type": "Charge", "id": "new"},
             "params": {"account": {"type": "string"}},
             "body": {"amount": {"path": "amount", "type": "decimal"}},
             "cost": {"field": "amount"}},
            {"method": "POST", "path": "/fail/__status/500", "action": "test.charge.fail",
             "resource": {"type": "Charge", "id": "new"}, "cost": {"static": "7.5"}},
        ],
    }


@pytest.fixture
def billing(tmp_path, idp, pki, upstream, upstream_tls):
    started: list[Proctor] = []
    policies = tmp_path / "policies-src"
    shutil.copytree(DATA / "policies", policies)
    (policies / "billing.cedar").write_text(BILLING_POLICIES)
    shutil.copy(Path(__file__).resolve().parents[1] / "policies" / "budgets.cedar", policies / "budgets.cedar")

    def make(*budgets: dict, name: str = "b", env: dict | None = None, more_ports: tuple[int, ...] = (),
             **overrides) -> Proctor:
        ov = {"budgets": list(budgets), **overrides}
        p = start_proctor(tmp_path / f"{name}{len(started)}", idp, pki, upstream, upstream_tls, ov,
                          policies_src=policies, extra_connectors=[billing_connector(upstream.port, *more_ports)],
                          env=env)
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def buyer(idp, agent: str = "buy-bot") -> str:
    return idp.token(agent, groups=["buyers"], ttl=600)


def charge(p: Proctor, token: str, amount: str, account: str = "acme", agent: str = "buy-bot") -> httpx.Response:
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=30) as c:
        return c.post(f"http://127.0.0.1:{UPSTREAM_PORT[0]}/charges/{account}",
                      json={"amount": json.loads(amount), "marker": uuid.uuid4().hex})


UPSTREAM_PORT: list[int] = [0]


@pytest.fixture(autouse=True)
def _port(upstream):
    UPSTREAM_PORT[0] = upstream.port


def monthly(name: str = "po-monthly", limit: str = "100", **kw) -> dict:
    return {"name": name, "match": {"connectors": ["billing"]}, "limit": limit, "currency": "EUR",
            "period": "month", "timezone": "Europe/Berlin", **kw}


def records(p: Proctor, ids: list[str]) -> list[dict]:
    wait_for(lambda: all(any(d.get("decision_id") == i and "type" not in d for d in p.decisions()) for i in ids),
             timeout=10, what="decision records")
    return [p.decision(i) for i in ids]


def concurrently(calls: list) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda c: c(), calls))


# ------------------------------------------------------------------ SQLite, one proxy
def test_reserved_at_decision_settled_on_answer_refused_when_it_no_longer_fits(billing, idp) -> None:
    p = billing(monthly(soft_threshold=0.5))
    token = buyer(idp)
    first = charge(p, token, "40")
    assert first.status_code == 200, first.text
    second = charge(p, token, "40.5")
    assert second.status_code == 200
    third = charge(p, token, "20")
    assert third.status_code == 429
    assert third.headers["Content-Type"] == "application/problem+json"
    body = third.json()
    assert body["type"].endswith("/budget-exhausted") and body["reasons"] == ["budget:po-monthly"]
    b = body["budget"]
    assert (b["name"], b["currency"], b["limit"], b["spent"], b["reserved"], b["estimated_cost"]) == (
        "po-monthly", "EUR", "100", "80.5", "0", "20")
    assert b["window"].startswith("month:") and b["window"].endswith("@Europe/Berlin")
    assert b["key"] == {"agent": "buy-bot"}
    retry = int(third.headers["Retry-After"])
    assert 0 < retry <= 31 * 86400 + 3600 and retry == b["retry_after"]
    assert "renews at" in body["detail"] and "80.5 EUR spent" in body["detail"]
    # a smaller call still fits exactly; another agent has its own ledger
    assert charge(p, token, "19.5").status_code == 200
    assert charge(p, token, "0.0001").status_code == 429
    assert charge(p, buyer(idp, "other-bot"), "99", agent="other-bot").status_code == 200
    recs = records(p, [r.headers["X-Proctor-Decision-Id"] for r in (first, second, third)])
    assert recs[0]["budget"]["outcome"] == "reserved" and recs[0]["budget"]["result"] == "settled"
    assert recs[0]["budget"]["actual"] == "40" and recs[0]["budget"]["estimate"] == "40"
    assert recs[1]["budget"]["spent"] == "40" and "buy-bot" not in recs[1]["budget"]["key"]
    assert recs[2]["status"] == 429 and recs[2]["refusal"]["kind"] == "budget-exhausted"
    assert recs[2]["budget"]["outcome"] == "exhausted"
    # Cedar saw context.budget on the allowed call (before this call: nothing spent)
    ctx = recs[0]["cedar"]["context"]["budget"] if "cedar" in recs[0] else None
    if ctx is not None:
        assert ctx["name"] == "po-monthly" and ctx["exceeded"] is False


def test_exactly_the_calls_that_fit_pass_under_concurrency(billing, idp, upstream) -> None:
    p = billing(monthly(limit="55"))
    token = buyer(idp)
    upstream.clear()
    answers = concurrently([lambda: charge(p, token, "10") for _ in range(20)])
    assert sorted(a.status_code for a in answers) == [200] * 5 + [429] * 15
    assert len([e for e in upstream.received() if e["path"] == "/charges/acme"]) == 5
    assert charge(p, token, "5").status_code == 200  # 50 settled + 5 = 55: exactly the limit
    assert charge(p, token, "0.01").status_code == 429


def test_released_when_the_upstream_fails_and_when_policy_refuses(billing, idp, upstream) -> None:
    p = billing(monthly(limit="10"))
    token = buyer(idp)
    with httpx.Client(proxy=p.proxy_url_with("buy-bot", token), timeout=30) as c:
        for _ in range(3):  # each reserves 7.5 of 10; the 500 releases it, so the next fits again
            r = c.post(f"http://127.0.0.1:{upstream.port}/fail/__status/500", json={})
            assert r.status_code == 500
    rec = records(p, [r.headers["X-Proctor-Decision-Id"]])[0]
    assert rec["budget"]["result"] == "released" and "actual" not in rec["budget"]
    # a policy deny after the check reserves nothing
    denied = charge(p, token, "6000")
    assert denied.status_code in (403, 429)
    assert charge(p, token, "10").status_code == 200


def test_hold_budget_asks_a_person_and_the_extension_lets_one_call_over(billing, idp) -> None:
    p = billing(monthly(limit="50", on_exceed="hold"), approvals={"mode": "async", "expire_after_seconds": 60})
    token = buyer(idp)
    assert charge(p, token, "45").status_code == 200
    held = charge(p, token, "30", account="big")
    assert held.status_code == 202, held.text
    body = held.json()
    assert body["reasons"] == ["budget-extension"] and body["approval_groups"] == {"budget-approvers": 1}
    approver = idp.token("fiona", aud="proctor-approvers", approval_groups=["budget-approvers"], ttl=600)
    r = httpx.post(f"{p.control_url}/v1/approvals/{body['approval_id']}/approve", json={"reason": "quarter end"},
                   headers={"Authorization": f"Bearer {approver}"}, timeout=10)
    assert r.status_code == 200, r.text
    with httpx.Client(proxy=p.proxy_url_with("buy-bot", token), timeout=30) as c:
        retry = c.post(f"http://127.0.0.1:{UPSTREAM_PORT[0]}/charges/big", content=held.request.content,
                       headers={"content-type": "application/json"})
    assert retry.status_code == 200, retry.text
    rec = records(p, [retry.headers["X-Proctor-Decision-Id"]])[0]
    assert rec["budget"]["outcome"] == "extended" and rec["budget"]["actual"] == "30"
    # spent 75 of 50 now: the next call is held again (an extension releases one call)
    assert charge(p, token, "1").status_code == 202
    # each is an event line (and an OCSF event): held twice, extended once
    wait_for(lambda: len([d for d in p.decisions() if d.get("type") == "budget"]) >= 3, what="budget events")
    events = [d for d in p.decisions() if d.get("type") == "budget"]
    assert [(e["event"], e["outcome"]) for e in events] == [("exhausted", "held"), ("exhausted", "extended"),
                                                            ("exhausted", "held")]
    assert events[0]["decision_id"] == held.headers["X-Proctor-Decision-Id"] and events[0]["spent"] == "45"


def test_soft_threshold_is_reported_once_when_crossed(billing, idp) -> None:
    p = billing(monthly(limit="100", soft_threshold="0.75"))
    token = buyer(idp)
    answers = [charge(p, token, amount) for amount in ("50", "20", "10", "10")]
    assert [a.status_code for a in answers] == [200] * 4
    wait_for(lambda: any(d.get("type") == "budget" for d in p.decisions()), what="the soft-threshold event")
    time.sleep(0.3)
    events = [d for d in p.decisions() if d.get("type") == "budget"]
    assert len(events) == 1 and events[0]["event"] == "soft_threshold"
    assert events[0]["decision_id"] == answers[2].headers["X-Proctor-Decision-Id"]  # 70 -> 80 crosses 75
    assert events[0]["threshold"] == "0.75" and events[0]["limit"] == "100"
    metrics = httpx.get(f"{p.control_url}/metrics", timeout=10).text
    assert 'proctor_budget_events_total{budget="po-monthly",kind="soft_threshold"} 1.0' in metrics


def test_context_budget_in_cedar_and_shadow_budgets(billing, idp) -> None:
    p = billing(monthly(name="cedar-visible", limit="100", on_exceed="hold"),
                monthly(name="shadow-tight", limit="1", shadow=True),
                approvals={"mode": "async", "expire_after_seconds": 60})
    token = buyer(idp)
    ok = charge(p, token, "60")
    assert ok.status_code == 200  # the shadow budget (1 EUR) would refuse: recorded, not enforced
    rec = records(p, [ok.headers["X-Proctor-Decision-Id"]])[0]
    outcomes = {rec["budget"]["name"]: rec["budget"]["outcome"]} | {
        o["name"]: o["outcome"] for o in rec["budget"].get("others", [])}
    assert outcomes == {"cedar-visible": "reserved", "shadow-tight": "shadow_exhausted"}
    # a plain Cedar policy over context.budget: over half used, a call over 10 is held before the budget is over
    assert charge(p, token, "10").status_code == 200
    held = charge(p, token, "20")
    assert held.status_code == 202 and held.json()["reasons"] == ["hold-large-when-budget-low"]


def test_fail_closed_and_open_when_the_ledger_is_unreachable(billing, idp) -> None:
    closed = billing(monthly(), counters={"backend": "redis", "redis_url": "redis://127.0.0.1:1/0",
                                          "timeout_seconds": 0.3})
    token = buyer(idp)
    r = charge(closed, token, "1")
    assert r.status_code == 503 and r.json()["budget"] == {"name": "po-monthly", "unavailable": True}
    # /healthz says the counters are down; the replica stays ready (every replica shares that Redis)
    h = closed.health()
    assert h["components"]["counters"]["status"] == "down" and h["components"]["counters"]["backend"] == "redis"
    assert h["components"]["counters"]["used_by"] == ["budgets"] and h["ready"] is True
    assert httpx.get(f"{closed.control_url}/readyz", timeout=10).status_code == 200
    opened = billing(monthly(on_unavailable="open"), counters={"backend": "redis", "redis_url": "redis://127.0.0.1:1/0",
                                                               "timeout_seconds": 0.3})
    assert charge(opened, token, "1").status_code == 200


def test_invalid_budget_declarations_are_config_errors(tmp_path, idp, pki, upstream, upstream_tls) -> None:
    bad = [
        ({"name": "x", "limit": 0.5}, "floats are not exact"),
        ({"name": "x", "limit": "10", "period": "fortnight"}, "calendar window"),
        ({"name": "x", "limit": "10", "timezone": "Mars/Olympus"}, "Mars/Olympus"),
        ({"name": "x", "limit": "10", "match": {"connectors": ["nope"]}}, "nope"),
        ({"name": "x", "limit": "10", "cost": {"field": "amount"}, "match": {"connectors": ["testsvc"]}}, "amount"),
        ({"name": "x", "limit": "10", "soft_threshold": 1.5}, "between 0 and 1"),
        ({"name": "x", "limit": "10", "cost": {"static": "1", "field": "amount"}}, "exactly one"),
    ]
    for i, (budget, text) in enumerate(bad):
        with pytest.raises(RuntimeError) as e:
            start_proctor(tmp_path / f"bad{i}", idp, pki, upstream, upstream_tls, {"budgets": [budget]},
                          extra_connectors=[billing_connector(upstream.port)])
        assert text in str(e.value), (budget, str(e.value)[-800:])


# ------------------------------------------------------------------ shared backends, two proxies
def _two_proxies_exactly(billing, idp, upstream, env: dict, **overrides) -> None:
    a = billing(monthly(name="shared", limit="45", key=[]), name="a", env=env, **overrides)
    b = billing(monthly(name="shared", limit="45", key=[]), name="b", env=env, **overrides)
    token = buyer(idp)
    upstream.clear()
    answers = concurrently([(lambda p=p: charge(p, token, "5")) for p in [a, b] * 10])
    assert sorted(r.status_code for r in answers) == [200] * 9 + [429] * 11
    assert len([e for e in upstream.received() if e["path"] == "/charges/acme"]) == 9
    assert charge(b, token, "0.01").status_code == 429 and charge(a, token, "0.01").status_code == 429
    if "counters" in overrides:
        assert a.health()["components"]["counters"] == {"status": "ok", "backend": "redis", "used_by": ["budgets"]}


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_two_proxies_sharing_postgresql_spend_one_budget_exactly(billing, idp, upstream) -> None:
    schema = "proctor_bg_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"
    try:
        _two_proxies_exactly(billing, idp, upstream, {"PROCTOR_TEST_BG_STORE": f"{PG_DSN}{sep}schema={schema}"},
                             store={"url_env": "PROCTOR_TEST_BG_STORE"})
    finally:
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.mark.skipif(SKIP_REDIS, reason=REDIS_SKIP)
def test_two_proxies_sharing_redis_spend_one_budget_exactly(billing, idp, upstream) -> None:
    prefix = f"proctor-bg-{uuid.uuid4().hex[:10]}:"
    try:
        _two_proxies_exactly(billing, idp, upstream, {"PROCTOR_TEST_BG_REDIS": REDIS_URL},
                             counters={"backend": "redis", "redis_url_env": "PROCTOR_TEST_BG_REDIS", "prefix": prefix})
    finally:
        asyncio.run(_redis_cleanup(prefix))


def test_an_agent_that_hangs_up_leaves_no_reservation_behind(billing, idp, tmp_path) -> None:
    """The upstream never answers; the agent gives up. The reservation is released (upstream
    timeout), not held until it lapses: the whole budget is usable again at once."""
    import socket
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = silent.accept()
            except OSError:
                return
            held.append(conn)  # read nothing, answer nothing

    threading.Thread(target=accept, daemon=True).start()
    port = silent.getsockname()[1]
    try:
        p = billing({"name": "stuck-budget", "match": {"connectors": ["billing"]}, "limit": "10", "period": "day"},
                    upstream={"read_timeout_seconds": 2}, more_ports=(port,))
        token = buyer(idp)
        with httpx.Client(proxy=p.proxy_url_with("buy-bot", token), timeout=0.5) as c:
            with pytest.raises(httpx.TimeoutException):
                c.post(f"http://127.0.0.1:{port}/charges/x", json={"amount": 10})
        operator = idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)

        def reserved() -> str | None:
            doc = httpx.get(f"{p.control_url}/v1/budgets/stuck-budget", headers={"Authorization": f"Bearer {operator}"},
                            timeout=10).json()
            ledgers = doc["budget"]["ledgers"]
            return ledgers[0]["reserved"] if ledgers else None

        wait_for(lambda: any(d.get("budget", {}).get("result") for d in p.decisions()), timeout=15,
                 what="the call's record")
        rec = [d for d in p.decisions() if d.get("budget", {}).get("name") == "stuck-budget"]
        assert len(rec) == 1 and rec[0]["budget"]["outcome"] == "reserved", rec
        assert rec[0]["budget"]["result"] == "released" and "actual" not in rec[0]["budget"], rec
        assert reserved() in (None, "0")
        assert charge(p, token, "10").status_code == 200  # the whole budget at once: nothing was kept
    finally:
        silent.close()
        for c in held:
            c.close()
