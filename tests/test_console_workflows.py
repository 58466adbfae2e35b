"""The console's Workflows view in a real browser: outcome KPIs, charts, instances and their history.

Real processes on loopback: one `proctor run` (tests/conftest.py's start_proctor: the
test IdP, tests/data/policies plus a permit for the `flow` connector, the approval hold below
and the bundled policies/workflows.cedar) in front of a recording "work" upstream
(tests/support/work_upstream.py: 201, a fresh Location and a counter `n`). Two
workflows (the setup of tests/test_workflows.py):

- `orders`: request -> quote -> order -> receipt (SLA 1 h, costs in EUR); the request
  also names a `Ref` object from its body (`ref`), the id an agent chooses;
- `idle`: one step nobody calls (its charts show their empty states).

Agents write through the forward proxy with plain HTTP clients: one instance done
end to end with a failed order before the good one and a quote done twice (rework),
one left running, and one started by an agent whose id, and with a `ref`, that
carry HTML/script. Every order is held for a manager (an `@approval` policy), who
approves it after a moment: the human wait. People look at the console in Debian's headless Chromium
(chromium + chromium-driver):

- the workflows with their instance counts; the headline KPIs are the numbers
  GET /v1/workflows/kpis gives for the same window (the console keeps the window it
  asked for on the page), in both the 7-day and the 24-hour window;
- the three charts are inline SVG with a <title>, one bar per histogram bucket, one
  point per bucket and series of throughput, a met and a missed bar per SLA bucket;
  the idle workflow shows the empty states;
- the per-step and per-agent tables; the instances list filtered by workflow and
  state; an instance's history (step, outcome, agent, status, decision id) and
  business objects;
- agent and object ids with markup are shown as text (nothing runs, nothing loads);
- the browser logs no Content-Security-Policy violation and no error.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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
XSS_AGENT = "wf-<img src=x onerror=alert(1)></script><script>alert(2)</script>"
XSS_REF = "<svg onload=alert(3)><img src=x onerror=alert(4)>&amp;"
DASH = "\u2014"

FLOW_CEDAR = """
@id("flow-writers")
permit (principal in AgentGroup::"writers", action in [Action::"flow.request.create", Action::"flow.quote.create",
        Action::"flow.order.create", Action::"flow.receipt.create", Action::"flow.note.create"], resource);

@id("flow-orders-need-a-manager")
@approval("managers")
forbid (principal, action == Action::"flow.order.create", resource)
unless { context has approval && context.approval.groups.contains("managers") };
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
         "objects": [{"type": "Request", "from": "response", "path": "n"},
                     {"type": "Ref", "from": "field", "name": "ref"}]},
        {"name": "quote", "actions": ["flow.quote.create"], "requires": ["request"], "sla_seconds": 600,
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
IDLE = {
    "name": "idle",
    "description": "nobody works this one",
    "sla_seconds": 600,
    "steps": [{"name": "note", "actions": ["flow.note.create"],
               "objects": [{"type": "Note", "from": "response", "path": "n"}]}],
}


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Work:
    port: int
    proc: subprocess.Popen


@dataclass
class Driven:
    done: str  # completed: request, quote twice, a failed order, the order, the receipt
    running: str  # request, quote
    xss: str  # started by XSS_AGENT with ref XSS_REF


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Work]:
    port = free_port()
    log = tmp_path_factory.mktemp("wfc-work") / "received.jsonl"
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "work_upstream.py"), "--port", str(port), "--log", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), what="work upstream")
    yield Work(port, proc)
    proc.terminate()
    proc.wait(5)


@pytest.fixture(scope="module")
def p(tmp_path_factory, idp, pki, upstream, upstream_tls, work) -> Iterator[Proctor]:
    base = tmp_path_factory.mktemp("wfc")
    pol = base / "policies-src"
    shutil.copytree(DATA / "policies", pol)
    (pol / "flow.cedar").write_text(FLOW_CEDAR)
    shutil.copy(ROOT / "policies" / "workflows.cedar", pol / "workflows.cedar")
    wdir = base / "workflows"
    wdir.mkdir()
    for w in (ORDERS, IDLE):
        (wdir / f"{w['name']}.yaml").write_text(yaml.safe_dump(w))
    proc = start_proctor(base / "p", idp, pki, upstream, upstream_tls, {"workflows_dir": str(wdir)},
                         policies_src=pol, extra_connectors=[flow_connector(work.port)])
    yield proc
    proc.stop()


