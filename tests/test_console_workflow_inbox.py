"""The console's Workflow inbox in a real browser: people decide workflow exceptions.

Real processes on loopback: one `proctor run` (tests/conftest.py's start_proctor: the
test IdP, tests/data/policies plus a permit for the `flow` connector and the bundled
policies/workflows.cedar) in front of a recording "work" upstream
(tests/support/work_upstream.py: 201 with a fresh Location and a counter `n`, or the
status an agent asks for with X-Test-Status). The `orders` workflow (request -> quote ->
order -> receipt, as in tests/test_workflows.py; the request also names a `Ref` object from
its body) retries a failing order up to 3 times and escalates it to the `buyers` group after
2 failures. Agents write through the forward proxy with plain HTTP clients; people work
the console in Debian's headless Chromium (chromium + chromium-driver):

- an item is listed for a member of its group (workflow, instance, step, group, why,
  agent), with the instance's history and business objects, and not for another group;
- `retry` decided from the console lets the agent's next call through to the upstream;
- `close` asks for confirmation (cancel changes nothing); confirmed, the agent's next call
  is refused 409 instance-closed with the person's note;
- the Workflows view links an instance to its open item; the API's problem detail is shown
  when a decision is refused; take-over refuses the agents, complete moves the workflow on;
- an agent id and an object id carrying HTML/script are shown as text only;
- the browser logs no Content-Security-Policy violation.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import DATA, ROOT, SUPPORT, Proctor, free_port, port_open, start_proctor, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HAVE_BROWSER = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
APPROVERS_AUD = "proctor-approvers"
BUYERS, RECEIVERS = "buyers", "receivers"
XSS_AGENT = "wi-<img src=x onerror=alert(1)></script><script>alert(2)</script>"
XSS_REF = "<svg onload=alert(3)><img src=x onerror=alert(4)>&amp;"
XSS_TO = "bot-<img src=x onerror=alert(5)>"

FLOW_CEDAR = """
@id("flow-writers")
permit (principal in AgentGroup::"writers", action in [Action::"flow.request.create", Action::"flow.quote.create",
        Action::"flow.order.create", Action::"flow.receipt.create"], resource);
