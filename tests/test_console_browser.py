"""The approvals web console in a real browser (Debian's headless Chromium + chromedriver).

Real processes on loopback: `proctor run` (bundled connectors and policies, the
ERP connector pointed at a free port), the mock ERP, and a procurement agent
whose over-10k purchase order is held synchronously while a human approver
works the console: the row appears live, the detail shows the exact request
and what Proctor derived, and approve/deny (with a reason) releases or refuses
the agent's waiting request. Plus: attacker-controlled request data is shown as
text only, and the console is served with a strict CSP and security headers.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip(
        f"the console browser tests need Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); "
        "`make test` installs them (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.select import Select  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parent.parent
PO_PATH = "/sap/opu/odata/sap/API_PURCHASEORDER_PROCESS_SRV/A_PurchaseOrder"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
XSS_IMG = "<img src=x onerror=alert(1)>"
XSS_SCRIPT = "</script><script>alert(1)</script>"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float = 15.0, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- processes
@dataclass
class Env:
    tmp: Path
    state: Path
    proxy_port: int
    control_port: int
    erp_port: int
    issuer: object
    procs: list = field(default_factory=list)
    logs: dict = field(default_factory=dict)

    @property
    def control(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    @property
    def console(self) -> str:
        return f"{self.control}/console/"

    def agent_token(self) -> str:
        return self.issuer.issue("procurement-bot", {"groups": ["procurement"]}, "15m")

    def approver_token(self, who: str, *groups: str) -> str:
        return self.issuer.issue(who, {"approval_groups": list(groups)}, "15m", audience="proctor-approvers")

    def api(self, method: str, path: str, token: str, body: dict | None = None) -> requests.Response:
        with requests.Session() as s:
            s.trust_env = False
            return s.request(method, self.control + path, json=body, timeout=10,
                             headers={"Authorization": f"Bearer {token}"})

    def decisions(self) -> list[dict]:
        path = self.state / "decisions.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def log_tail(self, name: str) -> str:
        p = self.logs.get(name)
        return p.read_text()[-3000:] if p and p.exists() else ""


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("console")
    proxy_port, control_port, erp_port = free_port(), free_port(), free_port()
    connectors = tmp / "connectors"
    connectors.mkdir()
    for manifest in sorted((ROOT / "connectors").glob("*.yaml")):
        text = manifest.read_text()
        if manifest.name == "erp.yaml":
            text = text.replace("127.0.0.1:9103", f"127.0.0.1:{erp_port}").replace("localhost:9103", f"localhost:{erp_port}")
        (connectors / manifest.name).write_text(text)
    cfg_path = tmp / "proctor.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "state_dir": str(tmp / "state"),
        "listen": {"host": "127.0.0.1", "port": proxy_port},
        "control": {"listen": {"host": "127.0.0.1", "port": control_port}},
        "connectors_dir": str(connectors),
        "policies": {"dir": str(ROOT / "policies")},
        "approvals": {"sync_wait_seconds": 60},
    }))
    procs: list[subprocess.Popen] = []
    logs = {"erp": tmp / "erp.log", "proxy": tmp / "proxy.log"}
    try:
        procs.append(subprocess.Popen([sys.executable, "-m", "proxy.demo.mock_erp", "--port", str(erp_port)],
                                      stdout=open(logs["erp"], "w"), stderr=subprocess.STDOUT, cwd=tmp))
        proxy = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c", str(cfg_path)],
                                 stdout=open(logs["proxy"], "w"), stderr=subprocess.STDOUT, cwd=tmp)
        procs.append(proxy)

        def ready() -> bool:
            if proxy.poll() is not None:
                raise AssertionError(f"proctor exited with {proxy.returncode}:\n{logs['proxy'].read_text()[-3000:]}")
            try:
                return requests.get(f"http://127.0.0.1:{control_port}/readyz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, 30, "proctor to be ready", interval=0.1)
        with socket.socket() as s:
            wait_until(lambda: s.connect_ex(("127.0.0.1", erp_port)) == 0, 15, "the mock ERP")

        from proxy.config import load_config
        from proxy.identity.dev_issuer import DevIssuer

        cfg = load_config(cfg_path)
        issuer = DevIssuer(cfg.dev_issuer_dir, cfg.dev_issuer)
        e = Env(tmp, tmp / "state", proxy_port, control_port, erp_port, issuer, procs, logs)
        if requests.get(e.console, timeout=5).status_code == 404:
            pytest.fail("the console is not mounted on the control API: build_app must call add_console_routes(app)")
        yield e
    finally:
        _stop(procs)


@pytest.fixture(scope="module")
def driver():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-proxy-server",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(20)
    yield d
    d.quit()


# ----------------------------------------------------------------------------- helpers
class Agent(threading.Thread):
    """The procurement agent: one POST through the proxy, held there until decided."""

    def __init__(self, env: Env, order: dict, headers: dict | None = None) -> None:
        super().__init__(daemon=True)
        self.env, self.order, self.headers = env, order, headers or {}
        self.response: requests.Response | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        proxy = f"http://procurement-bot:{self.env.agent_token()}@127.0.0.1:{self.env.proxy_port}"
        try:
            with requests.Session() as s:
                s.trust_env = False
                self.response = s.post(f"http://127.0.0.1:{self.env.erp_port}{PO_PATH}", json=self.order,
                                       headers=self.headers, proxies={"http": proxy}, timeout=90)
        except Exception as e:  # noqa: BLE001 - reported by result()
            self.error = e

    def result(self, timeout: float = 20) -> requests.Response:
        self.join(timeout)
        assert not self.is_alive(), "the agent's request is still held"
        assert self.error is None, f"the agent's request failed: {self.error!r}"
        assert self.response is not None
        return self.response


def order(*items: tuple[str, str, str], **extra) -> dict:
    body = {"CompanyCode": "1010", "PurchaseOrderType": "NB", "Supplier": "17300001", "DocumentCurrency": "EUR",
            "to_PurchaseOrderItem": [{"Material": m, "OrderQuantity": q, "NetPriceAmount": p} for m, q, p in items]}
    body.update(extra)
    return body


def pending_ids(env: Env, token: str) -> set[str]:
    r = env.api("GET", "/v1/approvals?state=pending", token)
    assert r.status_code == 200, r.text
    return {a["id"] for a in r.json()["approvals"]}


def new_pending(env: Env, token: str, before: set[str], agent: Agent) -> str:
    def found():
        if not agent.is_alive():
            raise AssertionError(f"the agent's request was not held: {agent.response and agent.response.status_code} "
                                 f"{agent.response and agent.response.text} {agent.error!r}\n{env.log_tail('proxy')}")
        return pending_ids(env, token) - before
    ids = wait_until(found, 15, "the request to be held", interval=0.1)
    assert len(ids) == 1, ids
    return ids.pop()


def wait_el(driver, css: str, timeout: float = 10):
    return WebDriverWait(driver, timeout).until(EC.visibility_of_element_located((By.CSS_SELECTOR, css)))


def text_of(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def wait_text(driver, css: str, predicate, timeout: float = 10, what: str = "") -> str:
    def check(_):
        try:
            t = driver.find_element(By.CSS_SELECTOR, css).text
        except Exception:  # noqa: BLE001 - not there yet
            return False
        return t if predicate(t) else False
    try:
        return WebDriverWait(driver, timeout).until(check)
    except Exception:
        raise AssertionError(f"{css}: {what or 'expected text'} not shown; it says {text_of(driver, css)!r}") from None


def sign_in(driver, env: Env, token: str, live: str = "live") -> None:
    driver.get(env.console)
    driver.execute_script("sessionStorage.clear()")
    driver.get(env.console)
    box = wait_el(driver, "#token")
    box.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#login").click()
    wait_el(driver, "#inbox-view")
    wait_text(driver, "#live-status", lambda t: t == live, what=f"live updates: {live}")


def block_event_stream(driver, blocked: bool) -> None:
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/v1/approvals/events*"] if blocked else []})


def no_alert(driver) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.text  # noqa: B018 - raises when there is no alert


def approval_events(env: Env, approval_id: str, event: str) -> list[dict]:
    return [r for r in env.decisions() if r.get("type") == "approval" and r.get("approval_id") == approval_id
            and r.get("event") == event]


# ----------------------------------------------------------------------------- tests
def test_approve_in_console_releases_the_held_request(env, driver):
    alice = env.approver_token("alice", "procurement-managers")
    sign_in(driver, env, alice)
    assert "alice" in text_of(driver, "#whoami")
    driver.execute_script("window.__sameDocument = true")  # proves the row arrives without a reload

    before = pending_ids(env, alice)
    agent = Agent(env, order(("SERVER-2U", "5", "5200.00")))
    agent.start()
    aid = new_pending(env, alice, before, agent)

    row = wait_el(driver, f'.approval-row[data-id="{aid}"]')
    assert driver.execute_script("return window.__sameDocument === true")
    cells = row.text
    for expected in ("procurement-bot", "erp.purchase_order.create", 'PurchaseOrder::"new"', "procurement-managers", "pending"):
        assert expected in cells, cells

    row.click()
    wait_el(driver, "#detail-view")
    assert driver.current_url.endswith(f"/console/approvals/{aid}")
    wait_text(driver, "#detail-state", lambda t: t == "pending")
    wait_el(driver, "#decide-form")
    assert text_of(driver, "#req-method") == "POST"
    assert text_of(driver, "#req-url").endswith(PO_PATH)
    body = text_of(driver, "#req-body")
    assert "SERVER-2U" in body and '"NetPriceAmount": "5200.00"' in body, body
    assert "application/json" in text_of(driver, "#req-headers")
    # the headers the approval is bound to: present ones with their values, the rest must stay absent
    bound = text_of(driver, "#req-bound-headers")
    assert "content-type" in bound and "application/json" in bound, bound
    assert "authorization" not in bound.lower(), bound
    assert "x-http-method-override" in text_of(driver, "#req-bound-absent")
    attrs = text_of(driver, "#derived-attributes")
    assert "net_amount" in attrs and "26,000" in attrs and "__extn" not in attrs, attrs
    assert "17300001" in attrs and "EUR" in attrs
    assert "erp.purchase_order.create" in text_of(driver, "#derived")
    assert "po-over-10k-needs-approval" in text_of(driver, "#policies")

    # a reason is mandatory
    driver.find_element(By.CSS_SELECTOR, "#approve").click()
    assert "reason" in wait_text(driver, "#error", bool).lower()
    assert agent.is_alive()

    driver.find_element(By.CSS_SELECTOR, "#reason").send_keys("Within the FY27 hardware budget")
    driver.find_element(By.CSS_SELECTOR, "#approve").click()
    resp = agent.result()
    assert resp.status_code == 201, resp.text
    assert resp.json()["d"]["PurchaseOrder"]
    wait_text(driver, "#detail-state", lambda t: t in ("approved", "forwarded"))
    wait_text(driver, "#detail-state", lambda t: t == "forwarded", what="the live update to forwarded")
    assert "You approved" in text_of(driver, "#detail-notice")
    assert "Within the FY27 hardware budget" in text_of(driver, "#votes")
    assert "cannot decide" in text_of(driver, "#cannot-decide")

    recs = wait_until(lambda: approval_events(env, aid, "approved"), 5, "the approved record")
    assert recs[0]["by"] == "alice" and recs[0]["reason"] == "Within the FY27 hardware budget"

    # back in the inbox (pending filter) the decided item is shown as decided
    driver.find_element(By.CSS_SELECTOR, "#back").click()
    wait_el(driver, "#inbox-view")
    assert not driver.find_elements(By.CSS_SELECTOR, f'.approval-row[data-id="{aid}"]')
    Select(driver.find_element(By.CSS_SELECTOR, "#state-filter")).select_by_value("forwarded")
    row = wait_el(driver, f'.approval-row[data-id="{aid}"]')
    assert "forwarded" in row.text


def test_deny_in_console_refuses_the_held_request(env, driver):
    alice = env.approver_token("alice", "procurement-managers")
    # without the event stream, the console falls back to polling every 3 s
    block_event_stream(driver, True)
    try:
        sign_in(driver, env, alice, live="polling")
        before = pending_ids(env, alice)
        agent = Agent(env, order(("GPU-NODE", "3", "7000.00")))
        agent.start()
        aid = new_pending(env, alice, before, agent)
        wait_el(driver, f'.approval-row[data-id="{aid}"]', timeout=8)
    finally:
        block_event_stream(driver, False)

    # the link in approval notifications: <console>/approvals/<id>, and a reload keeps the session
    driver.get(f"{env.control}/console/approvals/{aid}")
    wait_el(driver, "#decide-form")
    assert "21,000" in text_of(driver, "#derived-attributes")

    # the API's own error detail is shown when a decision is refused
    driver.execute_script("var r = document.getElementById('reason'); r.value = 'x'.repeat(2001);")
    driver.find_element(By.CSS_SELECTOR, "#deny").click()
    err = wait_text(driver, "#error", lambda t: "2000" in t, what="the API error detail")
    assert "longer than 2000 characters" in err
    assert agent.is_alive()

    reason = driver.find_element(By.CSS_SELECTOR, "#reason")
    reason.clear()
    reason.send_keys("Not in this quarter's budget")
    driver.find_element(By.CSS_SELECTOR, "#deny").click()
    resp = agent.result()
    assert resp.status_code == 403, resp.text
    wait_text(driver, "#detail-state", lambda t: t == "denied")
    assert not driver.find_element(By.CSS_SELECTOR, "#error").is_displayed()
    assert "already denied" in wait_el(driver, "#cannot-decide").text
    assert not driver.find_element(By.CSS_SELECTOR, "#decide-form").is_displayed()
    recs = wait_until(lambda: approval_events(env, aid, "denied"), 5, "the denied record")
    assert recs[0]["by"] == "alice" and recs[0]["reason"] == "Not in this quarter's budget"


def test_attacker_controlled_request_data_is_shown_as_text(env, driver):
    alice = env.approver_token("alice", "procurement-managers")
    bob = env.approver_token("bob", "sales-managers")  # may look, may not decide
    sign_in(driver, env, bob)
    before = pending_ids(env, alice)
    agent = Agent(
        env,
        order((XSS_IMG, "2", "9000.00"), Note=XSS_SCRIPT),
        # bound headers (limits.context_headers): the only header values approvers are shown
        headers={"X-Request-Id": XSS_SCRIPT, "User-Agent": XSS_IMG},
    )
    agent.start()
    aid = new_pending(env, alice, before, agent)
    try:
        row = wait_el(driver, f'.approval-row[data-id="{aid}"]')
        row.click()
        wait_text(driver, "#detail-state", lambda t: t == "pending")
        body = wait_text(driver, "#req-body", lambda t: XSS_IMG in t)
        assert XSS_SCRIPT in body
        assert XSS_SCRIPT in text_of(driver, "#req-headers")
        assert XSS_IMG in text_of(driver, "#req-bound-headers")
        assert XSS_IMG in text_of(driver, "#derived-fields")
        no_alert(driver)
        assert driver.execute_script("return document.querySelectorAll('img').length") == 0
        assert driver.execute_script("return document.scripts.length") == 1
        assert "cannot decide" in wait_el(driver, "#cannot-decide").text
        assert "not in an approving group" in text_of(driver, "#cannot-decide")
        assert not driver.find_element(By.CSS_SELECTOR, "#decide-form").is_displayed()
        driver.find_element(By.CSS_SELECTOR, "#back").click()
        wait_el(driver, f'.approval-row[data-id="{aid}"]')
        no_alert(driver)

        # the token lives in sessionStorage only, and signing out forgets it
        assert driver.execute_script("return sessionStorage.getItem('proctor.approverToken')") == bob
        assert driver.execute_script("return localStorage.length") == 0
        assert driver.execute_script("return document.cookie") == ""
        driver.find_element(By.CSS_SELECTOR, "#signout").click()
        wait_el(driver, "#login-view")
        assert driver.execute_script("return sessionStorage.length") == 0
        assert not driver.find_elements(By.CSS_SELECTOR, ".approval-row")
        driver.refresh()
        wait_el(driver, "#login-view")
        # an agent token is not an approver token
        driver.find_element(By.CSS_SELECTOR, "#token").send_keys(env.agent_token())
        driver.find_element(By.CSS_SELECTOR, "#login").click()
        assert "Approver authentication failed" in wait_text(driver, "#login-error", bool)
        assert driver.find_element(By.CSS_SELECTOR, "#login-view").is_displayed()
        assert driver.execute_script("return sessionStorage.length") == 0
    finally:
        env.api("POST", f"/v1/approvals/{aid}/deny", alice, {"reason": "test cleanup"})
    assert agent.result().status_code == 403


def test_console_security_headers_and_static_whitelist(env, driver):
    r = requests.get(f"{env.control}/console", allow_redirects=False, timeout=5)
    assert r.status_code in (301, 302, 307, 308) and r.headers["Location"] == "/console/"
    pages = {
        "/console/": "text/html",
        "/console/approvals/apr_x": "text/html",
        "/console/static/index.html": "text/html",
        "/console/static/console.js": "text/javascript",
        "/console/static/console.css": "text/css",
    }
    for path, ctype in pages.items():
        r = requests.get(env.control + path, timeout=5)
        assert r.status_code == 200, path
        assert r.headers["Content-Type"].startswith(ctype), (path, r.headers["Content-Type"])
        assert r.headers["Content-Security-Policy"] == CSP, path
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["Cache-Control"] == "no-store"
        assert "Set-Cookie" not in r.headers
        # nothing from another origin, no inline code
        assert not re.search(r"https?:|//[a-z0-9]|@import|url\(", re.sub(r"/\*.*?\*/", "", r.text, flags=re.S)), path
        if ctype == "text/html":
            assert not re.search(r"<script(?![^>]*\bsrc=)|<style|\son[a-z]+=|style=", r.text, re.I)

    for raw in ("/console/static/../api.py", "/console/static/..%2fapi.py", "/console/static/%2e%2e%2fapi.py",
                "/console/static/..%2f..%2fconsole_routes.py", "/console/static/console_routes.py",
                "/console/static/", "/console/static/.%2fconsole.js", "/console/static/CONSOLE.JS"):
        conn = http.client.HTTPConnection("127.0.0.1", env.control_port, timeout=5)
        conn.request("GET", raw)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        assert resp.status == 404, (raw, resp.status)
        assert b"build_app" not in data and b"add_console_routes" not in data

    # in the browser: the page runs under that CSP without a single violation
    driver.get_log("browser")  # drop earlier entries
    driver.get(env.console)
    wait_el(driver, "#login-view")
    logs = driver.get_log("browser")
    assert not [e for e in logs if "Content Security Policy" in e.get("message", "")], logs
    assert not [e for e in logs if e.get("level") == "SEVERE"], logs
