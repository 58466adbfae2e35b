"""The console's Activity and Agents views, and GET /v1/activity behind them.

Real processes on loopback: one `proctor run` (tests/conftest.py's start_proctor:
test IdP, recording echo upstream, tests/data/policies where GET /items/{id} is
allowed and DELETE /items/{id} denied), driven by agents through the proxy and
by people in Debian's headless Chromium:

- the API: approver/operator auth, newest-first summaries, the agent / action /
  decision / record filters, `limit` and `before_sequence` paging, and the
  "audit disabled" answer; plus the block-wise tail reader on a large file;
- an operator watches the activity (allowed and denied rows, filtered by
  agent, the event detail), suspends an agent from the Agents view (its next
  request is refused 403, and the refusal shows in Activity), resumes it (200
  again), and suspends / resumes an action from the Suspensions panel;
- an approver who is not an operator sees the Agents view read-only with the
  API's reason.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, Proctor, start_proctor, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HAVE_BROWSER = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
ADMINS = "proctor-admins"
APPROVERS_AUD = "proctor-approvers"


def _wired() -> bool:
    return "add_activity_routes" in (ROOT / "proxy" / "control" / "api.py").read_text()


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def p(tmp_path_factory, idp, pki, upstream, upstream_tls) -> Proctor:
    proc = start_proctor(tmp_path_factory.mktemp("activity"), idp, pki, upstream, upstream_tls)
    r = httpx.get(f"{proc.control_url}/v1/activity", timeout=5)
    if r.status_code == 404:
        proc.stop()
        pytest.fail("GET /v1/activity is not mounted: build_app must call add_activity_routes(app, runtime) "
                    f"(proxy/control/api.py wired: {_wired()})")
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
    # These views poll; the approvals event stream is tested in test_console_browser.py. Blocking it here
    # keeps a long-lived SSE handler from delaying the proxy's shutdown at teardown (up to its 15 s keep-alive).
    d.execute_cdp_cmd("Network.enable", {})
    d.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/approvals/events*"]})
    yield d
    d.quit()


# ------------------------------------------------------------------------------ helpers
def agent_token(idp, agent: str) -> str:
    return idp.token(agent, groups=["readers"], ttl=600)


def person_token(idp, who: str, *groups: str) -> str:
    return idp.token(who, aud=APPROVERS_AUD, approval_groups=list(groups), ttl=600)


def api(p: Proctor, method: str, path: str, token: str | None, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"{p.control_url}{path}", headers=headers, timeout=10, **kw)


def send(p: Proctor, idp, upstream, agent: str, method: str = "GET", item: str | None = None) -> httpx.Response:
    item = item or uuid.uuid4().hex[:8]
    with httpx.Client(proxy=p.proxy_url_with(agent, agent_token(idp, agent)), timeout=10) as c:
        return c.request(method, f"http://127.0.0.1:{upstream.port}/items/{item}")


def activity(p: Proctor, token: str, **params) -> dict:
    r = api(p, "GET", "/v1/activity", token, params=params)
    assert r.status_code == 200, r.text
    return r.json()


def wait_events(p: Proctor, token: str, n: int, **params) -> list[dict]:
    """Activity for params once it holds at least n events (the audit line follows the response)."""
    out: list[dict] = []

    def ok() -> bool:
        out[:] = activity(p, token, **params)["events"]
        return len(out) >= n

    wait_for(ok, timeout=10, what=f"{n} audit events for {params}")
    return out


# ---------------------------------------------------------------------------- the API
def test_activity_api_auth_filters_and_paging(p, idp, upstream):
    op = person_token(idp, "olga", ADMINS)
    ann = person_token(idp, "ann", "managers")  # an approver, not an operator: may read the activity
    a, b = "act-api-a-" + uuid.uuid4().hex[:6], "act-api-b-" + uuid.uuid4().hex[:6]

    # auth: an approver-audience token, nothing else
    r = api(p, "GET", "/v1/activity", None)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert r.headers["Content-Type"].startswith("application/problem+json")
    assert api(p, "GET", "/v1/activity", agent_token(idp, a)).status_code == 401  # an agent token
    assert api(p, "GET", "/v1/activity", "not.a.jwt").status_code == 401
    expired = idp.token("olga", aud=APPROVERS_AUD, approval_groups=[ADMINS], ttl=-120)
    assert api(p, "GET", "/v1/activity", expired).status_code == 401

    for _ in range(3):
        assert send(p, idp, upstream, a).status_code == 200
    denied = send(p, idp, upstream, a, "DELETE", "x1")
    assert denied.status_code == 403
    assert send(p, idp, upstream, b).status_code == 200
    assert send(p, idp, upstream, b).status_code == 200

    evs = wait_events(p, ann, 4, agent=a)
    assert len(evs) == 4 and all(e["agent"] == a for e in evs)
    seqs = [e["sequence"] for e in evs]
    assert seqs == sorted(seqs, reverse=True), "newest first"
    newest = evs[0]
    assert newest["decision"] == "deny" and newest["status"] == 403 and newest["record"] == "decision"
    assert newest["operation"] == "test.item.delete" and newest["resource"] == 'Item::"x1"'
    assert newest["reasons"] == ["no-item-deletes"] and newest["connector"] == "testsvc"
    assert newest["method"] == "DELETE" and newest["path"] == "/items/x1"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", newest["time"])
    assert newest["decision_id"] and newest["decision_id"] in {d["decision_id"] for d in p.decisions()}
    assert all(e["decision"] == "allow" and e["status"] == 200 for e in evs[1:])
    assert "context" not in json.dumps(evs) and "chain" not in json.dumps(evs)  # summaries, not raw events

    # operators read it too; filters combine
    assert [e["sequence"] for e in activity(p, op, agent=a)["events"]] == seqs
    assert [e["sequence"] for e in activity(p, op, agent=a, decision="deny")["events"]] == [seqs[0]]
    assert [e["sequence"] for e in activity(p, op, agent=a, decision="allow,hold")["events"]] == seqs[1:]
    assert [e["sequence"] for e in activity(p, op, agent=a, action="test.item.read")["events"]] == seqs[1:]
    assert [e["sequence"] for e in activity(p, op, agent=a, action="test.item.*")["events"]] == seqs
    assert activity(p, op, agent=a, action="test.item")["events"] == []  # exact unless it ends with *
    assert activity(p, op, agent=a, record="approval")["events"] == []
    bs = activity(p, op, agent=b)["events"]
    assert len(bs) == 2 and all(e["agent"] == b for e in bs)
    unfiltered = activity(p, op, limit=5)["events"]
    assert len(unfiltered) == 5 and unfiltered[0]["sequence"] >= bs[0]["sequence"]

    # paging: limit, then before_sequence = next_before_sequence until null
    page = activity(p, op, agent=a, limit=3)
    assert [e["sequence"] for e in page["events"]] == seqs[:3]
    assert page["next_before_sequence"] == seqs[2]
    page = activity(p, op, agent=a, limit=3, before_sequence=page["next_before_sequence"])
    assert [e["sequence"] for e in page["events"]] == seqs[3:]
    assert page["next_before_sequence"] is None
    assert [e["sequence"] for e in activity(p, op, agent=a, before_sequence=seqs[1])["events"]] == seqs[2:]
    assert activity(p, op, agent=a, before_sequence=1)["events"] == []
    assert len(activity(p, op, agent=a, limit=0)["events"]) == 1  # clamped to 1..1000
    for bad in ({"limit": "x"}, {"before_sequence": "x"}, {"record": "nope"}, {"agent": "a" * 300}):
        r = api(p, "GET", "/v1/activity", op, params=bad)
        assert r.status_code == 400, (bad, r.text)

    # the kill switch shows up: the suspension itself and the refusal it causes
    r = api(p, "POST", f"/v1/agents/{b}/suspend", op, json={"reason": "api test"})
    assert r.status_code == 201, r.text
    refused = send(p, idp, upstream, b)
    assert refused.status_code == 403 and refused.json()["type"].endswith("/suspended")
    assert api(p, "POST", f"/v1/agents/{b}/resume", op, json={}).status_code == 200
    evs = wait_events(p, op, 5, agent=b)
    assert [e["decision"] for e in evs[:3]] == ["resumed", "deny", "suspended"], evs[:3]
    assert evs[1]["reasons"] == [f"suspended:agent:{b}"] and evs[1]["status"] == 403
    assert evs[2]["record"] == "suspension" and evs[2]["by"] == "olga" and evs[2]["reason"] == "api test"
    assert evs[2]["resource"] == f"agent:{b}"
    assert [e["decision"] for e in activity(p, op, agent=b, record="suspension")["events"]] == ["resumed", "suspended"]


def test_activity_api_when_the_audit_trail_is_disabled(proctor_factory, idp):
    q = proctor_factory({"audit": {"enabled": False}}, name="noaudit")
    r = api(q, "GET", "/v1/activity", person_token(idp, "ann", "managers"))
    assert r.status_code == 200, r.text
    assert r.json()["events"] == [] and r.json()["audit"] == "disabled"
    assert api(q, "GET", "/v1/activity", None).status_code == 401


def test_tail_reader_reads_from_the_end_in_blocks(tmp_path, monkeypatch):
    """A large file: a page costs its own bytes (not the file's), paging by sequence uses a binary search."""
    from proxy.control import activity_api as A

    path = tmp_path / "audit.jsonl"
    n = 20000
    pad = "x" * 400
    with open(path, "w") as f:
        for i in range(1, n + 1):
            ev = {"time": 1_700_000_000_000 + i, "metadata": {"sequence": i},
                  "actor": {"user": {"uid": f"bot-{i % 7}"}}, "api": {"operation": "t.read" if i % 5 else "t.delete"},
                  "resources": [{"name": f'Item::"{i}"'}],
                  "unmapped": {"proctor": {"record": "decision", "decision": "deny" if i % 5 == 0 else "allow", "pad": pad}}}
            f.write(json.dumps(ev) + "\n")
        f.write('{"time": 1, "metadata": {"seq')  # a line still being written
    size = path.stat().st_size
    assert size > 8_000_000

    read = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __getattr__(self, k):
            return getattr(self.f, k)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

        def read(self, *a):
            data = self.f.read(*a)
            read.append(len(data))
            return data

        def readline(self, *a):
            data = self.f.readline(*a)
            read.append(len(data))
            return data

    monkeypatch.setattr(A, "open", lambda *a, **k: Counting(real_open(*a, **k)), raising=False)
    none = A.Filters(None, None, [])
    evs, nxt = A.read_activity(path, 50, none, None)
    assert [e["sequence"] for e in evs] == list(range(n, n - 50, -1)) and nxt == n - 49
    assert sum(read) < 200_000, sum(read)

    read.clear()
    evs, nxt = A.read_activity(path, 10, A.Filters("bot-3", None, ["deny"]), 10_001)
    assert [e["sequence"] for e in evs] == [i for i in range(10_000, 0, -1) if i % 7 == 3 and i % 5 == 0][:10]
    assert all(e["agent"] == "bot-3" and e["decision"] == "deny" for e in evs)
    assert sum(read) < 400_000, sum(read)  # binary search + ~35 events' worth, not the 8 MB before it

    # the scan budget: a short page that says where to go on
    monkeypatch.setattr(A, "SCAN_BUDGET", 1_000_000)
    evs, nxt = A.read_activity(path, 10, A.Filters("nobody", None, []), None)
    assert evs == [] and nxt is not None and 0 < n - nxt < 3000
    evs, nxt2 = A.read_activity(path, 10, A.Filters("nobody", None, []), nxt)
    assert evs == [] and nxt2 < nxt


# ------------------------------------------------------------------------ the console
def _by():
    from selenium.webdriver.common.by import By
    return By


def wait_el(driver, css: str, timeout: float = 10):
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout).until(EC.visibility_of_element_located((_by().CSS_SELECTOR, css)))