"""


def flow_connector(port: int) -> dict:
    return {
        "name": "flow",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [
            {"method": "POST", "path": "/requests", "action": "flow.request.create",
             "resource": {"type": "Request", "id": "new"}, "body": {"ref": {"path": "ref", "type": "string"}}},
            {"method": "POST", "path": "/requests/{req}/quotes", "action": "flow.quote.create",
             "resource": {"type": "Quote", "id": "new"}, "params": {"req": {"type": "string"}}},
            {"method": "POST", "path": "/quotes/{quote}/orders", "action": "flow.order.create",
             "resource": {"type": "Order", "id": "new"}, "params": {"quote": {"type": "string"}}},
            {"method": "POST", "path": "/orders/{order}/receipts", "action": "flow.receipt.create",
             "resource": {"type": "Receipt", "id": "new"}, "params": {"order": {"type": "string"}}},
        ],
    }


ORDERS = {
    "name": "orders",
    "description": "request -> quote -> order -> receipt",
    "sla_seconds": 3600,
    "steps": [
        {"name": "request", "actions": ["flow.request.create"],
         "objects": [{"type": "Request", "from": "response", "path": "n"},
                     {"type": "Ref", "from": "field", "name": "ref"}]},
        {"name": "quote", "actions": ["flow.quote.create"], "requires": ["request"],
         "objects": [{"type": "Request", "from": "param", "name": "req"},
                     {"type": "Quote", "from": "header", "name": "Location", "pattern": "^/work/(\\d+)$"}]},
        {"name": "order", "actions": ["flow.order.create"], "requires": ["quote"],
         "on_error": {"retry": {"max_attempts": 3, "after_seconds": 7},
                      "escalate": {"group": BUYERS, "after_failures": 2}},
         "objects": [{"type": "Quote", "from": "param", "name": "quote"},
                     {"type": "Order", "from": "response", "path": "n"}]},
        {"name": "receipt", "actions": ["flow.receipt.create"], "requires": ["order"],
         "complete_when": {"status": [201]},
         "objects": [{"type": "Order", "from": "param", "name": "order"}]},
    ],
}


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Work:
    port: int
    log: Path
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Work]:
    port = free_port()
    log = tmp_path_factory.mktemp("wi-work") / "received.jsonl"
    log.write_text("")
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "work_upstream.py"), "--port", str(port), "--log", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), what="work upstream")
    yield Work(port, log, proc)
    proc.terminate()
    proc.wait(5)


@pytest.fixture(scope="module")
def p(tmp_path_factory, idp, pki, upstream, upstream_tls, work) -> Iterator[Proctor]:
    base = tmp_path_factory.mktemp("wi")
    pol = base / "policies-src"
    shutil.copytree(DATA / "policies", pol)
    (pol / "flow.cedar").write_text(FLOW_CEDAR)
    shutil.copy(ROOT / "policies" / "workflows.cedar", pol / "workflows.cedar")
    wdir = base / "workflows"
    wdir.mkdir()
    (wdir / "orders.yaml").write_text(yaml.safe_dump(ORDERS))
    proc = start_proctor(base / "p", idp, pki, upstream, upstream_tls, {"workflows_dir": str(wdir)},
                         policies_src=pol, extra_connectors=[flow_connector(work.port)])
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def driver():
    if not HAVE_BROWSER:
        pytest.skip(f"the console browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(20)
    # These views poll; a long-lived approvals event stream would only delay the proxy's shutdown.
    d.execute_cdp_cmd("Network.enable", {})
    d.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/approvals/events*"]})
    yield d
    d.quit()


# ------------------------------------------------------------------------------ agents and the API
def call(p: Proctor, work: Work, idp, agent: str, path: str, status: int | None = None,
         body: dict | None = None) -> httpx.Response:
    """A write through the forward proxy; the token in Proxy-Authorization (any agent id, markup included)."""
    token = idp.token(agent, groups=["writers"], ttl=600)
    proxy = httpx.Proxy(f"http://127.0.0.1:{p.port}", headers={"Proxy-Authorization": f"Bearer {token}"})
    headers = {"X-Test-Status": str(status)} if status is not None else {}
    with httpx.Client(proxy=proxy, timeout=20) as c:
        return c.post(f"http://127.0.0.1:{work.port}{path}", json=body or {"m": uuid.uuid4().hex}, headers=headers)


def person(idp, who: str, *groups: str) -> str:
    return idp.token(who, aud=APPROVERS_AUD, approval_groups=list(groups), ttl=600)


def operator(idp) -> str:
    return person(idp, "olga", "proctor-admins")


def control(p: Proctor, method: str, path: str, token: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, f"{p.control_url}{path}", headers={"Authorization": f"Bearer {token}"},
                         json=body, timeout=10)


def items_of(p: Proctor, token: str, inst: str) -> list[dict]:
    r = control(p, "GET", "/v1/workflows/inbox", token)
    assert r.status_code == 200, r.text
    return [i for i in r.json()["items"] if i["instance"] == inst]


def instance_of(r: httpx.Response) -> str:
    name, *rest = r.headers["Proctor-Workflow"].split("; ")
    return dict(kv.split("=", 1) for kv in rest)["instance"]


def upstream_calls(work: Work, path: str) -> int:
    import json

    return sum(1 for line in work.log.read_text().splitlines() if line.strip() and json.loads(line)["path"] == path)


def failing_order(p: Proctor, work: Work, idp, failures: int, agent: str = "alice",
                  ref: str | None = None) -> tuple[str, str]:
    """request -> quote -> `failures` failed orders: the instance and the order path."""
    r = call(p, work, idp, agent, "/requests", body={"ref": ref or "REF-" + uuid.uuid4().hex[:6]})
    assert r.status_code == 201, r.text
    inst = instance_of(r)
    q = call(p, work, idp, agent, f"/requests/{r.json()['n']}/quotes")
    assert q.status_code == 201 and instance_of(q) == inst, q.text
    path = f"/quotes/{q.headers['Location'].rsplit('/', 1)[1]}/orders"
    for _ in range(failures):
        assert call(p, work, idp, agent, path, status=500).status_code == 500
    return inst, path


def decided(p: Proctor, inst: str) -> list[tuple[str, str, str | None]]:
    return [(e["by"], e["resolution"], e.get("note")) for e in p.decisions()
            if e.get("type") == "workflow" and e.get("instance") == inst and e.get("event") == "decided"]


# ------------------------------------------------------------------------------ browser helpers
def _by():
    from selenium.webdriver.common.by import By
    return By


def wait_el(driver, css: str, timeout: float = 10):
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(EC.visibility_of_element_located((_by().CSS_SELECTOR, css)))


def wait_js(driver, script: str, *args, timeout: float = 12, what: str = "condition"):
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {value!r})")


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def text(driver, css: str) -> str:
    return js(driver, "var n = document.querySelector(arguments[0]); return n ? n.textContent : null;", css)


def wait_text(driver, css: str, predicate, timeout: float = 10, what: str = "text") -> str:
    """The text of a shown element once `predicate` holds for it."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        last = js(driver, "var n = document.querySelector(arguments[0]); return n && !n.hidden ? n.textContent : '';", css)
        if last and predicate(last):
            return last
        time.sleep(0.1)
    raise AssertionError(f"{css}: {what} not shown; it says {last!r}")


