"""Attacks on budgets and rate limits through real proxy processes (issue 14 review).

Each test is an attempt to spend more than a budget allows, to leave a reservation
behind, to take a call over a hold budget without the right approval, to escape a
key, or to read what a refusal must not show. The ones that failed to break it stay
as regression tests; a defect found is a test that fails until it is fixed."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
from aiohttp import web

from conftest import Proctor, wait_for
from test_budgets import UPSTREAM_PORT, _port, billing, buyer, charge, concurrently, monthly, records  # noqa: F401

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------ helpers
def operator_token(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)


def ledger(p: Proctor, idp, name: str, **filters: str) -> list[dict]:
    r = httpx.get(f"{p.control_url}/v1/budgets/{name}", params=filters,
                  headers={"Authorization": f"Bearer {operator_token(idp)}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["budget"]["ledgers"]


def spent_and_reserved(p: Proctor, idp, name: str) -> tuple[str, str]:
    ls = ledger(p, idp, name)
    if not ls:
        return "0", "0"
    assert len(ls) == 1, ls
    return ls[0]["spent"], ls[0]["reserved"]


def post(p: Proctor, token: str, path: str, *, agent: str = "buy-bot", port: int | None = None,
         **kw) -> httpx.Response:
    with httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=30) as c:
        return c.post(f"http://127.0.0.1:{port or UPSTREAM_PORT[0]}{path}", **kw)


class ScriptedUpstream:
    """An upstream on loopback whose answer depends on the account in /charges/{account}:
    `redirect` 302, `missing` 404, `slow` answers after 1.5 s, `cost-<text>` answers
    {"cost": <text as raw JSON>}; anything else 200."""

    def __init__(self) -> None:
        self.port = 0
        self.hits: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        account = request.match_info.get("account", "")
        self.hits.append(account)
        if account == "redirect":
            return web.Response(status=302, headers={"Location": "/elsewhere"})
        if account == "missing":
            return web.json_response({"error": "no such account"}, status=404)
        if account == "slow":
            await asyncio.sleep(1.5)
        if account.startswith("cost-"):
            return web.Response(text='{"cost": ' + account[5:] + "}", content_type="application/json")
        return web.json_response({"ok": True})

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_route("*", "/charges/{account}", self._handle)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._runner = runner
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    s = ScriptedUpstream()
    yield s
    s.close()


# ------------------------------------------------------------------ the cost field as the upstream reads it
def test_body_tricks_on_the_cost_field_are_refused_or_priced_as_sent(billing, idp, upstream) -> None:
    """Duplicate keys, a case twin, exponents, strings, unicode digits, negative zero,
    huge exponents, a gzip body: each is refused, or priced at the number the upstream reads."""
    p = billing(monthly(limit="5000"))
    token = buyer(idp)
    raw = {"content-type": "application/json"}
    refused = {
        "duplicate key": b'{"amount": 1, "amount": 1000}',
        "case twin": b'{"amount": 1, "Amount": 1000}',
        "exponent string": b'{"amount": "1e3"}',
        "unicode digits": '{"amount": "\u0661\u0660\u0660\u0660"}'.encode(),
        "underscored": b'{"amount": "1_000"}',
        "huge exponent": b'{"amount": 1e999999}',
        "negative": b'{"amount": -5}',
        "nan": b'{"amount": NaN}',
        "missing": b'{"marker": 1}',
        "an array": b'{"amount": [1000]}',
        "an object": b'{"amount": {"value": 1000}}',
        "null": b'{"amount": null}',
        "trailing data": b'{"amount": 1} {"amount": 1000}',
    }
    upstream.clear()
    for what, body in refused.items():
        r = post(p, token, "/charges/acme", content=body, headers=raw)
        assert r.status_code in (400, 415), (what, r.status_code, r.text)
    gz = post(p, token, "/charges/acme", content=gzip.compress(b'{"amount": 1}'),
              headers={**raw, "content-encoding": "gzip"})
    assert gz.status_code in (400, 415), gz.text
    override = post(p, token, "/charges/acme", json={"amount": 1000}, headers={"X-HTTP-Method-Override": "GET"})
    assert override.status_code == 400, override.text
    assert [e for e in upstream.received() if e["path"] == "/charges/acme"] == []
    assert spent_and_reserved(p, idp, "po-monthly") == ("0", "0")
    # what passes is priced at the number the upstream reads
    priced = [(b'{"amount": 1e3}', "1000"), (b'{"amount": -0}', "1000"), (b'{"amount": -0.0}', "1000"),
              (b'{"amount": "10"}', "1010"), (b'{"amount": 2.50}', "1012.5"), (b'{"amount": 0.5E1}', "1017.5")]
    for body, total in priced:
        r = post(p, token, "/charges/acme", content=body, headers=raw)
        assert r.status_code == 200, (body, r.text)
        assert spent_and_reserved(p, idp, "po-monthly") == (total, "0"), body


def test_the_same_budget_counts_calls_through_the_gateway_and_the_forward_proxy(billing, idp, upstream) -> None:
    p = billing(monthly(limit="30"))
    token = buyer(idp)
    assert charge(p, token, "20").status_code == 200
    via_gateway = httpx.post(f"{p.gateway_url}/svc/charges/acme", json={"amount": 20},
                             headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert via_gateway.status_code == 429, via_gateway.text
    assert httpx.post(f"{p.gateway_url}/svc/charges/acme", json={"amount": 10},
                      headers={"Authorization": f"Bearer {token}"}, timeout=30).status_code == 200
    assert spent_and_reserved(p, idp, "po-monthly") == ("30", "0")
    assert charge(p, token, "0.01").status_code == 429


# ------------------------------------------------------------------ retries and Idempotency-Key
def test_retries_without_a_key_are_new_calls_and_each_is_charged(billing, idp) -> None:
    p = billing(monthly(limit="25"))
    token = buyer(idp)
    body = json.dumps({"amount": 10}).encode()
    answers = [post(p, token, "/charges/acme", content=body, headers={"content-type": "application/json"})
               for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert spent_and_reserved(p, idp, "po-monthly") == ("20", "0")


def test_an_idempotent_retry_of_a_call_that_filled_the_budget_is_replayed_not_refused(billing, idp, upstream) -> None:
    """The first call spent the whole budget; its answer was lost; the agent retries with
    the same Idempotency-Key. The retry costs nothing (it is answered from the replay, the
    upstream is not called again), so it must be replayed, not refused 429 'not forwarded'
    (which tells the agent the charge did not happen when it did)."""
    p = billing(monthly(limit="50"))
    token = buyer(idp)
    body = json.dumps({"amount": 50, "marker": "x"}).encode()
    headers = {"content-type": "application/json", "Idempotency-Key": "charge-" + uuid.uuid4().hex}
    upstream.clear()
    first = post(p, token, "/charges/acme", content=body, headers=headers)
    assert first.status_code == 200, first.text
    retry = post(p, token, "/charges/acme", content=body, headers=headers)
    assert retry.status_code == 200, retry.text
    assert retry.headers.get("Idempotent-Replayed") == "true"
    assert len([e for e in upstream.received() if e["path"] == "/charges/acme"]) == 1
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")
    # a new call (another key) is still refused: the budget is spent
    other = post(p, token, "/charges/acme", content=body,
                 headers={**headers, "Idempotency-Key": "charge-" + uuid.uuid4().hex})
    assert other.status_code == 429


def test_concurrent_calls_with_one_idempotency_key_are_charged_once(billing, idp, scripted) -> None:
    """Calls with one key race to a slow upstream: one is forwarded, the others are refused
    (409 in progress, or 429 while the duplicates' own reservations still hold the budget;
    they are released at once); one charge, nothing left held."""
    p = billing(monthly(limit="100"), more_ports=(scripted.port,))
    token = buyer(idp)
    body = json.dumps({"amount": 30}).encode()
    headers = {"content-type": "application/json", "Idempotency-Key": "k-" + uuid.uuid4().hex}
    answers = concurrently([lambda: post(p, token, "/charges/slow", port=scripted.port, content=body,
                                         headers=headers) for _ in range(4)])
    codes = sorted(a.status_code for a in answers)
    assert codes[0] == 200 and set(codes[1:]) <= {409, 429}, [a.text for a in answers]
    assert scripted.hits.count("slow") == 1
    wait_for(lambda: spent_and_reserved(p, idp, "po-monthly") == ("30", "0"), timeout=10, what="one charge")


# ------------------------------------------------------------------ reservations never leak
def test_upstream_answers_settle_below_400_and_release_otherwise(billing, idp, scripted) -> None:
    p = billing(monthly(limit="100"), more_ports=(scripted.port,))
    token = buyer(idp)
    body = {"content": json.dumps({"amount": 40}).encode(), "headers": {"content-type": "application/json"}}
    missing = post(p, token, "/charges/missing", port=scripted.port, **body)
    assert missing.status_code == 404
    assert spent_and_reserved(p, idp, "po-monthly") == ("0", "0")
    with httpx.Client(proxy=p.proxy_url_with("buy-bot", token), timeout=30, follow_redirects=False) as c:
        moved = c.post(f"http://127.0.0.1:{scripted.port}/charges/redirect", **body)
    assert moved.status_code == 302
    assert spent_and_reserved(p, idp, "po-monthly") == ("40", "0")  # documented: below 400 settles


def test_an_agent_that_hangs_up_on_a_slow_answer_leaves_nothing_held(billing, idp, scripted) -> None:
    p = billing(monthly(limit="50"), more_ports=(scripted.port,))
    token = buyer(idp)
    with httpx.Client(proxy=p.proxy_url_with("buy-bot", token), timeout=0.4) as c:
        with pytest.raises(httpx.TimeoutException):
            c.post(f"http://127.0.0.1:{scripted.port}/charges/slow", json={"amount": 50})
    # the upstream answered (200) after the agent left: what was forwarded is spent, once; nothing stays held
    wait_for(lambda: spent_and_reserved(p, idp, "po-monthly")[1] == "0", timeout=10, what="no reservation held")
    spent, _ = spent_and_reserved(p, idp, "po-monthly")
    assert spent in ("0", "50")
    if spent == "0":
        assert charge(p, token, "50").status_code == 200


def test_an_absurd_cost_in_the_answer_does_not_leave_the_reservation_held(billing, idp, scripted) -> None:
    """A `response` cost the ledger cannot book (too many digits, a huge exponent) must not
    make the settle crash and leave the estimate held until it lapses."""
    p = billing(monthly(limit="10", cost={"response": "cost", "estimate": "4"}), more_ports=(scripted.port,))
    booked = {
        "1e-70": "0.000000000001",  # rounded up at the 12th place: never less than it cost
        "0." + "0" * 70 + "1": "0.000000000001",
        "0.10000000000000001": "0.100000000001",  # read exactly (a float reads 0.1), then rounded up
        "1" * 70: "4",  # not a number Proctor reads (over 64 digits): the estimate
        "12345678901234567890123456789012345678901234567890.123456789012": "1000000000000000",  # at most 10^15
    }
    for i, (text, amount) in enumerate(booked.items()):
        agent = f"absurd-{i}"
        r = post(p, buyer(idp, agent), f"/charges/cost-{text}", port=scripted.port, agent=agent, json={"amount": 1})
        assert r.status_code == 200, r.text

        def settled(agent: str = agent) -> list[tuple[str, str]]:
            return [(lg["spent"], lg["reserved"]) for lg in ledger(p, idp, "po-monthly", agent=agent)]

        wait_for(lambda: settled() == [(amount, "0")], timeout=5,  # noqa: B023 (waited for in this iteration)
                 what=f"a call costing {text[:20]}... booked as {amount}")


# ------------------------------------------------------------------ hold budgets and approvals
def _approve(p: Proctor, idp, approval_id: str, group: str) -> None:
    approver = idp.token(f"approver-{group}", aud="proctor-approvers", approval_groups=[group], ttl=600)
    r = httpx.post(f"{p.control_url}/v1/approvals/{approval_id}/approve", json={"reason": "ok"},
                   headers={"Authorization": f"Bearer {approver}"}, timeout=10)
    assert r.status_code == 200, r.text


def test_one_extension_takes_one_call_over_even_when_retried_concurrently(billing, idp) -> None:
    p = billing(monthly(limit="50", on_exceed="hold"), approvals={"mode": "async", "expire_after_seconds": 60})
    token = buyer(idp)
    assert charge(p, token, "45").status_code == 200
    body = json.dumps({"amount": 30, "marker": "m"}).encode()
    headers = {"content-type": "application/json"}
    held = post(p, token, "/charges/big", content=body, headers=headers)
    assert held.status_code == 202, held.text
    _approve(p, idp, held.json()["approval_id"], "budget-approvers")
    answers = concurrently([lambda: post(p, token, "/charges/big", content=body, headers=headers)
                            for _ in range(5)])
    assert sorted(a.status_code for a in answers).count(200) == 1, [(a.status_code, a.text[:200]) for a in answers]
    wait_for(lambda: spent_and_reserved(p, idp, "po-monthly") == ("75", "0"), timeout=10, what="one extension")
    # the same approval does not take another amount over either
    other = post(p, token, "/charges/big", content=json.dumps({"amount": 3000, "marker": "m"}).encode(),
                 headers=headers)
    assert other.status_code in (202, 429), other.text
    assert spent_and_reserved(p, idp, "po-monthly") == ("75", "0")


def test_an_approval_of_another_policy_does_not_extend_a_budget(billing, idp) -> None:
    """A call held by a plain Cedar hold (finance, `hold-large-when-budget-low`) and approved;
    meanwhile the budget filled up. The finance approval is no budget extension: the retry is
    held again for the budget approvers or refused, never forwarded over the limit."""
    p = billing(monthly(name="cedar-visible", limit="100", on_exceed="hold"),
                approvals={"mode": "async", "expire_after_seconds": 60})
    token = buyer(idp)
    assert charge(p, token, "55").status_code == 200
    body = json.dumps({"amount": 20, "marker": "f"}).encode()
    headers = {"content-type": "application/json"}
    held = post(p, token, "/charges/fin", content=body, headers=headers)
    assert held.status_code == 202 and held.json()["reasons"] == ["hold-large-when-budget-low"], held.text
    _approve(p, idp, held.json()["approval_id"], "finance")
    assert charge(p, token, "10", account="small1").status_code == 200
    assert charge(p, token, "10", account="small2").status_code == 200
    assert charge(p, token, "10", account="small3").status_code == 200  # 85 spent: 20 more is over
    retry = post(p, token, "/charges/fin", content=body, headers=headers)
    assert retry.status_code in (202, 403, 429), retry.text
    if retry.status_code != 429:
        assert "budget-extension" in retry.json()["reasons"]
    assert spent_and_reserved(p, idp, "cedar-visible") == ("85", "0")


# ------------------------------------------------------------------ keys
def test_agent_ids_with_separators_have_their_own_ledgers(billing, idp) -> None:
    p = billing(monthly(limit="10"))
    names = ["a:b", "a", "a%3Ab", "a=b", "a-", "a\\b"]

    def gw(name: str, amount: int) -> httpx.Response:  # (the gateway: an agent id is the token's subject)
        return httpx.post(f"{p.gateway_url}/svc/charges/acme", json={"amount": amount}, timeout=30,
                          headers={"Authorization": f"Bearer {idp.token(name, groups=['buyers'], ttl=600)}"})

    for name in names:
        r = gw(name, 10)
        assert r.status_code == 200, (name, r.text)
    for name in names:  # each spent its own 10, no one else's
        r = gw(name, 1)
        assert r.status_code == 429 and r.json()["budget"]["key"] == {"agent": name}, (name, r.text)
    assert sorted(lg["key"]["agent"] for lg in ledger(p, idp, "po-monthly")) == sorted(names)


def test_a_claim_keyed_budget_shows_no_raw_claim_value(billing, idp) -> None:
    p = billing(monthly(limit="10", key=["claim:tenant"]))
    secret = "tenant-" + uuid.uuid4().hex
    token = idp.token("buy-bot", groups=["buyers"], tenant=secret, ttl=600)
    assert charge(p, token, "10").status_code == 200
    refused = charge(p, token, "1")
    assert refused.status_code == 429
    assert secret not in refused.text and secret not in json.dumps(dict(refused.headers))
    assert refused.json()["budget"]["key"]["claim:tenant"].startswith("sha256:")
    # another value of the claim, and none at all, are other ledgers; leaving it out does not escape
    other = idp.token("buy-bot", groups=["buyers"], tenant="other", ttl=600)
    assert charge(p, other, "10").status_code == 200
    none = idp.token("buy-bot", groups=["buyers"], ttl=600)
    assert charge(p, none, "10").status_code == 200 and charge(p, none, "1").status_code == 429
    listed = json.dumps(ledger(p, idp, "po-monthly"))
    assert secret not in listed
    assert all(secret not in json.dumps(d) for d in p.decisions())


def test_an_agent_in_many_groups_cannot_escape_a_group_budget(billing, idp) -> None:
    p = billing(monthly(limit="10", key=["group"]))
    assert charge(p, buyer(idp), "10").status_code == 200  # the buyers' ledger is spent
    many = idp.token("many-groups-bot", groups=["buyers"] + [f"a{i:02d}" for i in range(32)], ttl=600)
    r = charge(p, many, "10", agent="many-groups-bot")
    assert r.status_code == 429, r.text  # every group is counted: the buyers' ledger refuses
    # past the bound (256 groups) the agent is refused outright, never counted against some groups only
    crowd = idp.token("crowd-bot", groups=["buyers"] + [f"g{i:03d}" for i in range(300)], ttl=600)
    r = charge(p, crowd, "1", agent="crowd-bot")
    assert r.status_code == 403 and r.json()["title"] == "Too many groups", r.text


# ------------------------------------------------------------------ rate limits on the same route
def test_every_answer_of_a_limited_route_carries_the_fields_and_exactly_m_pass(billing, idp, scripted) -> None:
    limit = {"name": "charges", "match": {"connectors": ["billing"]}, "key": ["agent"], "limit": 6, "period": "1h"}
    p = billing(monthly(limit="10000"), rate_limits=[limit], more_ports=(scripted.port,))
    token = buyer(idp)
    headers = {"content-type": "application/json"}
    answers = {
        "ok": post(p, token, "/charges/acme", port=scripted.port, json={"amount": 1}),
        "upstream 404": post(p, token, "/charges/missing", port=scripted.port, json={"amount": 1}),
        "policy 403": post(p, token, "/charges/acme", port=scripted.port, json={"amount": 6000}),
        "cost unknown 400": post(p, token, "/charges/acme", port=scripted.port, content=b"{}", headers=headers),
        "budget 429": post(p, token, "/charges/acme", port=scripted.port, json={"amount": 20000}),
    }
    expected = {"ok": 200, "upstream 404": 404, "policy 403": 403, "cost unknown 400": 400, "budget 429": 429}
    assert {k: a.status_code for k, a in answers.items()} == expected, {k: a.text[:300] for k, a in answers.items()}
    for what, a in answers.items():
        assert a.headers.get("RateLimit-Policy") == '"charges";q=6;w=3600', (what, dict(a.headers))
        assert a.headers.get("RateLimit", "").startswith('"charges";r='), (what, dict(a.headers))
    # 5 counted so far; of 10 concurrent calls exactly 1 more passes
    rest = concurrently([lambda: post(p, token, "/charges/acme", port=scripted.port, json={"amount": 1})
                         for _ in range(10)])
    assert sorted(a.status_code for a in rest) == [200] + [429] * 9
    assert all(a.headers.get("RateLimit") for a in rest)
    throttled = [a for a in rest if a.status_code == 429]
    assert all(a.json()["type"].endswith("/rate-limited") and int(a.headers["Retry-After"]) > 0 for a in throttled)


def test_an_idempotent_retry_on_a_hold_budget_is_replayed_not_held(billing, idp, upstream) -> None:
    """The retry (same Idempotency-Key, same bytes) of the call that filled a hold budget is
    answered from its replay: not held for a person, not charged again, not forwarded.
    (More of this class, on both gateway engines: tests/test_budgets_replays.py.)"""
    p = billing(monthly(limit="50", on_exceed="hold"), approvals={"mode": "async", "expire_after_seconds": 60})
    token = buyer(idp)
    body = json.dumps({"amount": 50, "marker": "h"}).encode()
    headers = {"content-type": "application/json", "Idempotency-Key": "hold-" + uuid.uuid4().hex}
    upstream.clear()
    assert post(p, token, "/charges/acme", content=body, headers=headers).status_code == 200
    retry = post(p, token, "/charges/acme", content=body, headers=headers)
    assert retry.status_code == 200 and retry.headers.get("Idempotent-Replayed") == "true", retry.text
    assert len([e for e in upstream.received() if e["path"] == "/charges/acme"]) == 1
    assert spent_and_reserved(p, idp, "po-monthly") == ("50", "0")
    pending = httpx.get(f"{p.control_url}/v1/approvals", params={"state": "pending"},
                        headers={"Authorization": f"Bearer {operator_token(idp)}"}, timeout=10)
    assert pending.status_code == 200 and pending.json()["approvals"] == [], pending.text


def test_answer_costs_are_booked_exactly_or_rounded_up_never_crash() -> None:
    """The cost an upstream answers, as the ledger books it (unit): exact where it can be, rounded
    up at the 12th place, at most 10^15; numbers the default 28-digit context would round stay exact."""
    from decimal import Decimal

    from proxy.limits.budget_stage import _number, bookable

    cases = {"1e-70": "0.000000000001", "0.1": "0.1", "2.50": "2.5", "1E+3": "1000", "1e999999": "1000000000000000",
             "1.00000000000000000000000000001": "1.000000000001",
             "123456789012345678901234567890": "1000000000000000", "-0": "0"}
    for text, booked in cases.items():
        n = _number(text)
        assert n is not None and bookable(n) == Decimal(booked), (text, n)
    assert _number("1" * 80) is None and _number("-1") is None and _number("NaN") is None
    assert bookable(_number(Decimal("0.10000000000000001")) or Decimal(0)) == Decimal("0.100000000001")
