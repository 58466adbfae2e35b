"""The console's Budgets view in a real browser (docs/limits.md, "Seeing budgets").

One `proctor run` (the billing setup of tests/test_budgets.py: a `billing` connector whose
charges cost their `amount`, a monthly budget per agent in EUR with a soft threshold, and a
budget nobody spends) in front of the recording upstream. Agents charge through the forward
proxy with a plain HTTP client, one of them with an id full of markup; a second replica's
spend is booked straight into the shared ledger. People look at the view in Debian's headless
Chromium (chromium + chromium-driver, as tests/test_console_workflows.py):

- one card per budget with its limit, window and a row per key: the key as text, a bar as
  wide as the used fraction, spent / limit, reserved, used % and the projected exhaustion,
  all as GET /v1/budgets gives them; the idle budget says it has no spend;
- the selected key's burn-down chart (inline SVG): this replica's bookings as a step line
  (two calls, then now), the fleet's spend now as a dot (more: the other replica booked too),
  the limit line at its height, the dashed projection to the window's end at the API's value;
- clicking another key charts that key; the previous window shows no spend;
- markup in an agent id is shown as text (nothing runs, nothing loads); a person who is not an
  operator is told the view is for operators; no Content-Security-Policy violation, no error.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime

import httpx
import pytest

from conftest import Proctor
from proxy.limits.budget_table import budget_key
from proxy.limits.store_backend import StoreCounters
from proxy.limits.windows import window_for
from proxy.store import open_store
from test_budgets import _port, billing, monthly, records, UPSTREAM_PORT  # noqa: F401
from test_console_workflows import (_by, browser_problems, driver, js, no_alert, operator, sign_in,  # noqa: F401
                                    wait_el, wait_js)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

XSS_AGENT = "bg-<img src=x onerror=alert(1)></script><script>alert(2)</script>"


def charge(p: Proctor, idp, agent: str, amount: str) -> httpx.Response:
    """A charge through the forward proxy, the agent's token in Proxy-Authorization (any id, markup included)."""
    token = idp.token(agent, groups=["buyers"], ttl=600)
    proxy = httpx.Proxy(p.proxy_url, headers={"Proxy-Authorization": f"Bearer {token}"})
    with httpx.Client(proxy=proxy, timeout=30) as c:
        return c.post(f"http://127.0.0.1:{UPSTREAM_PORT[0]}/charges/acme",
                      json={"amount": json.loads(amount), "marker": uuid.uuid4().hex})


def other_replica_books(p: Proctor, agent: str, amount: str) -> None:
    """What another replica on the same ledger booked (it is in the ledger, not in this replica's records)."""
    async def main() -> None:
        store = open_store(f"sqlite:///{p.dir / 'state' / 'proctor.db'}")
        await store.open()
        try:
            w = window_for(time.time(), "month", "Europe/Berlin")
            from decimal import Decimal

            await StoreCounters(store).charge(budget_key("po-monthly", ("agent",), (agent,)), w.id, Decimal(amount),
                                              time.time())
        finally:
            await store.close()

    asyncio.run(main())


