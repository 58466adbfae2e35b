"""The console's coordination views in a real browser: Claims, the handoff inbox, Duplicates.

Real processes on loopback: one `proctor run` (tests/conftest.py's start_proctor: the
test IdP, tests/data/policies plus a permit and the claim-conflict policy) in front
of a recording "work" upstream (tests/support/work_upstream.py, 201 with a fresh
Location) that a `coordsvc` connector describes:

- `PATCH /incidents/{id}` claims the incident (exclusive, 5 min) and is a handoff
  route: `assigned_to` names an agent, `assignment_group` a group (`service-desk`
  is people: its inbox);
- `POST /orders` is deduplicated on supplier and sku for 10 minutes.

Agents write through the forward proxy with plain HTTP clients; people work the
console in Debian's headless Chromium (chromium + chromium-driver):

- an operator sees an agent's claim (holder, groups, mode, since, until, fence),
  force-releases it after confirming (another agent's next write then passes),
  transfers it to another agent (the old holder is refused, the new one passes),
  and sees the API's problem detail when an action fails;
- a service-desk member takes a handed-off incident from the inbox (agents stay
  refused) and gives it back (the next agent write passes);
- an equivalent order by a second agent (409) and an Idempotency-Key retry
  (replayed) show in Duplicates with the decision they repeated, and the live
  dedupe window and key show for operators;
- a claim whose resource and holder carry HTML/script is shown as text only.
"""

from __future__ import annotations

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

from conftest import DATA, SUPPORT, Proctor, free_port, port_open, start_proctor, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HAVE_BROWSER = Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()
ADMINS = "proctor-admins"
DESK = "service-desk"
APPROVERS_AUD = "proctor-approvers"
XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "</script><script>alert(2)</script>"

CEDAR = """
@id("coordsvc-anyone")
permit (principal, action in [Action::"coord.incident.update", Action::"coord.order.create"], resource);

@id("claim-held-by-another-agent")
@claim("conflict")
forbid (principal, action, resource)
when { context has claim && context.claim.conflict };
"""