def call(p: Proctor, work: Work, idp, agent: str, path: str, status: int | None = None,
         body: dict | None = None) -> httpx.Response:
    """A write through the forward proxy; the token in Proxy-Authorization (any agent id, markup included)."""
    token = idp.token(agent, groups=["writers"], ttl=600)
    proxy = httpx.Proxy(f"http://127.0.0.1:{p.port}", headers={"Proxy-Authorization": f"Bearer {token}"})
    headers = {"X-Test-Status": str(status)} if status is not None else {}
    with httpx.Client(proxy=proxy, timeout=20) as c:
        return c.post(f"http://127.0.0.1:{work.port}{path}", json=body or {"m": uuid.uuid4().hex}, headers=headers)


def approved_call(p: Proctor, work: Work, idp, agent: str, path: str, status: int | None = None) -> httpx.Response:
    """A call held for approval (the agent's connection waits) that a manager approves after a moment."""
    manager = idp.token("mia", aud="proctor-approvers", approval_groups=["managers"], ttl=600)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(call, p, work, idp, agent, path, status)
        pending: list[str] = []

        def held() -> bool:
            r = httpx.get(f"{p.control_url}/v1/approvals", params={"state": "pending", "agent": agent},
                          headers={"Authorization": f"Bearer {manager}"}, timeout=10)
            pending[:] = [a["id"] for a in r.json()["approvals"]]
            return bool(pending)

        wait_for(held, timeout=15, what=f"{agent}'s call to be held")
        time.sleep(0.4)  # a person takes a moment: the approval wait
        vote = httpx.post(f"{p.control_url}/v1/approvals/{pending[0]}/approve", json={"reason": "within budget"},
                          headers={"Authorization": f"Bearer {manager}"}, timeout=10)
        assert vote.status_code == 200, vote.text
        return answer.result(30)


def instance_of(r: httpx.Response) -> str:
    name, *rest = r.headers["Proctor-Workflow"].split("; ")
    return dict(kv.split("=", 1) for kv in rest)["instance"]


@pytest.fixture(scope="module")
def driven(p, work, idp) -> Driven:
    r = call(p, work, idp, "alice", "/requests", body={"ref": "REF-" + uuid.uuid4().hex[:6]})
    assert r.status_code == 201, r.text
    done = instance_of(r)
    q = call(p, work, idp, "alice", f"/requests/{r.json()['n']}/quotes")
    assert q.status_code == 201 and instance_of(q) == done, q.text
    again = call(p, work, idp, "bob", f"/requests/{r.json()['n']}/quotes")  # the quote once more: rework
    assert again.status_code == 201 and instance_of(again) == done, again.text
    quote_no = q.headers["Location"].rsplit("/", 1)[1]
    failed = approved_call(p, work, idp, "alice", f"/quotes/{quote_no}/orders", status=500)
    assert failed.status_code == 500
    o = approved_call(p, work, idp, "alice", f"/quotes/{quote_no}/orders")
    assert o.status_code == 201, o.text
    rc = call(p, work, idp, "bob", f"/orders/{o.json()['n']}/receipts")
    assert rc.status_code == 201 and instance_of(rc) == done, rc.text

    r2 = call(p, work, idp, "bob", "/requests")
    running = instance_of(r2)
    assert call(p, work, idp, "bob", f"/requests/{r2.json()['n']}/quotes").status_code == 201

    r3 = call(p, work, idp, XSS_AGENT, "/requests", body={"ref": XSS_REF})
    assert r3.status_code == 201, r3.text
    xss = instance_of(r3)
    wait_for(lambda: control(p, idp, f"/v1/workflows/instances/{done}").json()["state"] == "completed",
             timeout=10, what="the completed instance")
    return Driven(done, running, xss)


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
    # This view polls; a long-lived approvals event stream would only delay the proxy's shutdown.
    d.execute_cdp_cmd("Network.enable", {})
    d.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/approvals/events*"]})
    yield d
    d.quit()