def sign_in(driver, p: Proctor, token: str) -> None:
    By = _by()
    driver.get(f"{p.control_url}/console/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{p.control_url}/console/")
    wait_el(driver, "#token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login").click()
    wait_el(driver, "#inbox-view")
    wait_el(driver, "#nav")


def go(driver, view: str) -> None:
    driver.find_element(_by().CSS_SELECTOR, f"#nav-{view}").click()
    wait_el(driver, f"#{view}-view")
    assert driver.current_url.endswith(f"/console/#{view}")
    assert driver.find_element(_by().CSS_SELECTOR, f"#nav-{view}").get_attribute("aria-current") == "page"


def open_inbox(driver, p: Proctor, token: str) -> None:
    sign_in(driver, p, token)
    go(driver, "workflow-inbox")
    wait_js(driver, "return document.getElementById('wi-count').textContent !== ''", what="the inbox to load")


def row(driver, inst: str, timeout: float = 12) -> dict:
    """The inbox row of `inst` (compared in JS: any characters), as its data and cell texts."""
    return wait_js(driver, """
        var a = arguments;
        var r = Array.from(document.querySelectorAll('#wi-rows tr')).find(function (r) {
          return r.dataset.instance === a[0]; });
        if (!r) return null;
        var out = Object.assign({}, r.dataset);
        r.querySelectorAll('td').forEach(function (td) { out['cell_' + td.className.split(' ')[0]] = td.textContent; });
        return out;""", inst, timeout=timeout, what=f"the inbox row of {inst}")


def no_row(driver, inst: str, timeout: float = 12) -> None:
    wait_js(driver, "var a = arguments; return !Array.from(document.querySelectorAll('#wi-rows tr')).some("
                    "function (r) { return r.dataset.instance === a[0]; });", inst, timeout=timeout,
            what=f"the row of {inst} to leave the inbox")


def select(driver, inst: str) -> str:
    """Click the row of `inst`; the item id once its detail shows."""
    item = wait_js(driver, "var a = arguments; var r = Array.from(document.querySelectorAll('#wi-rows tr')).find("
                           "function (r) { return r.dataset.instance === a[0]; }); if (r) r.click(); return r ? r.dataset.id : null;",
                   inst, what=f"the row of {inst}")
    wait_js(driver, "return !document.getElementById('wi-item').hidden && "
                    "document.getElementById('wi-item-id').textContent === arguments[0] && "
                    "!document.getElementById('wi-decide').hidden;", item, what=f"the detail of {item}")
    return item


def summary(driver) -> dict[str, str]:
    return js(driver, "var o = {}; var dts = document.querySelectorAll('#wi-summary dt');"
                      " dts.forEach(function (dt) { o[dt.textContent] = dt.nextElementSibling.textContent; }); return o;")


def history(driver) -> list[list[str]]:
    return js(driver, "return Array.from(document.querySelectorAll('#wi-history-rows tr')).map(function (r) { return ["
                      " r.dataset.step, r.dataset.outcome, r.querySelector('.status').textContent,"
                      " r.querySelector('.agent').firstChild.textContent, r.querySelector('.decision-id').textContent]; });")


def objects(driver) -> list[list[str]]:
    return wait_js(driver, "var rows = Array.from(document.querySelectorAll('#wi-object-rows tr')); return rows.length ?"
                           " rows.map(function (r) { return [r.querySelector('.type').textContent,"
                           " r.querySelector('.object-id').textContent, r.querySelector('.step').textContent]; }) : null;",
                   what="the business objects")