def wait_js(driver, script: str, timeout: float = 10, what: str = "condition", *args):
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {value!r})")


def rows(driver) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#activity-rows .activity-row')).map(function (r) {"
        " return {seq: +r.dataset.seq, agent: r.dataset.agent, decision: r.dataset.decision, cls: r.className,"
        " text: r.textContent}; });")


def sign_in(driver, p: Proctor, token: str) -> None:
    By = _by()
    driver.get(f"{p.control_url}/console/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{p.control_url}/console/")
    wait_el(driver, "#token").send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login").click()
    wait_el(driver, "#inbox-view")
    wait_el(driver, "#nav")


def set_filter(driver, css: str, value: str) -> None:
    box = driver.find_element(_by().CSS_SELECTOR, css)
    box.clear()
    if value:
        box.send_keys(value)


def test_operator_watches_activity_and_uses_the_kill_switch(p, idp, upstream, driver):
    By = _by()
    a, b = "ui-a-" + uuid.uuid4().hex[:6], "ui-b-" + uuid.uuid4().hex[:6]
    driver.get_log("browser")
    sign_in(driver, p, person_token(idp, "olga", ADMINS))
    assert send(p, idp, upstream, a).status_code == 200
    assert send(p, idp, upstream, a, "DELETE").status_code == 403
    assert send(p, idp, upstream, b).status_code == 200

    # Activity: live rows, newest first, colour-coded
    driver.find_element(By.CSS_SELECTOR, "#nav-activity").click()
    wait_el(driver, "#activity-view")
    assert driver.current_url.endswith("/console/#activity")
    assert driver.find_element(By.CSS_SELECTOR, "#nav-activity").get_attribute("aria-current") == "page"
    wait_js(driver, "return document.querySelectorAll('#activity-rows .activity-row[data-agent=\"%s\"]').length >= 2" % a,
            what="the agent's rows")
    mine = [r for r in rows(driver) if r["agent"] == a]
    assert [r["decision"] for r in mine[:2]] == ["deny", "allow"], mine
    assert "d-deny" in mine[0]["cls"] and "d-allow" in mine[1]["cls"]
    assert "test.item.delete" in mine[0]["text"] and "no-item-deletes" in mine[0]["text"] and "403" in mine[0]["text"]
    seqs = [r["seq"] for r in rows(driver)]
    assert seqs == sorted(seqs, reverse=True)

    # new traffic appears without a reload (polling every 3 s)
    driver.execute_script("window.__same = true")
    assert send(p, idp, upstream, b, item="live-one").status_code == 200
    wait_js(driver, "return Array.from(document.querySelectorAll('#activity-rows .activity-row')).some("
                    "function (r) { return r.textContent.indexOf('live-one') >= 0; })", timeout=8, what="the live row")
    assert driver.execute_script("return window.__same === true")

    # filter by agent
    set_filter(driver, "#f-agent", b)
    wait_js(driver, "var r = document.querySelectorAll('#activity-rows .activity-row'); return r.length >= 2 && "
                    "Array.from(r).every(function (x) { return x.dataset.agent === %s; })" % json.dumps(b),
            what="only agent b's rows")
    # the event detail
    driver.find_element(By.CSS_SELECTOR, "#activity-rows .activity-row").click()
    detail = wait_el(driver, "#event-detail")
    fields = driver.find_element(By.CSS_SELECTOR, "#event-fields").text
    assert b in fields and "test.item.read" in fields and "allow" in fields, fields
    assert driver.find_element(By.CSS_SELECTOR, '#event-fields dd[data-key="decision_id"]').text.strip()
    driver.find_element(By.CSS_SELECTOR, "#event-close").click()
    assert not detail.is_displayed()

    # Agents: suspend a with a reason (in the page, no window.prompt)
    driver.find_element(By.CSS_SELECTOR, "#nav-agents").click()
    row = wait_el(driver, f'.agent-row[data-id="{a}"]')
    assert row.get_attribute("data-status") == "active"
    assert "active" in row.text
    # the registry's counts (flushed in the background, shown on the next poll)
    wait_js(driver, "var r = document.querySelector('.agent-row[data-id=\"%s\"]');"
                    " return r && r.querySelector('.requests').textContent + '/' + r.querySelector('.denied').textContent === '2/1'" % a,
            what="2 requests, 1 denied")
    row = driver.find_element(By.CSS_SELECTOR, f'.agent-row[data-id="{a}"]')
    row.find_element(By.CSS_SELECTOR, '[data-testid="agent-suspend"]').click()
    wait_el(driver, "#suspend-form")
    assert driver.find_element(By.CSS_SELECTOR, "#suspend-target").text == a
    driver.find_element(By.CSS_SELECTOR, "#suspend-confirm").click()
    assert "reason" in wait_el(driver, "#suspend-error").text.lower()
    driver.find_element(By.CSS_SELECTOR, "#suspend-reason").send_keys("Looping on deletes <b>now</b>")
    driver.find_element(By.CSS_SELECTOR, "#suspend-confirm").click()
    wait_js(driver, "var r = document.querySelector('.agent-row[data-id=\"%s\"]'); return r && r.dataset.status === 'suspended'" % a,
            what="the agent shown suspended")
    assert not driver.find_element(By.CSS_SELECTOR, "#suspend-form").is_displayed()
    assert "Looping on deletes <b>now</b>" in driver.find_element(By.CSS_SELECTOR, f'.agent-row[data-id="{a}"]').text
    assert wait_el(driver, f'.suspension-row[data-kind="agent"][data-target="{a}"]')

    refused = send(p, idp, upstream, a)
    assert refused.status_code == 403, refused.text
    assert refused.json()["type"].endswith("/suspended") and refused.json()["suspended"]["by"] == "olga"
    assert send(p, idp, upstream, b).status_code == 200  # only a is stopped

    # Activity shows the refusal (and the suspension)
    driver.find_element(By.CSS_SELECTOR, "#nav-activity").click()
    set_filter(driver, "#f-agent", a)
    wait_js(driver, "return Array.from(document.querySelectorAll('#activity-rows .activity-row')).some(function (r) {"
                    " return r.dataset.decision === 'deny' && r.textContent.indexOf('suspended:agent:%s') >= 0; })" % a,
            timeout=8, what="the refusal in Activity")
    got = rows(driver)
    assert all(r["agent"] == a for r in got)
    assert got[0]["decision"] == "deny" and got[1]["decision"] == "suspended", got[:2]

    # resume: the agent gets through again
    driver.find_element(By.CSS_SELECTOR, "#nav-agents").click()
    row = wait_el(driver, f'.agent-row[data-id="{a}"][data-status="suspended"]')
    row.find_element(By.CSS_SELECTOR, '[data-testid="agent-resume"]').click()
    wait_js(driver, "var r = document.querySelector('.agent-row[data-id=\"%s\"]'); return r && r.dataset.status === 'active'" % a,
            what="the agent shown active")
    assert send(p, idp, upstream, a).status_code == 200
    assert not driver.find_elements(By.CSS_SELECTOR, f'.suspension-row[data-target="{a}"]')

    # the Suspensions panel: suspend an action, then resume it from the list
    driver.find_element(By.CSS_SELECTOR, "#ns-kind option[value='action']").click()
    driver.find_element(By.CSS_SELECTOR, "#ns-target").send_keys("test.item.read")
    driver.find_element(By.CSS_SELECTOR, "#ns-submit").click()
    assert "required" in wait_el(driver, "#ns-error").text
    driver.find_element(By.CSS_SELECTOR, "#ns-reason").send_keys("reads are misbehaving")
    driver.find_element(By.CSS_SELECTOR, "#ns-submit").click()
    srow = wait_el(driver, '.suspension-row[data-kind="action"][data-target="test.item.read"]')
    assert "reads are misbehaving" in srow.text and "olga" in srow.text
    assert send(p, idp, upstream, b).status_code == 403
    srow.find_element(By.CSS_SELECTOR, '[data-testid="suspension-resume"]').click()
    wait_js(driver, "return !document.querySelector('.suspension-row[data-target=\"test.item.read\"]')", what="resumed")
    assert send(p, idp, upstream, b).status_code == 200

    # a reload keeps the view; everything ran under the CSP, with no alert
    driver.refresh()
    wait_el(driver, "#agents-view")
    logs = driver.get_log("browser")
    assert not [e for e in logs if "Content Security Policy" in e.get("message", "")], logs
    assert not [e for e in logs if e.get("level") == "SEVERE"], logs
    assert driver.execute_script("return document.querySelectorAll('img, b').length") == 0


def test_non_operator_sees_agents_read_only(p, idp, upstream, driver):
    By = _by()
    assert send(p, idp, upstream, "ro-" + uuid.uuid4().hex[:6]).status_code == 200
    sign_in(driver, p, person_token(idp, "ann", "managers"))
    driver.find_element(By.CSS_SELECTOR, "#nav-agents").click()
    note = wait_el(driver, "#agents-readonly").text
    assert "Read-only" in note and "ann is not in the 'proctor-admins' group" in note, note
    assert not driver.find_element(By.CSS_SELECTOR, "#agents-panel").is_displayed()
    assert not driver.find_elements(By.CSS_SELECTOR, "[data-testid='agent-suspend']")
    # the activity is still hers to read
    driver.find_element(By.CSS_SELECTOR, "#nav-activity").click()
    wait_js(driver, "return document.querySelectorAll('#activity-rows .activity-row').length > 0", what="activity rows")
    # and back to the approvals inbox
    driver.find_element(By.CSS_SELECTOR, "#nav-approvals").click()
    wait_el(driver, "#inbox-view")
    assert driver.current_url.endswith("/console/")
