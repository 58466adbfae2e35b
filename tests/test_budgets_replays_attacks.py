"""Attacks on the free retry of a call over a budget (docs/limits.md, "Reserve, settle, release";
docs/coordination.md, "Idempotency-Key"): an agent that tries to pass a new call, or another
agent's, off as a retry the duplicate-work store answers, so that it is forwarded past its
budget, or forwarded without the person a hold budget asks. Real proctor processes, real
upstreams on loopback; each attack on a hold and a refuse budget.

What must hold: a call the store does not answer (another agent's key, another key spelling,
a key released because its first request failed upstream) is held or refused like any new
call over the budget; a key whose first request is still in progress is answered 409, not
forwarded; a key used for another URL is 422; nothing is forwarded uncharged."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from conftest import DATA, Proctor, start_proctor, wait_for
from test_budgets import BILLING_POLICIES, _port, billing, billing_connector, buyer, monthly  # noqa: F401
from test_budgets_attacks import spent_and_reserved
from test_budgets_replays import ASYNC_APPROVALS, forwarded, gw, pending, replayed
from test_store import PG_DSN, PG_SKIP, _pg_admin

pytestmark = pytest.mark.integration

OVER = {"hold": 202, "refuse": 429}


def over_budget(r: httpx.Response, on_exceed: str) -> None:
    """Treated as a new call over the budget: held for a person (202) or refused (429)."""
    assert r.status_code == OVER[on_exceed], (r.status_code, r.text)
    assert r.headers.get("Idempotent-Replayed") is None, dict(r.headers)


def via_proxy(p: Proctor, token: str, port: int, path: str, body: dict, key: str,
              agent: str = "buy-bot") -> httpx.Response:
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=30) as c:
        return c.post(f"http://127.0.0.1:{port}{path}", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json", "Idempotency-Key": key})


@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_another_agents_key_and_other_spellings_of_a_key_are_not_retries(billing, idp, upstream,
                                                                          on_exceed) -> None:
    # (one ledger for the group: both agents spend the same budget)
    p = billing(monthly(limit="50", on_exceed=on_exceed, key=["group"]), approvals=ASYNC_APPROVALS)
    token, other = buyer(idp), buyer(idp, agent="buy-bot-2")
    key, marker = "Fill-" + uuid.uuid4().hex, uuid.uuid4().hex
    first = gw(p, token, 50, key, marker)
    assert first.status_code == 200, first.text

    # the same key and body from another agent: keys are per agent, so this is that agent's new call
    over_budget(gw(p, other, 50, key, marker), on_exceed)
    # another spelling of the key is another key (keys are case-sensitive)
    over_budget(gw(p, token, 50, key.upper(), marker), on_exceed)
    over_budget(gw(p, token, 50, key + "x", marker), on_exceed)
    assert forwarded(upstream, marker) == 1
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")

    # the quoted (Structured Field) form is the same key: the replay, still not forwarded
    replayed(gw(p, token, 50, f'"{key}"', marker), first)
    # the same key and body on another URL is not that request: 422, not forwarded, not held
    with httpx.Client(timeout=30) as c:
        r = c.post(f"{p.gateway_url}/svc/charges/acme?again=1", content=json.dumps(
            {"amount": 50, "marker": marker}).encode(), headers={
            "Authorization": f"Bearer {token}", "content-type": "application/json", "Idempotency-Key": key})
    assert r.status_code == 422, r.text
    assert forwarded(upstream, marker) == 1
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")
    assert len(pending(p, idp)) == (3 if on_exceed == "hold" else 0)  # the three new calls, none else


@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_a_key_whose_first_call_failed_upstream_is_charged_again(billing, idp, upstream, on_exceed) -> None:
    """A 5xx releases the key and the reservation: the retry is a new call, charged, and over the
    budget it is held or refused, never forwarded as a free retry."""
    p = billing(monthly(limit="10", on_exceed=on_exceed), approvals=ASYNC_APPROVALS)
    token = buyer(idp)
    key, marker = "fail-" + uuid.uuid4().hex, uuid.uuid4().hex
    failed = via_proxy(p, token, upstream.port, "/fail/__status/500", {"marker": marker}, key)
    assert failed.status_code == 500, failed.text
    assert spent_and_reserved(p, idp, "po-monthly") == ("0", "0")  # released, not charged
    # the rest of the budget is spent by another call: the retry (7.5) no longer fits
    assert via_proxy(p, token, upstream.port, "/charges/acme", {"amount": 5, "marker": uuid.uuid4().hex},
                     "other-" + uuid.uuid4().hex).status_code == 200
    over_budget(via_proxy(p, token, upstream.port, "/fail/__status/500", {"marker": marker}, key), on_exceed)
    assert forwarded(upstream, marker) == 1
    assert spent_and_reserved(p, idp, "po-monthly") == ("5", "0")


class _Slow(BaseHTTPRequestHandler):
    """An upstream whose /charges answers after `delay` seconds with `status`."""

    delay = 3.0
    status = 500
    received: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
        type(self).received.append(body)
        time.sleep(self.delay)
        out = json.dumps({"slow": True}).encode()
        self.send_response(self.status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_upstream():
    class Handler(_Slow):
        received: list[str] = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1], Handler
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_a_key_in_progress_is_409_over_the_budget_and_charged_once_its_first_call_failed(
        billing, idp, upstream, slow_upstream, on_exceed) -> None:
    """The first call of a key is still in progress (its reservation fills the budget): its retry
    is answered 409, not forwarded and not held. The first call then fails upstream (its key
    and reservation released): the next retry is a new call, over the budget held or refused."""
    port, handler = slow_upstream
    p = billing(monthly(limit="50", on_exceed=on_exceed), approvals=ASYNC_APPROVALS, more_ports=(port,))
    token = buyer(idp)
    assert via_proxy(p, token, upstream.port, "/charges/acme", {"amount": 40, "marker": uuid.uuid4().hex},
                     "a-" + uuid.uuid4().hex).status_code == 200
    key, marker = "slow-" + uuid.uuid4().hex, uuid.uuid4().hex
    body = {"amount": 10, "marker": marker}
    results: list[httpx.Response] = []
    first = threading.Thread(target=lambda: results.append(via_proxy(p, token, port, "/charges/acme", body, key)))
    first.start()
    try:
        wait_for(lambda: len(handler.received) == 1, timeout=10, what="the first call at the slow upstream")
        assert spent_and_reserved(p, idp, "po-monthly") == ("40", "10")
        retry = via_proxy(p, token, port, "/charges/acme", body, key)
        assert retry.status_code == 409, retry.text
        assert retry.json()["title"] == "Request in progress", retry.text
        assert len(handler.received) == 1 and pending(p, idp) == []
    finally:
        first.join(20)
    assert results and results[0].status_code == 500, results
    assert spent_and_reserved(p, idp, "po-monthly") == ("40", "0")
    # another call takes part of what the failed one gave back: the retry (10) no longer fits
    assert via_proxy(p, token, upstream.port, "/charges/acme", {"amount": 5, "marker": uuid.uuid4().hex},
                     "b-" + uuid.uuid4().hex).status_code == 200
    over_budget(via_proxy(p, token, port, "/charges/acme", body, key), on_exceed)
    assert len(handler.received) == 1
    assert spent_and_reserved(p, idp, "po-monthly") == ("45", "0")


@pytest.fixture
def dedupe_billing(tmp_path, idp, pki, upstream, upstream_tls):
    """The billing connector with one more route: orders, deduplicated on account and amount
    whoever sends them (a dedupe window), charged their amount."""
    policies = tmp_path / "policies-src"
    shutil.copytree(DATA / "policies", policies)
    (policies / "billing.cedar").write_text(BILLING_POLICIES)
    shutil.copy(Path(__file__).resolve().parents[1] / "policies" / "budgets.cedar", policies / "budgets.cedar")
    conn = billing_connector(upstream.port)
    conn["routes"].append(
        {"method": "POST", "path": "/orders/{account}", "action": "test.charge.create",
         "resource": {"type": "Charge", "id": "new"}, "params": {"account": {"type": "string"}},
         "body": {"amount": {"path": "amount", "type": "decimal"}}, "cost": {"field": "amount"},
         "dedupe": {"key": ["account", "amount"], "window_seconds": 120, "answer": "conflict"}})
    started: list[Proctor] = []

    def make(*budgets: dict, **overrides) -> Proctor:
        p = start_proctor(tmp_path / f"d{len(started)}", idp, pki, upstream, upstream_tls,
                          {"budgets": list(budgets), **overrides}, policies_src=policies, extra_connectors=[conn])
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


def order(p: Proctor, token: str, agent: str, port: int, amount: int, marker: str) -> httpx.Response:
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=30) as c:
        return c.post(f"http://127.0.0.1:{port}/orders/acme", json={"amount": amount, "marker": marker})


@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_a_dedupe_window_answers_another_agent_over_the_budget_but_never_forwards(dedupe_billing, idp, upstream,
                                                                                   on_exceed) -> None:
    """A dedupe window is shared by every agent: another agent's equivalent order over the (group)
    budget is the 409 duplicate, free and not forwarded; an order that differs in a deduplicated
    value is a new call, held or refused."""
    p = dedupe_billing(monthly(limit="50", on_exceed=on_exceed, key=["group"]), approvals=ASYNC_APPROVALS)
    a, b = buyer(idp), buyer(idp, agent="buy-bot-2")
    m1, m2, m3 = (uuid.uuid4().hex for _ in range(3))
    first = order(p, a, "buy-bot", upstream.port, 50, m1)
    assert first.status_code == 200, first.text
    dup = order(p, b, "buy-bot-2", upstream.port, 50, m2)  # (another body: only account and amount count)
    assert dup.status_code == 409 and dup.json()["title"] == "Duplicate request", dup.text
    assert pending(p, idp) == []
    over_budget(order(p, b, "buy-bot-2", upstream.port, 49, m3), on_exceed)
    assert forwarded(upstream, m1) == 1 and forwarded(upstream, m2) == 0 and forwarded(upstream, m3) == 0
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")


@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
@pytest.mark.parametrize("on_exceed", ["hold", "refuse"])
def test_concurrent_retries_on_two_replicas_after_the_first_call_failed(billing, idp, upstream, slow_upstream,
                                                                          on_exceed) -> None:
    """Two replicas on one PostgreSQL store: while the first call of a key is in progress, retries on
    both are 409; once it failed upstream, concurrent retries on both replicas (room for one) forward
    it exactly once, charged once; the rest are answered from the store, never forwarded again."""
    port, handler = slow_upstream
    schema = "proctor_rpa_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"
    env = {"PROCTOR_TEST_BG_STORE": f"{PG_DSN}{sep}schema={schema}"}
    try:
        common = {"env": env, "store": {"url_env": "PROCTOR_TEST_BG_STORE"}, "approvals": ASYNC_APPROVALS,
                  "more_ports": (port,)}
        r1 = billing(monthly(limit="50", on_exceed=on_exceed), name="r1", **common)
        r2 = billing(monthly(limit="50", on_exceed=on_exceed), name="r2", **common)
        token = buyer(idp)
        assert via_proxy(r1, token, upstream.port, "/charges/acme", {"amount": 40, "marker": uuid.uuid4().hex},
                         "a-" + uuid.uuid4().hex).status_code == 200
        key, marker = "pg-" + uuid.uuid4().hex, uuid.uuid4().hex
        body = {"amount": 10, "marker": marker}
        results: list[httpx.Response] = []
        first = threading.Thread(target=lambda: results.append(via_proxy(r1, token, port, "/charges/acme", body,
                                                                         key)))
        first.start()
        try:
            wait_for(lambda: len(handler.received) == 1, timeout=10, what="the first call at the slow upstream")
            with ThreadPoolExecutor(6) as pool:
                during = list(pool.map(lambda i: via_proxy((r1, r2)[i % 2], token, port, "/charges/acme", body,
                                                           key), range(6)))
            assert [r.status_code for r in during] == [409] * 6, [(r.status_code, r.text) for r in during]
        finally:
            first.join(20)
        assert results and results[0].status_code == 500
        assert spent_and_reserved(r1, idp, "po-monthly") == ("40", "0") and pending(r1, idp) == []
        handler.delay, handler.status = 0.5, 200  # the upstream recovers
        with ThreadPoolExecutor(6) as pool:
            after = list(pool.map(lambda i: via_proxy((r1, r2)[i % 2], token, port, "/charges/acme", body, key),
                                  range(6)))
        # (the others: 409 in progress or a replay once the store holds the key; before it does, a
        # new call over the budget - held or refused - or one that lost the reservation race: 429)
        codes = sorted(r.status_code for r in after)
        assert set(codes) <= {200, 409, 429, OVER[on_exceed]}, [(r.status_code, r.text) for r in after]
        assert sum(1 for r in after if r.status_code == 200 and r.headers.get("Idempotent-Replayed") is None) == 1
        assert len(handler.received) == 2  # the failed first call and exactly one retry
        wait_for(lambda: spent_and_reserved(r1, idp, "po-monthly") == ("50", "0"), timeout=10, what="50 spent")
    finally:
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def test_a_retry_after_an_approval_released_the_call_is_not_forwarded_again(billing, idp, upstream) -> None:
    """A call over a hold budget, released once by a person's extension: its retries (same key and
    body) are not forwarded again and not charged again; a GET carrying a key is no write at all."""
    p = billing(monthly(limit="50", on_exceed="hold"), approvals=ASYNC_APPROVALS)
    token = buyer(idp)
    key, marker = "ext-" + uuid.uuid4().hex, uuid.uuid4().hex
    held = gw(p, token, 60, key, marker)
    assert held.status_code == 202, held.text
    approver = idp.token("fiona", aud="proctor-approvers", approval_groups=["budget-approvers"], ttl=600)
    r = httpx.post(f"{p.control_url}/v1/approvals/{held.json()['approval_id']}/approve", json={"reason": "once"},
                   headers={"Authorization": f"Bearer {approver}"}, timeout=10)
    assert r.status_code == 200, r.text
    released = gw(p, token, 60, key, marker)
    assert released.status_code == 200, released.text
    assert spent_and_reserved(p, idp, "po-monthly") == ("60", "0")
    for _ in range(2):
        again = gw(p, token, 60, key, marker)  # (the approval released one request: 409 already forwarded)
        assert again.status_code == 409 and again.json()["title"] == "Already forwarded", again.text
    assert forwarded(upstream, marker) == 1
    assert spent_and_reserved(p, idp, "po-monthly") == ("60", "0")
    assert pending(p, idp) == []
    # a GET with a key is not a write: nothing for the store to answer, the route is not budgeted
    g = httpx.get(f"{p.gateway_url}/svc/charges/acme", headers={"Authorization": f"Bearer {token}",
                                                                  "Idempotency-Key": key}, timeout=30)
    assert g.status_code == 403 and g.headers.get("Idempotent-Replayed") is None, g.text  # (no route: egress)
    assert spent_and_reserved(p, idp, "po-monthly") == ("60", "0")