def fill(driver, css: str, value: str) -> None:
    field = driver.find_element(_by().CSS_SELECTOR, css)
    field.clear()
    if value:
        field.send_keys(value)


def click(driver, css: str) -> None:
    wait_el(driver, css).click()


def csp_violations(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if "Content Security Policy" in e.get("message", "")]


def browser_problems(driver, allowed: tuple[str, ...] = ()) -> list[dict]:
    """CSP violations and errors; `allowed`: substrings of the refused API calls a test provokes on purpose
    (the browser logs each non-2xx answer as an error)."""
    return [e for e in driver.get_log("browser")
            if "Content Security Policy" in e.get("message", "")
            or (e.get("level") == "SEVERE" and not any(a in e.get("message", "") for a in allowed))]


def no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when there is no alert


# ----------------------------------------------------------------------------- tests
def test_the_groups_item_with_its_history_and_retry_unblocks_the_agent(p, work, idp, driver):
    inst, path = failing_order(p, work, idp, 3)
    refused = call(p, work, idp, "alice", path)
    assert refused.status_code == 409 and refused.json()["type"].endswith("/step-gave-up"), refused.text
    (api_item,) = items_of(p, person(idp, "bea", BUYERS), inst)
    driver.get_log("browser")

    # another group's person: not there
    open_inbox(driver, p, person(idp, "rita", RECEIVERS))
    no_row(driver, inst, timeout=2)
    assert browser_problems(driver) == []

    # a buyer: the item, with why it waits
    open_inbox(driver, p, person(idp, "bea", BUYERS))
    r = row(driver, inst)
    assert (r["id"], r["workflow"], r["step"], r["group"], r["reason"], r["state"], r["agent"]) == (
        api_item["id"], "orders", "order", BUYERS, "gave-up", "open", "alice"), r
    assert r["cell_workflow"] == "orders" and r["cell_instance"] == inst and r["cell_group"] == BUYERS
    assert "gave up after failing 3 times" in r["cell_why"] and r["cell_agent"] == "alice"
    assert re.fullmatch(r"\d+ items?", text(driver, "#wi-count"))

    item = select(driver, inst)
    assert driver.current_url.endswith(f"/console/#workflow-inbox/{item}")
    s = summary(driver)
    assert (s["Workflow"], s["Instance"], s["Step"], s["Group"], s["State"], s["Agent"]) == (
        "orders", inst, "order", BUYERS, "open", "alice"), s
    assert s["Why"] == "gave up after failing 3 times" and s["Steps done"] == "request, quote"
    assert s["Decision"] == api_item["decision_id"]
    assert history(driver) == [[h["step"], h["outcome"], str(h["status"]), h["agent"], h["decision_id"]]
                               for h in api_item["history"]]
    assert [(h[0], h[1], h[2]) for h in history(driver)] == [
        ("request", "completed", "201"), ("quote", "completed", "201"), ("order", "failed", "500"),
        ("order", "failed", "500"), ("order", "failed", "500")]
    assert {o[0] for o in objects(driver)} >= {"Request", "Ref", "Quote"}
    # the four decisions this item allows
    shown = js(driver, "return Array.from(document.querySelectorAll('#wi-decide button[data-resolution]'))"
                       ".filter(function (b) { return !b.hidden; }).map(function (b) { return b.dataset.resolution; });")
    assert shown == ["retry", "take-over", "complete", "close"]

    # retry: the agent's next call goes through to the upstream
    fill(driver, "#wi-note", "supplier fixed the catalogue")
    click(driver, "#wi-retry")
    wait_text(driver, "#wi-notice", lambda t: "Retry allowed" in t and inst in t, what="the retry notice")
    no_row(driver, inst)
    assert not driver.find_element(_by().CSS_SELECTOR, "#wi-item").is_displayed()
    assert items_of(p, person(idp, "bea", BUYERS), inst) == []
    assert decided(p, inst) == [("bea", "retry", "supplier fixed the catalogue")]
    before = upstream_calls(work, path)
    ok = call(p, work, idp, "alice", path)
    assert ok.status_code == 201 and instance_of(ok) == inst, ok.text
    assert upstream_calls(work, path) == before + 1
    assert browser_problems(driver) == []