# ------------------------------------------------------------------------------ helpers
def operator(idp) -> str:
    return idp.token("olga", aud="proctor-approvers", approval_groups=["proctor-admins"], ttl=600)


def control(p: Proctor, idp, path: str, params: dict | None = None) -> httpx.Response:
    return httpx.get(f"{p.control_url}{path}", params=params, headers={"Authorization": f"Bearer {operator(idp)}"},
                     timeout=10)


def kpis_landed(p: Proctor, idp) -> bool:
    return control(p, idp, "/v1/workflows/kpis").status_code != 404


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


def sign_in(driver, p: Proctor, token: str) -> None:
    By = _by()
    driver.get(f"{p.control_url}/console/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{p.control_url}/console/")
    wait_el(driver, "#token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login").click()
    wait_el(driver, "#inbox-view")
    wait_el(driver, "#nav")


def open_workflows(driver, p: Proctor, idp) -> None:
    sign_in(driver, p, operator(idp))
    driver.find_element(_by().CSS_SELECTOR, "#nav-workflows").click()
    wait_el(driver, "#workflows-view")
    assert driver.current_url.endswith("/console/#workflows")
    assert driver.find_element(_by().CSS_SELECTOR, "#nav-workflows").get_attribute("aria-current") == "page"


def select_workflow(driver, name: str) -> None:
    wait_js(driver, "var a = arguments; var r = Array.from(document.querySelectorAll('#workflow-rows tr'))"
                    ".find(function (r) { return r.dataset.name === a[0]; }); if (r) r.click(); return !!r;",
            name, what=f"the {name} row")
    wait_js(driver, "return document.getElementById('wf-name').textContent === arguments[0];", name,
            what=f"the {name} detail")


def select_option(driver, css: str, value: str) -> None:
    from selenium.webdriver.support.select import Select
    Select(driver.find_element(_by().CSS_SELECTOR, css)).select_by_value(value)


def shown_window(driver) -> dict:
    """The window the console asked the KPI API for (kept on the page), once the KPIs are shown."""
    return wait_js(driver, "var r = document.getElementById('wf-range'); return r.dataset.since ? "
                           "{since: r.dataset.since, until: r.dataset.until, bucket: r.dataset.bucket} : null;",
                   what="the KPI window")


def api_kpis(p: Proctor, idp, window: dict, name: str) -> dict:
    r = control(p, idp, "/v1/workflows/kpis", {"workflow": name, "since": window["since"], "until": window["until"],
                                                "bucket_seconds": window["bucket"]})
    assert r.status_code == 200, r.text
    found = [w for w in r.json()["workflows"] if w["name"] == name]
    assert len(found) == 1, r.text
    return found[0]


def shown_kpis(driver) -> dict[str, str]:
    return js(driver, "var out = {}; document.querySelectorAll('#wf-kpis [data-kpi]').forEach(function (n) {"
                      " out[n.dataset.kpi] = n.dataset.value; }); return out;")


def round1(x: float) -> str:
    """JavaScript's String(Math.round(x * 10) / 10)."""
    r = math.floor(x * 10 + 0.5) / 10
    return str(int(r)) if r == int(r) else str(r)


def fmt_rate(r: float | None) -> str:
    return DASH if r is None else round1(r * 100) + "%"


def same_number(shown: str, api) -> bool:
    if api is None:
        return shown == ""
    if isinstance(api, str):  # decimals (costs) travel as strings
        return shown == api
    return math.isclose(float(shown), float(api), rel_tol=1e-9, abs_tol=1e-9)


def expected_kpis(k: dict) -> dict:
    ct, tp, sla, inst, cost = k["cycle_time_seconds"], k["throughput"], k["sla"], k["instances"], k["cost"]
    return {
        "running": inst["running"], "started": inst["started"], "completed": inst["completed"],
        "cycle_p50": ct["p50"], "cycle_p90": ct["p90"], "cycle_mean": ct["mean"], "cycle_count": ct["count"],
        "human_wait_p50": ct["human_wait_p50"], "agent_time_p50": ct["agent_time_p50"],
        "throughput_completed": tp["completed"], "per_day": tp["per_day"],
        "error_rate": k["error_rate"], "rework_rate": k["rework_rate"],
        "sla_adherence": sla["adherence"], "sla_met": sla["met"], "sla_missed": sla["missed"], "sla_at_risk": sla["at_risk"],
        "cost_per_instance": cost["per_instance"], "cost_total": cost["total"], "autonomy_rate": k["autonomy_rate"],
        **{key: ct[key] for key in ("human_wait_p90", "agent_time_p90", "human_wait_share") if key in ct},
        **({"sla_overdue": sla["overdue"]} if "overdue" in sla else {}),
        **({"closed": inst["closed"]} if "closed" in inst else {}),
    }


