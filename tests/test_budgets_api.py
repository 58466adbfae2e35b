"""Seeing budgets through a real proxy (docs/limits.md, "Seeing budgets"): GET /v1/budgets and
GET /v1/budgets/{name} of a `proctor run` with a `budgets:` config, and `proctor budgets
list|show` talking to it.

The ledgers are seeded the way the budget stage books them: with the ledger API
(StoreCounters over the proxy's own SQLite file or PostgreSQL schema, RedisCounters on its
Redis prefix) while the proxy runs, under the keys `budget_key` builds. What is checked:

- every declared budget with its declaration, the current window (its id, start and end in
  the budget's time zone), and its ledgers there: spent, reserved, remaining, the fraction
  used, the soft threshold, a projection at the rate so far; amounts as decimal strings;
- request values in keys shown as digests, a key `a:b` shown as it is; other windows and
  other budgets not mixed in; `window=previous` and a window id; filters narrowing the
  ledgers of budgets keyed on that dimension only; `limit` and `ledgers_truncated`;
- 401 without a token, 403 for a non-operator, 404 an unknown budget, 422 an unknown name
  filter or a window of another period, 400 a bad filter;
- PostgreSQL shared by two proxies: both list the same (fleet-wide) ledgers; Redis likewise;
- the CLI's table, details and --json, and its exit status on a refusal;
- real calls through the proxy (the budget stage reserving and settling): their spend in the
  ledgers and, from the proxy's decision records, in the burn-down series.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from datetime import datetime
from decimal import Decimal as D
from typing import Any

import httpx
import pytest

from conftest import Proctor, start_proctor
from proxy.limits.budget_table import budget_key
from proxy.limits.redis_backend import RedisCounters
from proxy.limits.stage import digest
from proxy.limits.store_backend import StoreCounters
from proxy.limits.windows import window_for
from proxy.store import open_store
from test_budgets import _port, billing, buyer, charge, monthly, records  # noqa: F401
from test_limits_backends import REDIS_SKIP, REDIS_URL, SKIP_REDIS, _redis_cleanup
from test_store import PG_DSN, PG_SKIP, _pg_admin

pytestmark = pytest.mark.integration

ITEMS = {
    "name": "item-spend", "match": {"actions": ["test.item.read"]}, "key": ["agent"], "limit": "100.00",
    "currency": "EUR", "period": "month", "timezone": "Europe/Berlin", "cost": {"static": "2.50"},
    "soft_threshold": 0.6,
}
ORDERS = {
    "name": "order-totals", "match": {"actions": ["test.order.create"]}, "key": ["agent", "param:tenant"],
    "limit": "1000", "currency": "USD", "period": "day", "cost": {"field": "total"}, "on_exceed": "hold",
}
TEAMS = {"name": "team-weekly", "match": {"connectors": ["testsvc"]}, "key": ["group"], "limit": 50,
         "period": "week", "shadow": True, "on_unavailable": "open"}
SHARED = {"name": "shared", "match": {"actions": ["test.item.create"]}, "key": [], "limit": 5, "period": "year"}
BUDGETS = {"budgets": [ITEMS, ORDERS, TEAMS, SHARED]}


def operator(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)


def api(p: Proctor, idp, path: str, token: str | None = None, **params: Any) -> httpx.Response:
    return httpx.get(f"{p.control_url}{path}", params=params,
                     headers={"Authorization": f"Bearer {token or operator(idp)}"}, timeout=10)


async def _book(ledger: Any, ops: list[tuple]) -> None:
    for op, *args in ops:
        if op == "charge":
            await ledger.charge(*args)
        else:
            assert (await ledger.reserve(*args)).placed


def seed_store(url: str, ops: list[tuple]) -> None:
    async def main() -> None:
        store = open_store(url)
        await store.open()
        try:
            await _book(StoreCounters(store), ops)
        finally:
            await store.close()

    asyncio.run(main())


def by_name(doc: dict) -> dict[str, dict]:
    return {b["name"]: b for b in doc["budgets"]}


def epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def item_ops(now: float) -> tuple[list[tuple], str, str]:
    month = window_for(now, "month", "Europe/Berlin")
    previous = window_for(month.start - 1, "month", "Europe/Berlin")
    day = window_for(now, "day", "UTC")
    k = lambda agent: budget_key("item-spend", ("agent",), (agent,))  # noqa: E731
    ops = [
        ("charge", k("bot-a"), month.id, D("57.50"), now),
        ("charge", k("bot-a"), month.id, D("2.50"), now),
        ("reserve", k("bot-a"), month.id, D("2.50"), D("100"), f"r-{uuid.uuid4().hex}", 300, now),
        ("charge", k("a:b"), month.id, D("1.10"), now),
        ("charge", k("bot-a"), previous.id, D("99"), now),
        ("charge", budget_key("order-totals", ("agent", "param:tenant"), ("bot-a", "42")), day.id, D("310.25"), now),
        ("charge", budget_key("shared", (), ()), window_for(now, "year", "UTC").id, D("1"), now),
    ]
    return ops, month.id, previous.id


# ------------------------------------------------------------------ SQLite, one proxy
def test_budgets_and_their_ledgers(proctor_factory, idp) -> None:
    p = proctor_factory(BUDGETS)
    now = time.time()
    ops, month_id, previous_id = item_ops(now)
    seed_store(f"sqlite:///{p.dir / 'state' / 'proctor.db'}", ops)

    r = api(p, idp, "/v1/budgets")
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["backend"] == "sqlite" and doc["ledger_available"] is True
    assert [b["name"] for b in doc["budgets"]] == ["item-spend", "order-totals", "team-weekly", "shared"]
    items = by_name(doc)["item-spend"]
    assert {k: items[k] for k in ("key", "limit", "currency", "period", "timezone", "on_exceed", "shadow",
                                  "soft_threshold", "on_unavailable", "where")} == {
        "key": ["agent"], "limit": "100.00", "currency": "EUR", "period": "month", "timezone": "Europe/Berlin",
        "on_exceed": "refuse", "shadow": False, "soft_threshold": "0.6", "on_unavailable": "closed",
        "where": "budgets[0] (item-spend)"}
    assert items["match"] == {"connectors": [], "actions": ["test.item.read"], "methods": []}
    assert items["cost"] == {"kind": "static", "static": "2.50", "field": None, "response": None, "estimate": None,
                             "scale": None}
    w = items["window"]
    month = window_for(now, "month", "Europe/Berlin")
    assert w == {"id": month_id, "start": w["start"], "end": w["end"], "current": True}
    assert (epoch(w["start"]), epoch(w["end"])) == (month.start, month.end)
    # most used first; the previous window's 99 is not in this one
    assert [ledger["key"] for ledger in items["ledgers"]] == [{"agent": "bot-a"}, {"agent": "a:b"}]
    a, ab = items["ledgers"]
    assert (a["spent"], a["reserved"], a["remaining"], a["used_fraction"]) == ("60.00", "2.50", "37.50", "0.6250")
    assert a["soft_reached"] is True and ab["soft_reached"] is False
    assert a["key_digest"] == digest(budget_key("item-spend", ("agent",), ("bot-a",))) and not a["key_shortened"]
    assert (ab["spent"], ab["remaining"], ab["used_fraction"]) == ("1.10", "98.90", "0.0110")
    assert items["spent_total"] == "61.10" and items["ledgers_truncated"] is False
    assert a["burn_down"] is None  # (the list leaves the series out)
    # the projection: the rate so far (60 over the hours elapsed), consistent with what it projects
    pr = a["projection"]
    hours = (time.time() - month.start) / 3600
    assert abs(float(pr["rate_per_hour"]) - 60 / hours) <= 60 / hours * 0.01
    assert len(pr["rate_per_hour"].partition(".")[2]) == 4  # (two more places than the amounts)
    assert pr["exhausted"] is False
    at_end = float(pr["at_window_end"])
    assert abs(at_end - (62.5 + 60 / hours * (month.end - now) / 3600)) <= at_end * 0.01
    if pr["exhaustion_at"] is not None:  # reached before the month ends at this rate
        assert now < epoch(pr["exhaustion_at"]) < month.end and at_end > 100
    else:
        assert at_end <= 100.01
    # a request value in the key is a digest; a budget keyed on nothing has one ledger
    orders = by_name(doc)["order-totals"]
    assert orders["ledgers"][0]["key"] == {"agent": "bot-a", "param:tenant": "sha256:" + digest("42", 12)}
    assert orders["cost"]["kind"] == "field" and orders["cost"]["field"] == "total" and orders["on_exceed"] == "hold"
    assert orders["window"]["id"] == window_for(now, "day", "UTC").id
    shared = by_name(doc)["shared"]
    assert [(x["key"], x["spent"], x["remaining"]) for x in shared["ledgers"]] == [({}, "1", "4")]
    teams = by_name(doc)["team-weekly"]
    assert teams["ledgers"] == [] and teams["shadow"] is True and teams["cost"]["kind"] == "route"
    assert teams["window"]["id"].startswith("week:") and teams["on_unavailable"] == "open"

    # filters narrow the ledgers of budgets keyed on the dimension; the others are shown whole
    narrowed = by_name(api(p, idp, "/v1/budgets", agent="a:b").json())
    assert [x["key"] for x in narrowed["item-spend"]["ledgers"]] == [{"agent": "a:b"}]
    assert narrowed["order-totals"]["ledgers"] == [] and len(narrowed["shared"]["ledgers"]) == 1
    only = api(p, idp, "/v1/budgets", name="item-spend", agent="bot-a").json()["budgets"]
    assert [b["name"] for b in only] == ["item-spend"] and only[0]["ledgers"][0]["spent"] == "60.00"
    cut = by_name(api(p, idp, "/v1/budgets", limit=1).json())["item-spend"]
    assert len(cut["ledgers"]) == 1 and cut["ledgers_truncated"] is True
    # the previous window, by name and by id: over, no projection
    for window in ("previous", previous_id):
        prev = by_name(api(p, idp, "/v1/budgets", window=window, name="item-spend").json())["item-spend"]
        assert prev["window"]["id"] == previous_id and prev["window"]["current"] is False
        assert [(x["key"], x["spent"], x["projection"]) for x in prev["ledgers"]] == [({"agent": "bot-a"}, "99", None)]

    # one budget, with the burn-down series of each ledger (nothing in this replica's records yet)
    one = api(p, idp, "/v1/budgets/item-spend")
    assert one.status_code == 200, one.text
    detail = one.json()
    assert detail["backend"] == "sqlite" and detail["burn_down"]["replica"] is True
    assert detail["budget"]["ledgers"][0]["spent"] == "60.00"
    series = detail["budget"]["ledgers"][0]["burn_down"]
    assert series[0] == {"time": w["start"], "spent": "0"} and all(pt["spent"] == "0" for pt in series)

    # refusals
    assert httpx.get(f"{p.control_url}/v1/budgets", timeout=10).status_code == 401
    agent = httpx.get(f"{p.control_url}/v1/budgets", headers={"Authorization": f"Bearer {idp.token('bot-a')}"},
                      timeout=10)
    assert agent.status_code == 401
    person = api(p, idp, "/v1/budgets", token=idp.token("mia", aud="proctor-approvers", approval_groups=["managers"]))
    assert person.status_code == 403
    missing = api(p, idp, "/v1/budgets/nope")
    assert missing.status_code == 404 and "item-spend" in missing.json()["detail"]
    assert missing.headers["Content-Type"].startswith("application/problem+json")
    assert api(p, idp, "/v1/budgets", name="nope").status_code == 422
    for window in ("day:2026-01-01@UTC", "month:2026-13@Europe/Berlin", "garbage", "month:2026-01@UTC"):
        bad = api(p, idp, "/v1/budgets/item-spend", window=window)
        assert bad.status_code == 422, (window, bad.text)
        assert month_id in bad.json()["detail"]
    assert api(p, idp, "/v1/budgets", agent="x" * 300).status_code == 400

    # the CLI, on the same proxy
    out = cli(p, "list")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["budget", "key", "spent/limit", "%", "reserved", "ends", "exhaustion"]
    row = next(line for line in lines if line.startswith("item-spend") and "agent=bot-a" in line)
    assert "60.00/100.00 EUR" in row and "62.5%" in row and "2.50" in row
    assert any(line.startswith("shared") and "(shared)" in line and "1/5" in line for line in lines)
    assert any(line.startswith("team-weekly") and "no spend" in line for line in lines)
    as_json = cli(p, "list", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["budgets"][0]["name"] == "item-spend"
    shown = cli(p, "show", "item-spend", "--agent", "bot-a")
    assert shown.returncode == 0, shown.stderr
    assert "item-spend" in shown.stdout and "month, Europe/Berlin" in shown.stdout and month_id in shown.stdout
    assert "agent=bot-a" in shown.stdout and "agent=a:b" not in shown.stdout
    assert "burn-down" in shown.stdout and "this replica" in shown.stdout
    shown_json = cli(p, "show", "item-spend", "--json", "--window", "previous")
    assert json.loads(shown_json.stdout)["budget"]["window"]["id"] == previous_id
    refused = cli(p, "show", "nope")
    assert refused.returncode == 1 and "404 Unknown budget" in refused.stderr
    bad_window = cli(p, "list", "--window", "day:2026-01-01@UTC")
    assert bad_window.returncode == 1 and "422" in bad_window.stderr


def test_real_calls_show_in_the_ledgers_and_the_burn_down(billing, idp) -> None:  # noqa: F811
    p = billing(monthly(limit="100.00"))
    token = buyer(idp)
    assert api(p, idp, "/v1/budgets/po-monthly").json()["budget"]["ledgers"] == []
    answers = [charge(p, token, "40"), charge(p, token, "10.25"), charge(p, token, "60"),
               charge(p, buyer(idp, "other-bot"), "5", agent="other-bot")]
    assert [a.status_code for a in answers] == [200, 200, 429, 200]
    recs = records(p, [a.headers["X-Proctor-Decision-Id"] for a in answers])
    doc = by_name(api(p, idp, "/v1/budgets").json())["po-monthly"]
    assert [(x["key"], x["spent"], x["reserved"], x["remaining"]) for x in doc["ledgers"]] == [
        ({"agent": "buy-bot"}, "50.25", "0", "49.75"), ({"agent": "other-bot"}, "5", "0", "95.00")]
    assert doc["ledgers"][0]["key_digest"] == recs[0]["budget"]["key"]  # records name the ledger by this digest
    assert doc["window"]["id"] == recs[0]["budget"]["window"]
    detail = api(p, idp, "/v1/budgets/po-monthly").json()
    assert detail["burn_down"]["complete"] is True
    series = {tuple(x["key"].items()): x["burn_down"] for x in detail["budget"]["ledgers"]}
    mine = series[(("agent", "buy-bot"),)]
    assert mine[0] == {"time": doc["window"]["start"], "spent": "0"}
    assert [pt["spent"] for pt in mine[1:]] == ["40", "50.25", "50.25"]  # two bookings (the 429 booked none), now
    booked = [epoch(pt["time"]) for pt in mine[1:3]]
    decided = [epoch(r["time"]) for r in recs[:2]]
    assert all(d <= b <= d + 10 for d, b in zip(decided, booked)) and booked[0] <= booked[1]
    assert [pt["spent"] for pt in series[(("agent", "other-bot"),)][1:]] == ["5", "5"]
    # the CLI says how much of it this replica booked
    shown = cli(p, "show", "po-monthly")
    assert shown.returncode == 0, shown.stderr
    assert "agent=buy-bot: 50.25 booked here, 2 points" in shown.stdout


def cli(p: Proctor, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy.cli", "budgets", *args, "-c", str(p.config_path), "--as",
                           "olga", "--group", "proctor-admins"], capture_output=True, text=True, timeout=60,
                          cwd=str(p.dir))


def test_no_budgets_declared(proctor_factory, idp) -> None:
    p = proctor_factory()
    doc = api(p, idp, "/v1/budgets").json()
    assert doc["backend"] is None and doc["budgets"] == [] and doc["ledger_available"] is True
    assert api(p, idp, "/v1/budgets/anything").status_code == 404
    assert api(p, idp, "/v1/budgets", name="anything").status_code == 422
    out = cli(p, "list")
    assert out.returncode == 0 and "no budgets are declared" in out.stdout


# ------------------------------------------------------------------ PostgreSQL and Redis: fleet-wide
@pytest.mark.skipif(not PG_DSN, reason=PG_SKIP)
def test_two_proxies_on_postgresql_list_the_same_ledgers(tmp_path, idp, pki, upstream, upstream_tls) -> None:
    schema = "proctor_bg_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"
    url = f"{PG_DSN}{sep}schema={schema}"
    procs: list[Proctor] = []
    try:
        for i in range(2):
            procs.append(start_proctor(tmp_path / f"pg{i}", idp, pki, upstream, upstream_tls, {
                **BUDGETS, "store": {"url_env": "PROCTOR_TEST_BG_STORE"}}, env={"PROCTOR_TEST_BG_STORE": url}))
        now = time.time()
        ops, month_id, _ = item_ops(now)
        seed_store(url, ops)
        docs = [by_name(api(p, idp, "/v1/budgets").json())["item-spend"] for p in procs]
        for d in docs:
            assert d["window"]["id"] == month_id
            # PostgreSQL NUMERIC keeps the scale the amounts were written with
            assert [(x["key"]["agent"], D(x["spent"]), D(x["reserved"])) for x in d["ledgers"]] == [
                ("bot-a", D("60"), D("2.5")), ("a:b", D("1.1"), D(0))]
        assert api(procs[1], idp, "/v1/budgets").json()["backend"] == "postgresql"
    finally:
        for p in procs:
            p.stop()
        asyncio.run(_pg_admin(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@pytest.mark.skipif(SKIP_REDIS, reason=REDIS_SKIP)
def test_a_proxy_on_redis_lists_its_ledgers(proctor_factory, idp) -> None:
    prefix = f"proctor-bg-{uuid.uuid4().hex[:10]}:"
    try:
        p = proctor_factory({**BUDGETS, "counters": {"backend": "redis", "redis_url_env": "PROCTOR_TEST_BG_REDIS",
                                                     "prefix": prefix}}, env={"PROCTOR_TEST_BG_REDIS": REDIS_URL})
        now = time.time()
        ops, month_id, previous_id = item_ops(now)

        async def main() -> None:
            c = RedisCounters(REDIS_URL, prefix=prefix)
            try:
                await _book(c, ops)
            finally:
                await c.close()

        asyncio.run(main())
        doc = api(p, idp, "/v1/budgets").json()
        assert doc["backend"] == "redis"
        items = by_name(doc)["item-spend"]
        assert [(x["key"], x["spent"], x["reserved"]) for x in items["ledgers"]] == [
            ({"agent": "bot-a"}, "60", "2.5"), ({"agent": "a:b"}, "1.1", "0")]
        prev = by_name(api(p, idp, "/v1/budgets", window="previous").json())["item-spend"]
        assert prev["window"]["id"] == previous_id and prev["ledgers"][0]["spent"] == "99"
    finally:
        asyncio.run(_redis_cleanup(prefix))