def test_close_asks_for_confirmation_then_the_agent_is_refused(p, work, idp, driver):
    inst, path = failing_order(p, work, idp, 2)
    buyer = person(idp, "bea", BUYERS)
    driver.get_log("browser")
    open_inbox(driver, p, buyer)
    r = row(driver, inst)
    assert r["reason"] == "failures" and "failed 2 times" in r["cell_why"], r
    select(driver, inst)
    fill(driver, "#wi-note", "duplicate order")
    click(driver, "#wi-close")
    wait_el(driver, "#wi-close-confirm")
    assert text(driver, "#wi-close-instance") == inst
    # cancelled: nothing happened
    click(driver, "#wi-close-cancel")
    assert not driver.find_element(_by().CSS_SELECTOR, "#wi-close-confirm").is_displayed()
    time.sleep(0.3)
    assert len(items_of(p, buyer, inst)) == 1 and decided(p, inst) == []
    # confirmed: closed as failed
    click(driver, "#wi-close")
    click(driver, "#wi-close-yes")
    wait_text(driver, "#wi-notice", lambda t: t.startswith("Closed " + inst), what="the close notice")
    no_row(driver, inst)
    assert items_of(p, buyer, inst) == []
    assert decided(p, inst) == [("bea", "close", "duplicate order")]
    before = upstream_calls(work, path)
    refused = call(p, work, idp, "alice", path)
    assert refused.status_code == 409, refused.text
    body = refused.json()
    assert body["type"].endswith("/instance-closed") and "closed as failed by bea (duplicate order)" in body["detail"]
    assert upstream_calls(work, path) == before
    assert browser_problems(driver) == []


def test_linked_from_workflows_refusals_shown_take_over_then_complete(p, work, idp, driver):
    By = _by()
    inst, path = failing_order(p, work, idp, 2)
    buyer = person(idp, "bea", BUYERS)
    (api_item,) = items_of(p, buyer, inst)
    driver.get_log("browser")
    sign_in(driver, p, buyer)
    go(driver, "workflows")
    wait_js(driver, "return /\\(\\d+ open\\)/.test(document.getElementById('wf-inbox-count').textContent)",
            what="the open-item count by the inbox link")
    # the instance's detail links to its open item
    wait_js(driver, "var a = arguments; var r = Array.from(document.querySelectorAll('#wf-instance-rows tr')).find("
                    "function (r) { return r.dataset.id === a[0]; }); if (r) r.click(); return !!r;", inst, timeout=15,
            what="the instance row")
    link = wait_el(driver, "#wf-instance-items a[data-testid='wf-instance-item']")
    assert link.text == api_item["id"]
    assert "step order failed 2 times; group buyers" in text(driver, "#wf-instance-items")
    link.click()
    wait_el(driver, "#workflow-inbox-view")
    assert driver.current_url.endswith(f"/console/#workflow-inbox/{api_item['id']}")
    assert driver.find_element(By.CSS_SELECTOR, "#nav-workflow-inbox").get_attribute("aria-current") == "page"
    wait_js(driver, "return !document.getElementById('wi-item').hidden && "
                    "document.getElementById('wi-item-id').textContent === arguments[0]", api_item["id"],
            what="the linked item selected")

    # refused decisions: the API's problem detail, and nothing decided
    fill(driver, "#wi-to", "human:eve")
    click(driver, "#wi-retry")
    err = wait_text(driver, "#wi-decide-error", lambda t: "Bad agent" in t, what="the 400 Bad agent")
    assert "(400)" in err and "not starting group: or human:" in err, err
    fill(driver, "#wi-to", "")
    fill(driver, "#wi-objects-input", "Nope:1")
    click(driver, "#wi-complete")
    err = wait_text(driver, "#wi-decide-error", lambda t: "Unknown object type" in t, what="the 400 object type")
    assert "Nope" in err and "(400)" in err, err
    fill(driver, "#wi-objects-input", "no colon here")
    click(driver, "#wi-complete")
    wait_text(driver, "#wi-decide-error", lambda t: "write Type:id" in t, what="the Type:id hint")
    assert decided(p, inst) == [] and len(items_of(p, buyer, inst)) == 1

    # take over: agents are refused, naming the person
    fill(driver, "#wi-objects-input", "")
    click(driver, "#wi-take-over")
    wait_text(driver, "#wi-notice", lambda t: t.startswith("You took step order of " + inst), what="the take-over notice")
    r = wait_js(driver, "var a = arguments; var r = Array.from(document.querySelectorAll('#wi-rows tr')).find("
                        "function (r) { return r.dataset.instance === a[0] && r.dataset.state === 'taken'; });"
                        " return r ? r.textContent : null;", inst, what="the taken item")
    assert "by bea (you)" in r
    assert wait_js(driver, "return document.getElementById('wi-take-over').disabled", what="take-over disabled")
    assert summary(driver)["State"] == "taken over by bea (you)"
    refused = call(p, work, idp, "alice", path)
    assert refused.status_code == 409 and refused.json()["type"].endswith("/step-rerouted"), refused.text
    assert "a person (bea) has taken this step over" in refused.json()["detail"]

    # complete, naming the order bea placed: the workflow moves on and finds the instance by it
    order_no = f"PO-{uuid.uuid4().hex[:8]}"
    fill(driver, "#wi-objects-input", f"Order:{order_no}")
    click(driver, "#wi-complete")
    wait_text(driver, "#wi-notice", lambda t: "Recorded step order of " + inst in t and "request, quote, order" in t,
              what="the complete notice")
    no_row(driver, inst)
    receipt = call(p, work, idp, "carol", f"/orders/{order_no}/receipts")
    assert receipt.status_code == 201 and instance_of(receipt) == inst, receipt.text
    assert [(by, res) for by, res, _ in decided(p, inst)] == [("bea", "take-over"), ("bea", "complete")]
    assert browser_problems(driver, allowed=("/escalations/",)) == []
    assert csp_violations(driver) == []