def check_kpis_match(driver, k: dict) -> None:
    shown = shown_kpis(driver)
    want = expected_kpis(k)
    assert set(shown) == set(want), (shown, want)
    wrong = {key: (shown[key], want[key]) for key in want if not same_number(shown[key], want[key])}
    assert not wrong, wrong
    text = js(driver, "var o = {}; document.querySelectorAll('#wf-kpis [data-kpi]').forEach(function (n) {"
                      " o[n.dataset.kpi] = n.textContent; }); return o;")
    for key in ("error_rate", "rework_rate", "sla_adherence", "autonomy_rate"):
        assert text[key] == fmt_rate(want[key]), (key, text[key], want[key])
    for key in ("running", "started", "completed", "cycle_count", "sla_met", "sla_missed", "sla_at_risk",
                "throughput_completed"):
        assert text[key] == str(want[key]), (key, text[key], want[key])
    assert text["cost_per_instance"].endswith(" EUR") and text["cost_total"].endswith(" EUR")


def chart_counts(driver) -> dict:
    return js(driver, """
        function q(sel) { return Array.from(document.querySelectorAll(sel)); }
        function counts(sel) { return q(sel).map(function (n) { return Number(n.getAttribute('data-count')); }); }
        return {
          states: q('#wf-kpi-panel figure.chart').map(function (f) { return f.id + '=' + f.dataset.state; }),
          cycle: counts('#wf-chart-cycle svg rect.bar'),
          started: counts('#wf-chart-throughput svg circle.point-started'),
          completed: counts('#wf-chart-throughput svg circle.point-completed'),
          lines: q('#wf-chart-throughput svg polyline.line').length,
          met: counts('#wf-chart-sla svg rect.bar-met'),
          missed: counts('#wf-chart-sla svg rect.bar-missed'),
          titles: q('#wf-kpi-panel svg').map(function (s) {
            var t = s.querySelector(':scope > title'); return t ? t.textContent : ''; }),
          labelled: q('#wf-kpi-panel svg').every(function (s) {
            return s.getAttribute('role') === 'img' && (s.getAttribute('aria-labelledby') || '').split(' ').every(
              function (id) { return !!document.getElementById(id); }); }),
          barTitles: q('#wf-kpi-panel svg rect.bar, #wf-kpi-panel svg circle.point').every(function (b) {
            return !!b.querySelector('title'); }),
          styled: q('#workflows-view [style]').length,
        };""")


def check_charts_match(driver, k: dict) -> None:
    c = chart_counts(driver)
    assert c["states"] == ["wf-chart-cycle=chart", "wf-chart-throughput=chart", "wf-chart-sla=chart"], c["states"]
    assert c["cycle"] == [b["count"] for b in k["cycle_time_histogram"]], c
    assert sum(c["cycle"]) == k["cycle_time_seconds"]["count"]
    series = k["throughput"]["series"]
    assert c["started"] == [b["started"] for b in series] and c["completed"] == [b["completed"] for b in series], c
    assert c["lines"] == 2
    burn = k["sla"]["burn"]
    assert c["met"] == [b["met"] for b in burn] and c["missed"] == [b["missed"] for b in burn], c
    assert len(c["titles"]) == 3 and all(t.endswith("orders") or "orders" in t for t in c["titles"]), c["titles"]
    assert c["labelled"] and c["barTitles"]
    assert c["styled"] == 0, "no style attributes (the CSP allows none)"


def browser_problems(driver) -> list[dict]:
    return [e for e in driver.get_log("browser")
            if "Content Security Policy" in e.get("message", "") or e.get("level") == "SEVERE"]


def no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when there is no alert