def connector(port: int) -> dict:
    body = {"assigned_to": {"path": "assigned_to"}, "assignment_group": {"path": "assignment_group"}}
    return {
        "name": "coordsvc",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [
            {"method": "PATCH", "path": "/incidents/{id}", "action": "coord.incident.update",
             "resource": {"type": "Incident", "id": "{id}"}, "claim": {"mode": "exclusive", "ttl_seconds": 300},
             "body": body,
             "handoff": {"to": {"agent": "assigned_to", "group": "assignment_group"}, "human_groups": [DESK]}},
            {"method": "POST", "path": "/orders", "action": "coord.order.create",
             "resource": {"type": "Order", "id": "new"},
             "body": {"supplier": {"path": "supplier", "type": "string"}, "sku": {"path": "sku", "type": "string"}},
             "dedupe": {"key": ["supplier", "sku"], "window_seconds": 600, "answer": "conflict"}},
        ],
    }


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Work:
    port: int
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Iterator[Work]:
    port = free_port()
    log = tmp_path_factory.mktemp("coord-work") / "received.jsonl"
    proc = subprocess.Popen([sys.executable, str(SUPPORT / "work_upstream.py"), "--port", str(port), "--log", str(log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: port_open(port), what="work upstream")
    yield Work(port, proc)
    proc.terminate()
    proc.wait(5)


@pytest.fixture(scope="module")
def p(tmp_path_factory, idp, pki, upstream, upstream_tls, work) -> Iterator[Proctor]:
    policies = tmp_path_factory.mktemp("coord-policies") / "policies"
    shutil.copytree(DATA / "policies", policies)
    (policies / "coordination.cedar").write_text(CEDAR)
    proc = start_proctor(tmp_path_factory.mktemp("coord-proctor"), idp, pki, upstream, upstream_tls,
                         policies_src=policies, extra_connectors=[connector(work.port)])
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


# ------------------------------------------------------------------------------ helpers
def person(idp, who: str, *groups: str) -> str:
    return idp.token(who, aud=APPROVERS_AUD, approval_groups=list(groups), ttl=600)


def operator(idp) -> str:
    return person(idp, "olga", ADMINS)


def control(p: Proctor, method: str, path: str, token: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, f"{p.control_url}{path}", headers={"Authorization": f"Bearer {token}"},
                         json=body, timeout=10)


def agent_client(p: Proctor, idp, agent: str) -> httpx.Client:
    return httpx.Client(proxy=p.proxy_url_with(agent, idp.token(agent, groups=["writers"], ttl=600)), timeout=20)


def write(p: Proctor, work: Work, idp, agent: str, incident: str, body: dict | None = None) -> httpx.Response:
    with agent_client(p, idp, agent) as c:
        return c.patch(f"http://127.0.0.1:{work.port}/incidents/{incident}", json=body or {"note": "x"})


def order(p: Proctor, work: Work, idp, agent: str, body: dict, key: str | None = None) -> httpx.Response:
    with agent_client(p, idp, agent) as c:
        return c.post(f"http://127.0.0.1:{work.port}/orders", json=body,
                      headers={"Idempotency-Key": key} if key else {})


def claims_on(p: Proctor, idp, resource: str) -> list[dict]:
    r = control(p, "GET", "/v1/claims?connector=coordsvc", operator(idp))
    assert r.status_code == 200, r.text
    return [c for c in r.json()["claims"] if c["resource"] == resource]


def inc() -> str:
    return f"INC-{uuid.uuid4().hex[:10]}"


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


def row_for(driver, table: str, resource: str, timeout: float = 12, what: str = "the row"):
    """The row of `table` (tbody id) whose data-resource is `resource` (compared in JS: any characters)."""
    return wait_js(driver, "var a = arguments; return Array.from(document.querySelectorAll('#' + a[0] + ' tr'))"
                           ".find(function (r) { return r.dataset.resource === a[1]; }) || null;",
                   table, resource, timeout=timeout, what=what)


def no_row_for(driver, table: str, resource: str, timeout: float = 12, what: str = "the row to go") -> None:
    wait_js(driver, "var a = arguments; return !Array.from(document.querySelectorAll('#' + a[0] + ' tr'))"
                    ".some(function (r) { return r.dataset.resource === a[1]; });",
            table, resource, timeout=timeout, what=what)


def text(driver, css: str) -> str:
    return driver.find_element(_by().CSS_SELECTOR, css).text


def wait_text(driver, css: str, predicate, timeout: float = 10, what: str = "text") -> str:
    """The text of a shown element once `predicate` holds for it."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        last = driver.execute_script("var n = document.querySelector(arguments[0]);"
                                     " return n && !n.hidden ? n.textContent : '';", css)
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


def no_alert(driver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when there is no alert


def click(driver, table: str, resource: str, testid: str) -> None:
    """Click a row's button, finding the row and clicking in one script (the list re-renders when it changes)."""
    wait_js(driver, "var a = arguments; var r = Array.from(document.querySelectorAll('#' + a[0] + ' tr'))"
                    ".find(function (r) { return r.dataset.resource === a[1]; });"
                    " var b = r && r.querySelector('[data-testid=\"' + a[2] + '\"]'); if (b) b.click(); return !!b;",
            table, resource, testid, what=f"{testid} on {resource}")


# ----------------------------------------------------------------------------- claims
def test_operator_releases_and_transfers_a_claim(p, work, idp, driver):
    By = _by()
    t = inc()
    res = f'Incident::"{t}"'
    a, b = "coord-a-" + uuid.uuid4().hex[:6], "coord-b-" + uuid.uuid4().hex[:6]
    assert write(p, work, idp, a, t).status_code == 201
    assert write(p, work, idp, b, t).status_code == 409  # a holds it

    sign_in(driver, p, operator(idp))
    go(driver, "claims")
    row = row_for(driver, "claim-rows", res, what="a's claim")
    cells = row.text
    assert a in cells and "coordsvc" in cells and "exclusive" in cells, cells
    assert "groups: writers" in cells and "in 5 min" in cells, cells
    held = claims_on(p, idp, res)[0]
    assert row.get_attribute("data-id") == held["id"] and row.get_attribute("data-holder") == a
    assert row.find_element(By.CSS_SELECTOR, ".fence").text == str(held["fence"])
    assert "live claim" in text(driver, "#claims-count")

    # the connector filter asks the API for that connector's claims only
    from selenium.webdriver.support.select import Select
    Select(driver.find_element(By.CSS_SELECTOR, "#claims-connector")).select_by_value("coordsvc")
    row = row_for(driver, "claim-rows", res, what="the row under the connector filter")

    # force-release: confirmation first (cancel keeps the claim), then released
    click(driver, "claim-rows", res, "claim-release")
    wait_el(driver, "#claim-action")
    assert "Force-release" in text(driver, "#claim-action-title")
    summary = text(driver, "#claim-action-summary")
    assert res in summary and a in summary and held["id"] in summary
    driver.find_element(By.CSS_SELECTOR, "#claim-action-cancel").click()
    assert not driver.find_element(By.CSS_SELECTOR, "#claim-action").is_displayed()
    assert claims_on(p, idp, res), "cancel released nothing"
    click(driver, "claim-rows", res, "claim-release")
    wait_el(driver, "#claim-action-confirm").click()
    notice = wait_text(driver, "#claims-notice", lambda s: "Released" in s, what="the release notice")
    assert res in notice and a in notice
    no_row_for(driver, "claim-rows", res, what="the released claim to leave the list")
    assert claims_on(p, idp, res) == []
    # the next write by another agent passes, and b holds it now (a new tenure: the fence grew)
    assert write(p, work, idp, b, t).status_code == 201
    row = wait_js(driver, "var a = arguments; return Array.from(document.querySelectorAll('#claim-rows tr')).find(function (r) {"
                          " return r.dataset.resource === a[0] && r.dataset.holder === a[1]; }) || null;",
                  res, b, timeout=12, what="b's claim after the refresh")
    b_claim = claims_on(p, idp, res)[0]
    assert b_claim["fence"] > held["fence"]

    # transfer: the agent is required; then b -> a
    click(driver, "claim-rows", res, "claim-transfer")
    wait_el(driver, "#transfer-to")
    assert "Transfer" in text(driver, "#claim-action-title")
    driver.find_element(By.CSS_SELECTOR, "#claim-action-confirm").click()
    assert "Name the agent" in wait_text(driver, "#claim-action-error", bool, what="the missing-agent message")
    driver.find_element(By.CSS_SELECTOR, "#transfer-to").send_keys(a)
    driver.find_element(By.CSS_SELECTOR, "#transfer-groups").send_keys(" writers, ,")  # trimmed, blanks dropped
    driver.find_element(By.CSS_SELECTOR, "#transfer-reason").send_keys("b is off shift")
    driver.find_element(By.CSS_SELECTOR, "#claim-action-confirm").click()
    notice = wait_text(driver, "#claims-notice", lambda s: "Transferred" in s, what="the transfer notice")
    assert f"from {b} to {a}" in notice, notice
    row = wait_js(driver, "var a = arguments; return Array.from(document.querySelectorAll('#claim-rows tr')).find(function (r) {"
                          " return r.dataset.resource === a[0] && r.dataset.holder === a[1]; }) || null;",
                  res, a, timeout=12, what="a's claim after the transfer")
    assert "groups: writers" in row.text
    moved = claims_on(p, idp, res)
    assert [(c["holder"], c["holder_groups"], c["fence"]) for c in moved] == [(a, ["writers"], b_claim["fence"] + 1)]
    recorded = [r for r in p.decisions() if r.get("type") == "claim" and r.get("resource") == res
                and r.get("event") == "transferred"]
    assert recorded and recorded[-1]["by"] == "olga" and recorded[-1]["reason"] == "b is off shift"
    assert write(p, work, idp, b, t).status_code == 409  # the old holder is refused
    until = row.find_element(By.CSS_SELECTOR, ".until .reltime").get_attribute("data-ts")
    assert write(p, work, idp, a, t).status_code == 201  # the new one passes (and renews its claim)
    # a renewal moves only the expiry: updated in place, the row (and its buttons) stay the same elements
    wait_js(driver, "return arguments[0].querySelector('.until .reltime').getAttribute('data-ts') !== arguments[1];",
            row, until, what="the renewed expiry in the same row")

    # a failed action shows the API's problem detail: the claim was released elsewhere meanwhile
    click(driver, "claim-rows", res, "claim-transfer")
    wait_el(driver, "#transfer-to").send_keys(b)
    assert control(p, "POST", f"/v1/claims/{moved[0]['id']}/release", operator(idp)).status_code == 200
    driver.find_element(By.CSS_SELECTOR, "#claim-action-confirm").click()
    err = wait_text(driver, "#claim-action-error", lambda s: "No such claim" in s, what="the 404 problem detail")
    assert moved[0]["id"] in err and "released, expired or never held" in err
    no_row_for(driver, "claim-rows", res, what="the list to be refreshed after the 404")
    driver.find_element(By.CSS_SELECTOR, "#claim-action-cancel").click()
    no_alert(driver)


def test_claims_are_for_operators(p, idp, driver):
    sign_in(driver, p, person(idp, "ann", "procurement-managers"))
    go(driver, "claims")
    note = wait_text(driver, "#claims-readonly", lambda s: "operators" in s, what="the read-only note")
    assert "Not an operator" in note and "ann" in note
    assert not driver.find_element(_by().CSS_SELECTOR, "#claims-panel").is_displayed()


# ----------------------------------------------------------------------------- the handoff inbox
def test_service_desk_takes_and_gives_back_a_handed_off_incident(p, work, idp, driver):
    By = _by()
    t = inc()
    res = f'Incident::"{t}"'
    agent = "coord-e-" + uuid.uuid4().hex[:6]
    assert write(p, work, idp, agent, t).status_code == 201
    assert write(p, work, idp, agent, t, {"assignment_group": DESK}).status_code == 201  # handed to people
    refused = write(p, work, idp, agent, t)
    assert refused.status_code == 409 and refused.json()["claim"]["holder"] == f"group:{DESK}"

    # someone in another group sees nothing of it
    sign_in(driver, p, person(idp, "sam", "finance"))
    go(driver, "handoffs")
    wait_js(driver, "return document.getElementById('handoffs-empty').hidden === false || "
                    "document.querySelectorAll('#handoff-rows tr').length > 0", what="the inbox to load")
    no_row_for(driver, "handoff-rows", res, timeout=2)

    sign_in(driver, p, person(idp, "dana", DESK))
    go(driver, "handoffs")
    row = row_for(driver, "handoff-rows", res, what="the waiting item")
    assert row.get_attribute("data-state") == "waiting" and DESK in row.text and "coordsvc" in row.text
    assert "waiting" in text(driver, "#handoffs-count")
    click(driver, "handoff-rows", res, "handoff-take")
    wait_text(driver, "#handoffs-notice", lambda s: "You took" in s, what="the take notice")
    row = wait_js(driver, "var a = arguments; return Array.from(document.querySelectorAll('#handoff-rows tr')).find(function (r) {"
                          " return r.dataset.resource === a[0] && r.dataset.state === 'taken'; }) || null;",
                  res, what="the taken item")
    assert "by dana (you)" in row.text
    assert [c["holder"] for c in claims_on(p, idp, res)] == ["human:dana"]
    assert write(p, work, idp, agent, t).status_code == 409  # agents stay out while dana has it

    click(driver, "handoff-rows", res, "handoff-give-back")
    wait_el(driver, "#giveback-confirm")
    assert text(driver, "#giveback-resource") == res
    driver.find_element(By.CSS_SELECTOR, "#giveback-yes").click()
    wait_text(driver, "#handoffs-notice", lambda s: "Gave back" in s, what="the give-back notice")
    no_row_for(driver, "handoff-rows", res, what="the item to leave the inbox")
    assert claims_on(p, idp, res) == []
    assert write(p, work, idp, "coord-f-" + uuid.uuid4().hex[:6], t).status_code == 201  # free for agents again
    events = [r["event"] for r in p.decisions() if r.get("type") == "claim" and r.get("resource") == res]
    assert events[-2:] == ["released", "acquired"] and "taken" in events[:-2], events
    taken = [r for r in p.decisions() if r.get("type") == "claim" and r.get("resource") == res and r["event"] in
             ("taken", "released")]
    assert [(r["event"], r.get("by")) for r in taken] == [("taken", "dana"), ("released", "dana")]


# ----------------------------------------------------------------------------- duplicates
def test_suppressed_duplicates_show_with_the_decision_they_repeat(p, work, idp, driver):
    By = _by()
    first_agent, second = "coord-o-" + uuid.uuid4().hex[:6], "coord-p-" + uuid.uuid4().hex[:6]
    po = {"supplier": "S-" + uuid.uuid4().hex[:6], "sku": "SKU-1"}
    first = order(p, work, idp, first_agent, po)
    assert first.status_code == 201, first.text
    dup = order(p, work, idp, second, po)  # the same work by another agent, inside the window
    assert dup.status_code == 409 and dup.json()["first_decision_id"] == first.headers["x-proctor-decision-id"]
    key = str(uuid.uuid4())
    other = {"supplier": "S-" + uuid.uuid4().hex[:6], "sku": "SKU-2"}
    keyed = order(p, work, idp, first_agent, other, key)
    assert keyed.status_code == 201
    replay = order(p, work, idp, first_agent, other, key)  # a retry: the stored answer, not a second order
    assert replay.status_code == 201 and replay.headers.get("idempotent-replayed") == "true"

    sign_in(driver, p, operator(idp))
    go(driver, "duplicates")

    def dup_row(agent: str, outcome: str):
        return wait_js(driver, "var a = arguments; return Array.from(document.querySelectorAll('#duplicate-rows tr')).find("
                               "function (r) { return r.dataset.agent === a[0] && r.dataset.outcome === a[1]; }) || null;",
                       agent, outcome, timeout=15, what=f"{agent}'s {outcome} row")

    refused = dup_row(second, "refused")
    assert refused.get_attribute("data-kind") == "duplicate"
    cells = refused.text
    assert "coord.order.create" in cells and 'Order::"new"' in cells and "duplicate (409)" in cells, cells
    assert refused.find_element(By.CSS_SELECTOR, '[data-testid="duplicate-first"]').text == \
        first.headers["x-proctor-decision-id"]
    assert dup.headers["x-proctor-decision-id"] in cells
    replayed = dup_row(first_agent, "replayed")
    assert "replayed (Idempotency-Key)" in replayed.text
    assert replayed.find_element(By.CSS_SELECTOR, '[data-testid="duplicate-first"]').text == \
        keyed.headers["x-proctor-decision-id"]

    # operators also see what is live: the dedupe window and the key (never the key itself)
    window = wait_js(driver, "return document.querySelector('#window-rows tr[data-kind=\"dedupe\"][data-first=\"'"
                             " + arguments[0] + '\"]');",
                     first.headers["x-proctor-decision-id"], what="the live dedupe window")
    assert "dedupe window" in window.text and "coordsvc" in window.text and "POST /orders" in window.text
    assert "completed (201)" in window.text and first_agent in window.text
    held_key = wait_js(driver, "return document.querySelector('#window-rows tr[data-kind=\"idempotency\"]"
                               "[data-first=\"' + arguments[0] + '\"]');",
                       keyed.headers["x-proctor-decision-id"], what="the live key")
    assert "Idempotency-Key" in held_key.text and f"idem:{first_agent}" in held_key.text
    assert "replayed to retries" in held_key.text
    assert key not in driver.find_element(By.CSS_SELECTOR, "#duplicates-view").text

    # an approver sees the suppressed requests, not the live table
    sign_in(driver, p, person(idp, "ann", "procurement-managers"))
    go(driver, "duplicates")
    dup_row(second, "refused")
    assert "operators" in wait_text(driver, "#windows-readonly", bool, what="the read-only note")
    assert not driver.find_element(By.CSS_SELECTOR, "#windows-panel").is_displayed()


# ----------------------------------------------------------------------------- attacker-controlled values
def test_html_in_claims_is_shown_as_text(p, work, idp, driver):
    By = _by()
    incident = XSS_IMG + "<svg onload=alert(3)>&x"  # (no "/" or ";": they would change the path)
    res = f'Incident::"{incident}"'
    agent = "coord-x-" + uuid.uuid4().hex[:6]
    r = write(p, work, idp, agent, incident)  # httpx percent-encodes the path; Proctor decodes it
    assert r.status_code == 201, r.text
    held = claims_on(p, idp, res)
    assert len(held) == 1, held
    # an operator moves it to a holder whose id and groups are markup too
    moved = control(p, "POST", f"/v1/claims/{held[0]['id']}/transfer", operator(idp),
                    {"to": XSS_SCRIPT + "agent", "groups": [XSS_IMG], "reason": XSS_IMG})
    assert moved.status_code == 200, moved.text

    driver.get_log("browser")
    sign_in(driver, p, operator(idp))
    go(driver, "claims")
    row = row_for(driver, "claim-rows", res, what="the claim with markup in it")
    assert row.find_element(By.CSS_SELECTOR, ".resource").text == res
    holder = row.find_element(By.CSS_SELECTOR, ".holder").text
    assert XSS_SCRIPT + "agent" in holder and XSS_IMG in holder
    click(driver, "claim-rows", res, "claim-release")
    summary = wait_el(driver, "#claim-action-summary").text
    assert res in summary and XSS_SCRIPT in summary
    driver.find_element(By.CSS_SELECTOR, "#claim-action-cancel").click()
    no_alert(driver)
    assert driver.execute_script("return document.querySelectorAll('img, svg').length") == 0
    assert driver.execute_script("return document.scripts.length") == 1
    assert not [e for e in driver.get_log("browser") if "Content Security Policy" in e.get("message", "")]
    control(p, "POST", f"/v1/claims/{moved.json()['claim']['id']}/release", operator(idp))