def test_markup_in_agent_and_object_ids_is_inert(p, work, idp, driver):
    inst, _ = failing_order(p, work, idp, 2, agent=XSS_AGENT, ref=XSS_REF)
    driver.get_log("browser")
    open_inbox(driver, p, operator(idp))
    r = row(driver, inst)
    assert r["agent"] == XSS_AGENT and r["cell_agent"] == XSS_AGENT  # an attribute value and text, as they were
    select(driver, inst)
    assert summary(driver)["Agent"] == XSS_AGENT
    assert {h[3] for h in history(driver)} == {XSS_AGENT}
    assert ["Ref", XSS_REF, "request"] in objects(driver)
    # retry, giving the step to an agent whose id carries markup: the notice says it as text
    fill(driver, "#wi-to", XSS_TO)
    click(driver, "#wi-retry")
    wait_text(driver, "#wi-notice", lambda t: f"(only {XSS_TO} from now on)" in t, what="the retry notice")
    no_alert(driver)
    assert js(driver, "return document.querySelectorAll('img, svg, script:not([src]), [onerror], [onload]').length") == 0
    assert js(driver, "return document.scripts.length") == 1
    assert browser_problems(driver) == []


def test_a_decision_someone_made_first_shows_the_409(p, work, idp, driver):
    inst, _ = failing_order(p, work, idp, 2)
    driver.get_log("browser")
    open_inbox(driver, p, person(idp, "bea", BUYERS))
    item = select(driver, inst)
    # the console stops hearing about changes (its refreshes fail) while ben decides first through the API
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/approvals/events*", "*/v1/workflows/inbox*"]})
    try:
        first = control(p, "POST", f"/v1/workflows/instances/{inst}/escalations/{item}", person(idp, "ben", BUYERS),
                        {"resolution": "take-over"})
        assert first.status_code == 200, first.text
        r = control(p, "POST", f"/v1/workflows/instances/{inst}/escalations/{item}", person(idp, "ben", BUYERS),
                    {"resolution": "retry"})
        assert r.status_code == 200, r.text
        click(driver, "#wi-complete")
        err = wait_text(driver, "#wi-decide-error", lambda t: "Already resolved" in t, what="the 409")
        assert err.startswith("Could not complete (409): Already resolved:") and "(retry) by ben" in err, err
        wait_text(driver, "#wi-error", lambda t: "Could not load the workflow inbox" in t, what="the failed refresh")
    finally:
        driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/approvals/events*"]})
    # the next refresh: the item has left the inbox, and its detail says so instead of offering decisions
    no_row(driver, inst)
    wait_text(driver, "#wi-item-gone", lambda t: "no longer open" in t, what="the gone note")
    assert not driver.find_element(_by().CSS_SELECTOR, "#wi-decide").is_displayed()
    assert [(by, res) for by, res, _ in decided(p, inst)] == [("ben", "take-over"), ("ben", "retry")]
    assert browser_problems(driver, allowed=("/escalations/", "/v1/workflows/inbox")) == []