def open_instance(driver, inst: str) -> None:
    wait_js(driver, "var a = arguments; var r = Array.from(document.querySelectorAll('#wf-instance-rows tr'))"
                    ".find(function (r) { return r.dataset.id === a[0]; }); if (r) r.click(); return !!r;",
            inst, timeout=15, what=f"the row of {inst}")
    wait_js(driver, "var d = document.getElementById('wf-instance'); return !d.hidden && "
                    "document.getElementById('wf-instance-id').textContent === arguments[0] && "
                    "document.querySelectorAll('#wf-history-rows tr').length > 0;", inst, what=f"the history of {inst}")


def history(driver) -> list[dict]:
    return js(driver, "return Array.from(document.querySelectorAll('#wf-history-rows tr')).map(function (r) {"
                      " return {step: r.dataset.step, outcome: r.dataset.outcome, agent: r.querySelector('.agent').textContent,"
                      " status: r.querySelector('.status').textContent, decision: r.querySelector('.decision-id').textContent,"
                      " cost: r.querySelector('.cost').textContent, duration: r.querySelector('.duration').textContent,"
                      " wait: r.querySelector('.wait').textContent,"
                      " objects: (r.querySelector('.event-objects') || {}).textContent || ''}; });")


def objects(driver) -> list[list[str]]:
    return js(driver, "return Array.from(document.querySelectorAll('#wf-object-rows tr')).map(function (r) {"
                      " return [r.querySelector('.type').textContent, r.querySelector('.object-id').textContent,"
                      " r.querySelector('.step').textContent]; });")