def control(p: Proctor, idp, path: str, **params) -> dict:
    r = httpx.get(f"{p.control_url}{path}", params=params, headers={"Authorization": f"Bearer {operator(idp)}"},
                  timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def epoch(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def shown(amount: str) -> str:
    """An amount as the console shows it (formatDecimal): thousands separated, no trailing zeros but cents."""
    whole, _, frac = amount.partition(".")
    frac = frac.rstrip("0")
    frac = frac + "0" if len(frac) == 1 else frac
    return f"{int(whole):,}" + (f".{frac}" if frac else "")


def open_budgets(driver, p: Proctor, token: str) -> None:
    sign_in(driver, p, token)
    driver.find_element(_by().CSS_SELECTOR, "#nav-budgets").click()
    wait_el(driver, "#budgets-view")
    assert driver.current_url.endswith("/console/#budgets")
    assert driver.find_element(_by().CSS_SELECTOR, "#nav-budgets").get_attribute("aria-current") == "page"


LEDGERS_JS = """
var name = arguments[0];
var card = Array.from(document.querySelectorAll('[data-testid=budget-card]')).find(function (c) {
  return c.dataset.name === name; });
if (!card) return null;
return Array.from(card.querySelectorAll('[data-testid=budget-ledger]')).map(function (r) {
  var cells = r.querySelectorAll('td');
  var ex = r.querySelector('[data-testid=budget-exhaustion]');
  return {key: cells[0].textContent, digest: r.dataset.digest, spent: r.dataset.spent, used: r.dataset.used,
          bar: r.querySelector('[data-testid=budget-bar]').dataset.used,
          width: parseFloat(r.querySelector('[data-testid=budget-bar-spent]').getAttribute('width')),
          amounts: cells[2].textContent, reserved: cells[3].textContent, percent: cells[4].textContent,
          exhaustion: ex.dataset.state, at: ex.dataset.at || null, selected: r.classList.contains('is-selected')};
});
"""

CHART_JS = """
var name = arguments[0];
var card = Array.from(document.querySelectorAll('[data-testid=budget-card]')).find(function (c) {
  return c.dataset.name === name; });
var fig = card && card.querySelector('[data-testid=budget-chart]');
if (!fig) return null;
var svg = fig.querySelector('svg');
var q = function (id) { return svg.querySelector('[data-testid=' + id + ']'); };
var spent = q('budget-spent-line'), fleet = q('budget-fleet-point'), limit = q('budget-limit-line'), proj = q('budget-projection-line');
return {digest: fig.dataset.digest, key: fig.querySelector('[data-testid=budget-chart-key]').textContent,
        title: svg.querySelector('title').textContent, desc: svg.querySelector('desc').textContent,
        labelled: svg.getAttribute('aria-labelledby'),
        points: spent ? +spent.dataset.points : 0, last: spent ? spent.dataset.last : null,
        vertices: spent ? spent.getAttribute('points').split(' ').length : 0,
        fleet: fleet ? fleet.dataset.spent : null, fleetY: fleet ? +fleet.getAttribute('cy') : null,
        limit: limit.dataset.value, limitY: +limit.getAttribute('y1'),
        projection: proj ? proj.dataset.end : null, projY: proj ? +proj.getAttribute('y2') : null,
        text: fig.querySelector('[data-testid=budget-projection-text]').textContent};
"""


def test_budgets_view_shows_ledgers_bars_and_burn_down(billing, idp, driver) -> None:  # noqa: F811
    p = billing(monthly(limit="100.00", soft_threshold=0.5),
                {"name": "failed-charges", "match": {"actions": ["test.charge.fail"]}, "limit": "30",
                 "currency": "EUR", "period": "week"})
    answers = [charge(p, idp, "buy-bot", "40"), charge(p, idp, "buy-bot", "10.25"), charge(p, idp, XSS_AGENT, "5")]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    records(p, [a.headers["X-Proctor-Decision-Id"] for a in answers])
    other_replica_books(p, "buy-bot", "20")
    api = {b["name"]: b for b in control(p, idp, "/v1/budgets")["budgets"]}
    po = api["po-monthly"]
    assert [(x["key"]["agent"], x["spent"]) for x in po["ledgers"]] == [("buy-bot", "70.25"), (XSS_AGENT, "5")]

    driver.get_log("browser")
    open_budgets(driver, p, operator(idp))
    wait_js(driver, "return document.querySelectorAll('[data-testid=budget-card]').length === 2", what="two budgets")
    names = js(driver, "return Array.from(document.querySelectorAll('[data-testid=budget-name]')).map(function (n) {"
                       " return n.textContent; });")
    assert names == ["po-monthly", "failed-charges"]
    assert wait_js(driver, "return document.getElementById('budgets-count').textContent;") == "2 budgets"
    meta = js(driver, "return document.querySelector('[data-testid=budget-card] [data-testid=budget-meta]').textContent;")
    assert "Limit 100 EUR per key and month" in meta and "month" in meta and "Europe/Berlin" in meta and po["window"]["id"] in meta
    assert "soft threshold 50%" in meta

    rows = wait_js(driver, LEDGERS_JS, "po-monthly", what="the ledgers")
    assert [r["key"] for r in rows] == ["agent=buy-bot", "agent=" + XSS_AGENT]  # markup as text
    for r, x in zip(rows, po["ledgers"]):
        assert (r["digest"], r["spent"], r["used"], r["bar"]) == (x["key_digest"], x["spent"], x["used_fraction"],
                                                                  x["used_fraction"])
        assert r["width"] == pytest.approx(150 * float(x["used_fraction"]), abs=0.01)
        assert r["amounts"] == f"{shown(x['spent'])} / 100 EUR" and r["reserved"] == shown(x["reserved"])
        proj = x["projection"]
        state = "exhausted" if proj["exhausted"] else "projected" if proj["exhaustion_at"] else "not-this-window"
        assert r["exhaustion"] == state and (r["at"] is None) == (state != "projected")
        if state == "projected":  # (the console asked a moment later: the rate, and so the time, moved a little)
            assert abs(epoch(r["at"]) - epoch(proj["exhaustion_at"])) < 120
    assert rows[0]["percent"] == "70.3%" and rows[0]["selected"] and not rows[1]["selected"]
    idle = js(driver, "return Array.from(document.querySelectorAll('[data-testid=budget-card]'))[1]"
                      ".querySelector('[data-testid=budget-no-spend]').textContent;")
    assert idle == "No spend in this window."

    # the burn-down of the selected (most used) key
    chart = wait_js(driver, CHART_JS, "po-monthly", what="the chart")
    assert chart["digest"] == po["ledgers"][0]["key_digest"] and chart["key"] == "agent=buy-bot"
    assert chart["points"] == 4 and chart["last"] == "50.25"  # start, two calls booked here, now
    assert chart["vertices"] == 7  # a step line: each booking adds a riser
    assert chart["fleet"] == "70.25" and chart["fleetY"] < chart["limitY"] + 200
    assert chart["limit"] == "100.00"
    assert float(chart["projection"]) == pytest.approx(float(po["ledgers"][0]["projection"]["at_window_end"]), rel=0.01)
    top_down = [chart["fleetY"], chart["limitY"]]  # SVG y grows downwards: 70.25 is below the 100 line
    assert top_down[0] > top_down[1]
    assert chart["labelled"] == "bg-chart-0-title bg-chart-0-desc" and "Burn-down of po-monthly" in chart["title"]
    assert "50.25 booked by this replica" in chart["desc"] and "70.25 spent" in chart["desc"]
    assert "projected by the window's end" in chart["text"] or "exhausted" in chart["text"]

    # another key, charted on a click
    driver.find_elements(_by().CSS_SELECTOR, "[data-testid=budget-card] [data-testid=budget-ledger]")[1].click()
    chart = wait_js(driver, "var c = (function () {" + CHART_JS + "}).apply(null, arguments);"
                            " return c && c.digest === arguments[1] ? c : null;", "po-monthly",
                    po["ledgers"][1]["key_digest"], what="the other key's chart")
    assert chart["key"] == "agent=" + XSS_AGENT and chart["points"] == 3 and chart["last"] == "5"
    assert chart["fleet"] == "5"
    assert js(driver, LEDGERS_JS, "po-monthly")[1]["selected"]
    # nothing the agent id carried became markup
    assert js(driver, "return document.querySelectorAll('#budgets-view img, #budgets-view script').length;") == 0
    no_alert(driver)

    # the previous window: no spend there
    from selenium.webdriver.support.select import Select

    Select(driver.find_element(_by().CSS_SELECTOR, "#budgets-window")).select_by_value("previous")
    prev_id = control(p, idp, "/v1/budgets", window="previous")["budgets"][0]["window"]["id"]
    wait_js(driver, "var w = document.querySelector('[data-testid=budget-window]');"
                    " return w && w.textContent === arguments[0];", prev_id, what="the previous window")
    assert js(driver, "return document.querySelectorAll('[data-testid=budget-no-spend]').length;") == 2
    assert browser_problems(driver) == []

    # a person who is not an operator
    open_budgets(driver, p, idp.token("mia", aud="proctor-approvers", approval_groups=["managers"], ttl=600))
    note = wait_js(driver, "var n = document.getElementById('budgets-readonly'); return !n.hidden && n.textContent;",
                   what="the operators-only note")
    assert "operators only" in note and "Not an operator" in note
    assert js(driver, "return document.querySelectorAll('[data-testid=budget-card]').length;") == 0
    # (the browser logs the API's 403 itself as a failed load; nothing else)
    assert [e for e in browser_problems(driver) if not ("/v1/budgets" in e["message"] and "403" in e["message"])] == []