# ----------------------------------------------------------------------------- the workflows and their KPIs
def test_workflows_with_kpis_and_charts_as_the_api_gives_them(p, idp, driven, driver):
    By = _by()
    if not kpis_landed(p, idp):
        pytest.fail("GET /v1/workflows/kpis is not served by this build")
    driver.get_log("browser")
    open_workflows(driver, p, idp)
    defs = {w["name"]: w for w in control(p, idp, "/v1/workflows").json()["workflows"]}
    wait_js(driver, "return document.querySelectorAll('#workflow-rows tr').length === 2", what="both workflows")
    rows = js(driver, "return Array.from(document.querySelectorAll('#workflow-rows tr')).map(function (r) {"
                      " return [r.dataset.name, r.querySelector('.running').textContent,"
                      " r.querySelector('.completed').textContent]; });")
    assert sorted(rows) == sorted([[n, str(w["instances"].get("running", 0)), str(w["instances"].get("completed", 0))]
                                   for n, w in defs.items()]), rows
    assert defs["orders"]["instances"] == {"running": 2, "completed": 1}

    select_workflow(driver, "orders")
    assert "request -> quote -> order -> receipt" in driver.find_element(By.CSS_SELECTOR, "#wf-description").text
    window = shown_window(driver)
    assert window["bucket"] == "21600"  # the default window: 7 days in 6 h buckets
    k = api_kpis(p, idp, window, "orders")
    assert (k["instances"]["started"], k["instances"]["completed"], k["instances"]["running"]) == (3, 1, 2)
    assert k["error_rate"] is not None and k["error_rate"] > 0 and k["rework_rate"] is not None and k["rework_rate"] > 0
    # the orders waited for a manager: human wait, and not every step autonomous
    assert k["cycle_time_seconds"]["human_wait_p50"] >= 0.4 and 0 < k["autonomy_rate"] < 1
    wait_js(driver, "return document.querySelectorAll('#wf-kpis [data-kpi]').length > 0", what="the KPI tiles")
    check_kpis_match(driver, k)
    check_charts_match(driver, k)

    # the overview row carries the same headline numbers
    row = js(driver, "var r = document.querySelector('#workflow-rows tr[data-name=\"orders\"]'); return {"
                     " started: r.querySelector('.started').textContent, err: r.querySelector('.error-rate').textContent,"
                     " sla: r.querySelector('.sla').textContent, risk: r.querySelector('.at-risk').textContent};")
    assert row == {"started": "3", "err": fmt_rate(k["error_rate"]), "sla": fmt_rate(k["sla"]["adherence"]),
                   "risk": str(k["sla"]["at_risk"])}, row

    # per step and per agent
    steps = js(driver, "return Array.from(document.querySelectorAll('#wf-step-rows tr')).map(function (r) { return ["
                       " r.dataset.step, r.querySelector('.attempts').textContent, r.querySelector('.completions').textContent,"
                       " r.querySelector('.failures').textContent, r.querySelector('.refusals').textContent,"
                       " r.querySelector('.error-rate').textContent, r.querySelector('.sla-adherence').textContent]; });")
    assert steps == [[s["name"], str(s["attempts"]), str(s["completions"]), str(s["failures"]), str(s["refusals"]),
                      fmt_rate(s["error_rate"]), fmt_rate(s["sla_adherence"])] for s in k["steps"]], steps
    by_step = {s["name"]: s for s in k["steps"]}
    assert (by_step["order"]["attempts"], by_step["order"]["failures"], by_step["order"]["completions"]) == (2, 1, 1)
    agents = js(driver, "return Array.from(document.querySelectorAll('#wf-agent-rows tr')).map(function (r) { return ["
                        " r.querySelector('.agent').textContent, r.querySelector('.completions').textContent,"
                        " r.querySelector('.failures').textContent, r.querySelector('.refusals').textContent,"
                        " r.querySelector('.error-rate').textContent]; });")
    assert agents == [[a["agent"], str(a["completions"]), str(a["failures"]), str(a.get("refusals", DASH)),
                       fmt_rate(a["error_rate"])] for a in k["agents"]], agents
    assert {"alice", "bob", XSS_AGENT} <= {a[0] for a in agents}

    # another window: the console asks again, and the charts follow (one bar/point per hourly bucket)
    select_option(driver, "#wf-window", "86400")
    wait_js(driver, "return document.getElementById('wf-range').dataset.bucket === '3600'", what="the 24 h window")
    window = shown_window(driver)
    k24 = api_kpis(p, idp, window, "orders")
    assert len(k24["throughput"]["series"]) >= 24
    wait_js(driver, "return document.querySelectorAll('#wf-chart-throughput circle.point-started').length === arguments[0]",
            len(k24["throughput"]["series"]), what="the hourly throughput points")
    check_kpis_match(driver, k24)
    check_charts_match(driver, k24)

    # a workflow nobody worked: empty states, no bars
    select_workflow(driver, "idle")
    wait_js(driver, "return Array.from(document.querySelectorAll('#wf-kpi-panel figure.chart')).every("
                    "function (f) { return f.dataset.state === 'empty'; })", what="the empty charts")
    empty = js(driver, "return Array.from(document.querySelectorAll('#wf-kpi-panel figure.chart .chart-empty'))"
                       ".map(function (n) { return n.textContent; });")
    assert empty == ["No completed instances in this window.", "No instances started or completed in this window.",
                     "No completed instances in this window."], empty
    assert js(driver, "return document.querySelectorAll('#wf-kpi-panel svg').length") == 0
    assert "0 at risk" in driver.find_element(By.CSS_SELECTOR, "#wf-chart-sla").text
    assert driver.find_element(By.CSS_SELECTOR, "#wf-agents-empty").is_displayed()
    assert shown_kpis(driver)["error_rate"] == ""  # no step calls: no rate (null), shown as a dash
    assert browser_problems(driver) == []


# ----------------------------------------------------------------------------- instances and their history
def test_instances_filtered_and_an_instances_history(p, idp, driven, driver):
    By = _by()
    driver.get_log("browser")
    open_workflows(driver, p, idp)
    wait_js(driver, "return document.querySelectorAll('#wf-instance-rows tr').length >= 3", what="the instances")
    listed = js(driver, "return Array.from(document.querySelectorAll('#wf-instance-rows tr')).map(function (r) {"
                        " return [r.dataset.id, r.dataset.state]; });")
    assert [driven.done, "completed"] in listed and [driven.running, "running"] in listed, listed

    select_option(driver, "#wf-filter-state", "completed")
    wait_js(driver, "var rows = Array.from(document.querySelectorAll('#wf-instance-rows tr')); return rows.length > 0 &&"
                    " rows.every(function (r) { return r.dataset.state === 'completed'; });", what="completed only")
    ids = js(driver, "return Array.from(document.querySelectorAll('#wf-instance-rows tr')).map(function (r) { return r.dataset.id; });")
    assert driven.done in ids and driven.running not in ids
    select_option(driver, "#wf-filter-workflow", "idle")
    wait_el(driver, "#wf-instances-empty")
    select_option(driver, "#wf-filter-workflow", "orders")
    select_option(driver, "#wf-filter-state", "")
    wait_js(driver, "return document.querySelectorAll('#wf-instance-rows tr').length === 3", what="the orders instances")

    open_instance(driver, driven.done)
    api = control(p, idp, f"/v1/workflows/instances/{driven.done}").json()
    rows = history(driver)
    assert [(r["step"], r["outcome"], r["agent"], r["status"], r["decision"]) for r in rows] == [
        (e["step"], e["outcome"], e["agent"], str(e["status"]), e["decision_id"]) for e in api["events"]]
    assert [(r["step"], r["outcome"], r["status"]) for r in rows] == [
        ("request", "completed", "201"), ("quote", "completed", "201"), ("quote", "completed", "201"),
        ("order", "failed", "500"), ("order", "completed", "201"), ("receipt", "completed", "201")]
    assert [r["agent"] for r in rows] == ["alice", "alice", "bob", "alice", "alice", "bob"]
    assert rows[3]["cost"] == "0.50 EUR" and rows[4]["cost"] == "2.50 EUR"
    assert all(r["duration"] != DASH for r in rows)
    # the orders were held for a manager: their approval wait, and that a person took part
    assert [r["wait"].endswith("a person took part") for r in rows] == [False, False, False, True, True, False]
    assert all(r["wait"] == DASH for r in rows if r["step"] != "order")
    summary = driver.find_element(By.CSS_SELECTOR, "#wf-instance-summary").text
    assert "completed" in summary and "request, quote, order, receipt" in summary and "3 EUR" in summary, summary
    assert "Cycle time" in summary
    assert objects(driver) == [[o["type"], o["id"], o["step"]] for o in api["objects"]]
    assert {o[0] for o in objects(driver)} >= {"Request", "Ref", "Quote", "Order"}

    driver.find_element(By.CSS_SELECTOR, "#wf-instance-close").click()
    assert not driver.find_element(By.CSS_SELECTOR, "#wf-instance").is_displayed()
    open_instance(driver, driven.running)
    summary = driver.find_element(By.CSS_SELECTOR, "#wf-instance-summary").text
    assert "running" in summary and "Running for" in summary and "order" in summary, summary
    assert [r["step"] for r in history(driver)] == ["request", "quote"]
    assert browser_problems(driver) == []


# ----------------------------------------------------------------------------- attacker-controlled values
def test_markup_in_agent_and_object_ids_is_inert(p, idp, driven, driver):
    By = _by()
    driver.get_log("browser")
    open_workflows(driver, p, idp)
    open_instance(driver, driven.xss)
    rows = history(driver)
    assert [(r["step"], r["agent"]) for r in rows] == [("request", XSS_AGENT)]
    assert f"Ref {XSS_REF}" in rows[0]["objects"]
    assert ["Ref", XSS_REF, "request"] in objects(driver)
    row = js(driver, "return Array.from(document.querySelectorAll('#wf-history-rows tr')).map(function (r) {"
                     " return r.dataset.agent; });")
    assert row == [XSS_AGENT]  # an attribute value, as it was
    if kpis_landed(p, idp):
        select_workflow(driver, "orders")
        wait_js(driver, "var a = arguments; return Array.from(document.querySelectorAll('#wf-agent-rows .agent'))"
                        ".some(function (n) { return n.textContent === a[0]; });", XSS_AGENT, what="the agent row with markup")
    no_alert(driver)
    assert js(driver, "return document.querySelectorAll('img, script:not([src]), [onerror], [onload]').length") == 0
    assert js(driver, "return document.scripts.length") == 1
    # the only SVG on the page is the console's own charts
    assert js(driver, "var all = Array.from(document.querySelectorAll('svg')); return all.length === 3 && all.every("
                      "function (s) { return s.classList.contains('chart-svg') && !!s.closest('figure.chart'); })")
    assert driven.xss in driver.find_element(By.CSS_SELECTOR, "#wf-instance-id").text
    assert browser_problems(driver) == []
