"""The bundled connectors and policies end to end: a real `proctor run` in front of the real
mock ERP, ticketing and CRM servers, driven by agents with dev-issuer tokens.

Covers aggregate body values (an order's net amount), creator tracking (no self-approval,
also across a restart) and resource lookups (an incident's assignment group), with the
bundled policies in policies/*.cedar.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import requests
import yaml
from aiohttp import web

from conftest import Proctor, free_port, port_open, wait_for
from proxy.config import load_config
from proxy.demo import mock_crm, mock_erp, mock_ticketing
from proxy.identity.dev_issuer import DevIssuer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PO_SRV = mock_erp.PO_SRV
INC = mock_ticketing.TABLE
SF = mock_crm.BASE
DECISION_HEADER = "X-Proctor-Decision-Id"


# ----------------------------------------------------------------- mock servers


class Mocks:
    """The three bundled mocks on free ports, in one background event loop.

    Each app gets a middleware that records every request it receives (to prove
    what Proctor forwarded) and can be told to answer a method with an error
    status (to make a lookup fail while the rest of the server works).
    """

    def __init__(self) -> None:
        self.apps = {"ticketing": mock_ticketing.build_app(), "crm": mock_crm.build_app(), "erp": mock_erp.build_app()}
        self.ports = {name: free_port() for name in self.apps}
        self.seen: dict[str, list[tuple[str, str]]] = {name: [] for name in self.apps}
        self.fail: dict[str, dict[str, int]] = {name: {} for name in self.apps}
        for name, app in self.apps.items():
            app.middlewares.append(self._middleware(name))
        self.loop = asyncio.new_event_loop()
        self.runners: list[web.AppRunner] = []
        started = threading.Event()
        threading.Thread(target=self._run, args=(started,), daemon=True).start()
        assert started.wait(10)
        for name, port in self.ports.items():
            wait_for(lambda port=port: port_open(port), what=f"mock {name} on {port}")

    def _middleware(self, name: str):
        @web.middleware
        async def record(request: web.Request, handler):
            self.seen[name].append((request.method, request.path_qs))
            status = self.fail[name].get(request.method)
            if status:
                return web.json_response({"error": {"message": "injected failure"}}, status=status)
            return await handler(request)

        return record

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def start() -> None:
            for name, app in self.apps.items():
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", self.ports[name]).start()
                self.runners.append(runner)

        self.loop.run_until_complete(start())
        started.set()
        self.loop.run_forever()

    def close(self) -> None:
        async def stop() -> None:
            for r in self.runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    def url(self, name: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}{path}"

    def forwarded(self, name: str, method: str) -> list[str]:
        return [p for m, p in self.seen[name] if m == method]


# ---------------------------------------------------------------------- proctor


class Env:
    def __init__(self, base: Path, mocks: Mocks) -> None:
        self.base = base
        self.mocks = mocks
        self.down_port = free_port()  # nothing listens here
        conns = base / "connectors"
        conns.mkdir()
        for name, default_port in (("ticketing", 9101), ("crm", 9102), ("erp", 9103)):
            text = (ROOT / "connectors" / f"{name}.yaml").read_text()
            assert f"127.0.0.1:{default_port}" in text
            text = text.replace(f":{default_port}", f":{mocks.ports[name]}")
            (conns / f"{name}.yaml").write_text(text)
        # the ticketing connector again, for a host where nothing listens (lookup network failure)
        down = yaml.safe_load((ROOT / "connectors" / "ticketing.yaml").read_text())
        down["name"] = "ticketing-down"
        down["hosts"] = [f"127.0.0.1:{self.down_port}"]
        (conns / "ticketing-down.yaml").write_text(yaml.safe_dump(down))
        shutil.copytree(ROOT / "policies", base / "policies")
        (base / "policies" / "llm.cedar").unlink()  # no LLM connector here (tests/test_llm_connector.py)
        self.port, self.control_port = free_port(), free_port()
        self.config_path = base / "proctor.yaml"
        self.config_path.write_text(yaml.safe_dump({
            "state_dir": "state",
            "listen": {"host": "127.0.0.1", "port": self.port},
            "control": {"listen": {"host": "127.0.0.1", "port": self.control_port}},
            "connectors_dir": "connectors",
            "policies": {"dir": "policies"},
            # po-over-10k-needs-approval carries @approval: with approvals on, such an
            # order is held for a person; these tests want the plain refusal.
            "approvals": {"enabled": False},
        }))
        self.starts = 0
        self.p = self.start()
        config = load_config(self.config_path)
        issuer = DevIssuer(config.dev_issuer_dir, config.dev_issuer)
        self.tokens = {
            "procurement-bot": issuer.issue("procurement-bot", {"groups": ["procurement", "procurement-approvers"]}),
            "finance-bot": issuer.issue("finance-bot", {"groups": ["procurement-approvers"]}),
            "support-bot": issuer.issue("support-bot", {"groups": ["support"], "assignment_group": "service-desk"}),
            "support-bot-2": issuer.issue("support-bot-2", {"groups": ["support"], "assignment_group": "service-desk"}),
            # a support agent of the network team (its own group's incidents only)
            "network-bot": issuer.issue("network-bot", {"groups": ["support"], "assignment_group": "network"}),
            "procurement-bot-2": issuer.issue("procurement-bot-2", {"groups": ["procurement"]}),
            "sales-bot": issuer.issue("sales-bot", {"groups": ["sales"]}),
        }
        # a person of the service desk, for the claims inbox (an approver token)
        self.desk_token = issuer.issue("sam.desk", {config.approvals.approver_groups_claim: ["service-desk"]},
                                       audience=config.approvals.approver_audience)
        self.session = requests.Session()
        self.session.trust_env = False

    def start(self) -> Proctor:
        self.starts += 1
        log_path = self.base / f"proctor-{self.starts}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "run", "-c", str(self.config_path), "--log-level", "info"],
            stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=str(self.base),
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"proctor exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                return httpx.get(f"http://127.0.0.1:{self.control_port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=30, what="proctor readiness")
        return Proctor(dir=self.base, config_path=self.config_path, port=self.port, control_port=self.control_port,
                       gateway_port=0, proc=proc, log_path=log_path,
                       ca_pem=self.base / "state" / "ca" / "mitmproxy-ca-cert.pem", policies_dir=self.base / "policies")

    def restart(self) -> None:
        self.p.stop()
        self.p = self.start()

    def call(self, agent: str, method: str, url: str, **kw) -> requests.Response:
        proxies = {"http": self.p.proxy_url_with(agent, self.tokens[agent])}
        return self.session.request(method, url, proxies=proxies, timeout=15, **kw)

    def decision_of(self, r: requests.Response) -> dict:
        did = r.headers[DECISION_HEADER]
        wait_for(lambda: any(d["decision_id"] == did for d in self.p.decisions()), timeout=5, what="decision record")
        return self.p.decision(did)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mocks = Mocks()
    e = Env(tmp_path_factory.mktemp("bundled"), mocks)
    yield e
    e.p.stop()
    mocks.close()


def assert_refused(r: requests.Response, status: int, reasons: list[str] | None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == status
    if reasons is not None:
        assert body["reasons"] == reasons, body
    return body


# ------------------------------------------------------------------------- ERP


_ORDER_TAGS = itertools.count(1)


def po_body(*items: tuple, supplier: str = "17300001", tag: int | None = None) -> dict:
    """An order whose materials are unique to this call (unless `tag` repeats one): the
    bundled route suppresses an equal order (same supplier and items) for 10 minutes."""
    tag = next(_ORDER_TAGS) if tag is None else tag
    return {
        "CompanyCode": "1010",
        "Supplier": supplier,
        "DocumentCurrency": "EUR",
        "to_PurchaseOrderItem": [
            {"Material": f"MAT-{tag}-{i}", "OrderQuantity": q, "NetPriceAmount": p} for i, (q, p) in enumerate(items)
        ],
    }


SMALL = ((10, "120.50"), ("2", 99.99))  # net amount 1404.98


def create_po(env: Env, agent: str, *items: tuple) -> requests.Response:
    return env.call(agent, "POST", env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder"), json=po_body(*items))


def release(env: Env, agent: str, po: str) -> requests.Response:
    return env.call(agent, "POST", env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder('{po}')/Release"))


def mock_orders(env: Env) -> dict[str, dict]:
    r = requests.get(env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder?$expand=to_PurchaseOrderItem"), timeout=5)
    return {o["PurchaseOrder"]: o for o in r.json()["d"]["results"]}


def releases(env: Env, po: str) -> int:
    return env.mocks.apps["erp"][mock_erp.RELEASES].get(po, 0)


def test_erp_small_order_is_created_with_its_net_amount(env):
    r = create_po(env, "procurement-bot", *SMALL)
    assert r.status_code == 201, r.text
    po = r.json()["d"]["PurchaseOrder"]
    assert [i["NetPriceAmount"] for i in mock_orders(env)[po]["to_PurchaseOrderItem"]["results"]] == ["120.50", "99.99"]
    rec = env.decision_of(r)
    assert (rec["agent"], rec["action"], rec["resource"], rec["decision"]) == (
        "procurement-bot", "erp.purchase_order.create", 'PurchaseOrder::"new"', "allow")
    assert rec["reasons"] == ["procurement-create-orders"] and rec["status"] == rec["upstream_status"] == 201
    assert rec["risk"] == "high" and rec["connector"] == "erp"
    # The decision record keeps what Cedar saw (typed values, not the raw body), and
    # `proctor policy explain` derives the same for the same request.
    assert rec["cedar"]["context"]["fields"]["net_amount"] == {"__extn": {"fn": "decimal", "arg": "1404.98"}}
    assert rec["cedar"]["resource"]["attrs"]["net_amount"] == {"__extn": {"fn": "decimal", "arg": "1404.98"}}
    assert "body" not in rec["cedar"]["context"] and rec["cedar"]["unrecorded"] == ["body"]
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "policy", "explain", "--json", "-c", str(env.config_path),
         "--agent", "procurement-bot", "--claim", 'groups=["procurement"]', "--",
         "curl", "-X", "POST", env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder"),
         "-H", "Content-Type: application/json", "-d", json.dumps(po_body(*SMALL))],
        capture_output=True, text=True, timeout=30, cwd=str(env.base),
    )
    assert out.returncode == 0, out.stderr
    ex = json.loads(out.stdout)
    want = {"__extn": {"fn": "decimal", "arg": "1404.98"}}
    assert ex["decision"] == "allow" and ex["reasons"] == ["procurement-create-orders"]
    assert ex["context"]["fields"]["net_amount"] == want and ex["context"]["fields"]["item_count"] == 2
    assert ex["resource"]["attrs"]["net_amount"] == want  # resource_attributes: [net_amount]


def test_erp_order_over_10k_is_refused_and_never_reaches_the_erp(env):
    before = set(mock_orders(env))
    posts = len(env.mocks.forwarded("erp", "POST"))
    r = create_po(env, "procurement-bot", (100, "99.99"), (1, "10.02"))  # 9999 + 10.02 = 10009.02
    body = assert_refused(r, 403, ["po-over-10k-needs-approval"])
    assert body["action"] == "erp.purchase_order.create" and body["agent"] == "procurement-bot"
    assert set(mock_orders(env)) == before
    assert len(env.mocks.forwarded("erp", "POST")) == posts
    # exactly at the threshold is fine (greaterThan 10000.0); a cent over is not
    assert create_po(env, "procurement-bot", (1, "10000.00")).status_code == 201
    assert_refused(create_po(env, "procurement-bot", (4, "2500.0025")), 403, ["po-over-10k-needs-approval"])
    # a wrongly typed amount is a 400 naming the value, not a guess
    bad = create_po(env, "procurement-bot", (1, "ten"))
    assert_refused(bad, 400, None)
    assert "net_amount" in bad.json()["detail"]


def test_erp_no_self_approval_then_an_approver_releases(env):
    r = create_po(env, "procurement-bot", *SMALL)
    assert r.status_code == 201, r.text
    po = r.json()["d"]["PurchaseOrder"]
    assert_refused(release(env, "procurement-bot", po), 403, ["no-self-approval"])
    assert releases(env, po) == 0
    assert mock_orders(env)[po]["ReleaseStatus"] == "NOT_RELEASED"
    r = release(env, "finance-bot", po)
    assert r.status_code == 200, r.text
    assert releases(env, po) == 1 and mock_orders(env)[po]["ReleaseStatus"] == "RELEASED"
    rec = env.decision_of(r)
    assert rec["reasons"] == ["approvers-release-orders"] and rec["resource"] == f'PurchaseOrder::"{po}"'
    # the release looked the order up on the ERP first (with its items expanded)
    assert any(p.startswith(f"{PO_SRV}/A_PurchaseOrder('{po}')?") and "expand=to_PurchaseOrderItem" in p
               for p in env.mocks.forwarded("erp", "GET"))


def test_erp_agent_outside_the_approvers_cannot_release(env):
    r = create_po(env, "procurement-bot", *SMALL)
    po = r.json()["d"]["PurchaseOrder"]
    assert_refused(release(env, "sales-bot", po), 403, [])
    assert_refused(create_po(env, "support-bot", *SMALL), 403, [])
    assert releases(env, po) == 0


def test_erp_order_created_outside_proctor_has_no_creator(env):
    # Documented behaviour: Proctor only knows the creators of orders created through it;
    # without a record there is no resource.created_by and no-self-approval cannot apply.
    r = requests.post(env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder"), json=po_body(*SMALL), timeout=5)
    assert r.status_code == 201
    po = r.json()["d"]["PurchaseOrder"]
    r = release(env, "procurement-bot", po)
    assert r.status_code == 200, r.text
    assert releases(env, po) == 1
    # the seeded order (created by a human in the ERP) likewise
    assert mock_orders(env)["4500000001"]["CreatedByUser"] == "J.DOE"


@pytest.mark.parametrize("key", ["45", "45000000011", "450000000A", "45000000%201"])
def test_erp_malformed_order_key_is_a_400(env, key):
    n = len(env.mocks.seen["erp"])
    r = release(env, "finance-bot", key)
    body = assert_refused(r, 400, None)
    assert "pattern" in body["detail"]
    assert len(env.mocks.seen["erp"]) == n  # neither looked up nor forwarded


def test_erp_key_that_breaks_the_odata_syntax_is_unclassified(env):
    n = len(env.mocks.seen["erp"])
    r = release(env, "finance-bot", "4500000001' or '1")  # no route matches: egress default-deny
    assert_refused(r, 403, ["egress-default-deny"])
    assert len(env.mocks.seen["erp"]) == n


def test_erp_reads_are_allowed_for_procurement(env):
    r = env.call("procurement-bot", "GET", env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder('4500000001')"))
    assert r.status_code == 200 and r.json()["d"]["Supplier"] == "17300001"
    r = env.call("procurement-bot", "GET", env.mocks.url("erp", "/sap/opu/odata/sap/API_BUSINESS_PARTNER/A_Supplier?$top=2"))
    assert r.status_code == 200 and len(r.json()["d"]["results"]) == 2


def test_erp_order_without_items_reaches_the_erp(env):
    body = po_body(*SMALL)
    del body["to_PurchaseOrderItem"]
    r = env.call("procurement-bot", "POST", env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder"), json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "ME/062"  # the ERP's own answer


def test_erp_creator_survives_a_restart(env):
    r = create_po(env, "procurement-bot", *SMALL)
    assert r.status_code == 201
    po = r.json()["d"]["PurchaseOrder"]
    assert (env.base / "state" / "proctor.db").exists()
    env.restart()
    assert_refused(release(env, "procurement-bot", po), 403, ["no-self-approval"])
    assert releases(env, po) == 0
    r = release(env, "finance-bot", po)
    assert r.status_code == 200, r.text
    assert releases(env, po) == 1


# ------------------------------------------------------------------- ticketing


def new_incident(env: Env, group, **extra) -> str:
    r = requests.post(env.mocks.url("ticketing", INC),
                      json={"short_description": "test", "assignment_group": group, **extra}, timeout=5)
    assert r.status_code == 201
    return r.json()["result"]["sys_id"]


def incident(env: Env, sys_id: str) -> dict:
    return requests.get(env.mocks.url("ticketing", f"{INC}/{sys_id}"), timeout=5).json()["result"]


def update(env: Env, sys_id: str, body: dict, method: str = "PATCH", port: int | None = None) -> requests.Response:
    url = f"http://127.0.0.1:{port}{INC}/{sys_id}" if port else env.mocks.url("ticketing", f"{INC}/{sys_id}")
    return env.call("support-bot", method, url, json=body)


def test_ticketing_own_group_incident_is_updated(env):
    seeded = {i["assignment_group"]: i["sys_id"]
              for i in requests.get(env.mocks.url("ticketing", INC), timeout=5).json()["result"]}
    sd = seeded["service-desk"]
    r = update(env, sd, {"state": "2"})
    assert r.status_code == 200, r.text
    assert incident(env, sd)["state"] == "2"
    assert env.decision_of(r)["reasons"] == ["support-update-own-group-incidents"]
    # PUT is the same action, decided the same way
    assert update(env, sd, {"state": "3"}, method="PUT").status_code == 200
    assert incident(env, sd)["state"] == "3"


def test_ticketing_other_groups_incident_is_refused_by_the_lookup(env):
    seeded = {i["assignment_group"]: i["sys_id"]
              for i in requests.get(env.mocks.url("ticketing", INC), timeout=5).json()["result"]}
    net = seeded["network"]
    patches = len(env.mocks.forwarded("ticketing", "PATCH"))
    r = update(env, net, {"state": "2"})  # the body says nothing about the group
    body = assert_refused(r, 403, [])
    assert body["resource"] == f'Incident::"{net}"'
    assert incident(env, net)["state"] == "1"
    assert len(env.mocks.forwarded("ticketing", "PATCH")) == patches
    # the lookup asked the ticketing system for the incident's group
    assert any(p.startswith(f"{INC}/{net}?sysparm_fields=assignment_group,state")
               for p in env.mocks.forwarded("ticketing", "GET"))


def test_ticketing_reassigning_away_is_refused(env):
    sys_id = new_incident(env, "service-desk")
    assert_refused(update(env, sys_id, {"assignment_group": "network"}), 403, ["no-reassigning-incidents-away"])
    assert incident(env, sys_id)["assignment_group"] == "service-desk"
    # claiming one's own group in the body does not open another group's incident
    other = new_incident(env, "network")
    assert_refused(update(env, other, {"assignment_group": "service-desk", "state": "2"}), 403, [])
    assert incident(env, other)["assignment_group"] == "network"


def test_ticketing_resolve_needs_a_close_code(env):
    sys_id = new_incident(env, "service-desk")
    assert_refused(update(env, sys_id, {"state": "6"}), 403, ["resolve-needs-close-code"])
    assert incident(env, sys_id)["state"] == "1"
    r = update(env, sys_id, {"state": "6", "close_code": "Solved (Permanently)"})
    assert r.status_code == 200, r.text
    assert incident(env, sys_id)["state"] == "6" and incident(env, sys_id)["close_code"] == "Solved (Permanently)"


def test_ticketing_unknown_incident_lacks_the_attributes(env):
    # a 404 on the lookup is not a failure: the attributes are absent and no permit applies
    r = update(env, "0" * 32, {"state": "2"})
    assert_refused(r, 403, [])


def test_ticketing_lookup_5xx_fails_closed(env):
    sys_id = new_incident(env, "service-desk")
    patches = len(env.mocks.forwarded("ticketing", "PATCH"))
    env.mocks.fail["ticketing"]["GET"] = 503
    try:
        r = update(env, sys_id, {"state": "2"})
    finally:
        env.mocks.fail["ticketing"].clear()
    body = assert_refused(r, 503, ["resource-lookup-failed"])
    assert body["title"] == "Resource lookup failed" and "503" in body["detail"]
    assert len(env.mocks.forwarded("ticketing", "PATCH")) == patches
    assert incident(env, sys_id)["state"] == "1"
    assert env.decision_of(r)["reasons"] == ["resource-lookup-failed"]
    # the ticketing system is back: the same update goes through
    assert update(env, sys_id, {"state": "2"}).status_code == 200


def test_ticketing_lookup_wrong_type_fails_closed(env):
    sys_id = new_incident(env, 42)  # the upstream's answer does not fit the manifest (string)
    patches = len(env.mocks.forwarded("ticketing", "PATCH"))
    body = assert_refused(update(env, sys_id, {"state": "2"}), 503, ["resource-lookup-failed"])
    assert "does not fit the manifest" in body["detail"]
    assert len(env.mocks.forwarded("ticketing", "PATCH")) == patches


def test_ticketing_lookup_network_failure_fails_closed(env):
    # connector ticketing-down: the same routes for a host where nothing listens
    body = assert_refused(update(env, "a" * 32, {"state": "2"}, port=env.down_port), 503, ["resource-lookup-failed"])
    assert body["resource"] == f'Incident::"{"a" * 32}"' and "not forwarded" in body["detail"]


# ------------------------------------------------------------------------- CRM


def crm_ids(env: Env, sobject: str) -> list[str]:
    r = requests.get(env.mocks.url("crm", f"{SF}/sobjects/{sobject}"), timeout=5)
    return [i["Id"] for i in r.json()["recentItems"]]


def test_crm_sales_reads_and_creates_but_never_closes_won(env):
    acc = crm_ids(env, "Account")[0]
    r = env.call("sales-bot", "GET", env.mocks.url("crm", f"{SF}/sobjects/Account/{acc}"))
    assert r.status_code == 200 and r.json()["Name"] == "Acme Corporation"
    opp = crm_ids(env, "Opportunity")[0]
    patches = len(env.mocks.forwarded("crm", "PATCH"))
    r = env.call("sales-bot", "PATCH", env.mocks.url("crm", f"{SF}/sobjects/Opportunity/{opp}"),
                 json={"StageName": "Closed Won"})
    assert_refused(r, 403, ["agents-never-close-won"])
    assert len(env.mocks.forwarded("crm", "PATCH")) == patches
    r = requests.get(env.mocks.url("crm", f"{SF}/sobjects/Opportunity/{opp}"), timeout=5)
    assert r.json()["StageName"] == "Prospecting"
    # other stage changes are fine
    r = env.call("sales-bot", "PATCH", env.mocks.url("crm", f"{SF}/sobjects/Opportunity/{opp}"),
                 json={"StageName": "Negotiation/Review"})
    assert r.status_code == 204, r.text
    r = env.call("sales-bot", "POST", env.mocks.url("crm", f"{SF}/sobjects/Opportunity"),
                 json={"Name": "Globex expansion", "StageName": "Prospecting", "Amount": 50000, "AccountId": acc,
                       "CloseDate": "2026-12-31"})
    assert r.status_code == 201, r.text
    assert r.json()["id"] in crm_ids(env, "Opportunity")
    r = env.call("sales-bot", "POST", env.mocks.url("crm", f"{SF}/sobjects/Opportunity"),
                 json={"Name": "Instant win", "StageName": "Closed Won", "AccountId": acc})
    assert_refused(r, 403, ["agents-never-close-won"])


def test_crm_is_closed_to_other_agents(env):
    acc = crm_ids(env, "Account")[0]
    assert_refused(env.call("support-bot", "GET", env.mocks.url("crm", f"{SF}/sobjects/Account/{acc}")), 403, [])
    # an account update is not among sales' permitted actions either
    r = env.call("sales-bot", "PATCH", env.mocks.url("crm", f"{SF}/sobjects/Account/{acc}"), json={"Industry": "Energy"})
    assert_refused(r, 403, [])


# ---------------------------------------------------------------- coordination


def test_ticketing_update_claims_the_incident_for_15_minutes(env):
    """The bundled ticketing connector: an agent's first update claims the incident
    (exclusive, 900 s); another support agent's update gets 409 naming the holder."""
    sys_id = new_incident(env, "service-desk")
    url = env.mocks.url("ticketing", f"{INC}/{sys_id}")
    r = env.call("support-bot", "PATCH", url, json={"state": "2"})
    assert r.status_code == 200, r.text
    claim_id, *params = [p.strip() for p in r.headers["Proctor-Claim"].split(";")]
    assert claim_id.startswith("clm_") and "mode=exclusive" in params
    expires = next(p.split("=", 1)[1] for p in params if p.startswith("expires="))
    ttl = datetime.fromisoformat(expires.replace("Z", "+00:00")).timestamp() - time.time()
    assert 880 < ttl <= 901, ttl

    patches = len(env.mocks.forwarded("ticketing", "PATCH"))
    refused = env.call("support-bot-2", "PATCH", url, json={"state": "3", "work_notes": "mine now"})
    body = assert_refused(refused, 409, ["claim-held-by-another-agent"])
    assert body["claim"]["holder"] == "support-bot" and body["claim"]["id"] == claim_id
    assert body["claim"]["mode"] == "exclusive" and body["claim"]["until"] == expires
    assert 880 < int(refused.headers["Retry-After"]) <= 900
    assert "support-bot" in body["detail"] and expires in body["detail"]
    assert len(env.mocks.forwarded("ticketing", "PATCH")) == patches  # never reached the ticketing system
    assert incident(env, sys_id)["state"] == "2"
    rec = env.decision_of(refused)
    assert rec["decision"] == "deny" and rec["status"] == 409 and rec["refusal"]["kind"] == "claim-conflict"

    # reads are not blocked; the holder's PUT renews the same claim (PATCH and PUT share it)
    assert env.call("support-bot-2", "GET", url).status_code == 200
    renewed = env.call("support-bot", "PUT", url, json={"state": "3"})
    assert renewed.status_code == 200, renewed.text
    assert renewed.headers["Proctor-Claim"].split(";")[0] == claim_id
    assert incident(env, sys_id)["state"] == "3"


def test_ticketing_claims_are_per_incident(env):
    """A claim on one incident leaves the group's other incidents to other agents."""
    first, second = new_incident(env, "service-desk"), new_incident(env, "service-desk")
    assert env.call("support-bot", "PATCH", env.mocks.url("ticketing", f"{INC}/{first}"),
                    json={"state": "2"}).status_code == 200
    r = env.call("support-bot-2", "PATCH", env.mocks.url("ticketing", f"{INC}/{second}"), json={"state": "2"})
    assert r.status_code == 200, r.text
    assert_refused(env.call("support-bot", "PATCH", env.mocks.url("ticketing", f"{INC}/{second}"),
                            json={"state": "3"}), 409, ["claim-held-by-another-agent"])


def claim_events(env: Env, sys_id: str) -> list[dict]:
    return [r for r in env.p.decisions() if r.get("type") == "claim" and r["resource"] == f'Incident::"{sys_id}"']


def inbox(env: Env) -> list[dict]:
    r = httpx.get(f"http://127.0.0.1:{env.control_port}/v1/claims/inbox",
                  headers={"Authorization": f"Bearer {env.desk_token}"}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def test_ticketing_reassignment_to_a_colleague_hands_the_claim_over(env):
    """The bundled ticketing connector: an update naming another agent in assigned_to is a
    handoff. Once the ticketing system accepts it the claim is that agent's: its update
    passes, and the agent that handed it over gets 409 naming the new holder."""
    sys_id = new_incident(env, "service-desk")
    url = env.mocks.url("ticketing", f"{INC}/{sys_id}")
    first = env.call("support-bot", "PATCH", url, json={"state": "2"})
    assert first.status_code == 200, first.text
    handed = env.call("support-bot", "PATCH", url, json={"assigned_to": "support-bot-2", "work_notes": "Handing over"})
    assert handed.status_code == 200, handed.text
    assert env.decision_of(handed)["reasons"] == ["support-update-own-group-incidents"]
    assert incident(env, sys_id)["assigned_to"] == "support-bot-2"
    assert incident(env, sys_id)["assignment_group"] == "service-desk"  # the group stays
    wait_for(lambda: any(e["event"] == "handoff" for e in claim_events(env, sys_id)), timeout=5, what="handoff event")
    ev = next(e for e in claim_events(env, sys_id) if e["event"] == "handoff")
    assert (ev["holder"], ev["to"], ev["by"], ev["fence"]) == ("support-bot", "support-bot-2", "support-bot", 2)
    assert ev["decision_id"] == handed.headers[DECISION_HEADER]

    took = env.call("support-bot-2", "PATCH", url, json={"state": "3", "work_notes": "Picked up"})
    assert took.status_code == 200, took.text
    assert "fence=2" in took.headers["Proctor-Claim"]  # the handed-over tenure, renewed
    assert incident(env, sys_id)["state"] == "3"

    patches = len(env.mocks.forwarded("ticketing", "PATCH"))
    late = env.call("support-bot", "PATCH", url, json={"work_notes": "Any news?"})
    body = assert_refused(late, 409, ["claim-held-by-another-agent"])
    assert body["claim"]["holder"] == "support-bot-2" and "support-bot-2" in body["detail"]
    assert len(env.mocks.forwarded("ticketing", "PATCH")) == patches


def test_ticketing_reassignment_to_the_service_desk_goes_to_its_inbox(env):
    """Naming a group and no agent gives the incident to that group's people: every agent's
    write gets 409 naming the group, and the service desk sees the item in its inbox."""
    sys_id = new_incident(env, "service-desk")
    url = env.mocks.url("ticketing", f"{INC}/{sys_id}")
    assert env.call("support-bot", "PATCH", url, json={"state": "2"}).status_code == 200
    r = env.call("support-bot", "PATCH", url,
                 json={"assignment_group": "service-desk", "assigned_to": "", "work_notes": "Needs a person"})
    assert r.status_code == 200, r.text
    wait_for(lambda: any(e["event"] == "handoff" for e in claim_events(env, sys_id)), timeout=5, what="handoff event")
    ev = next(e for e in claim_events(env, sys_id) if e["event"] == "handoff")
    assert (ev["holder"], ev.get("to"), ev["to_queue"], ev["by"]) == ("support-bot", None, "service-desk", "support-bot")
    items = [i for i in inbox(env) if i["claim"]["resource"] == f'Incident::"{sys_id}"']
    assert [(i["group"], i["taken_by"], i["claim"]["holder"]) for i in items] == [
        ("service-desk", None, "group:service-desk")]
    # it waits for people for a day (human_ttl_seconds), not the agents' 15 minutes
    until = datetime.fromisoformat(items[0]["claim"]["expires_at"].replace("Z", "+00:00")).timestamp()
    assert 86400 - 60 < until - time.time() <= 86400
    for agent in ("support-bot", "support-bot-2"):
        body = assert_refused(env.call(agent, "PATCH", url, json={"state": "3"}), 409, ["claim-held-by-another-agent"])
        assert body["claim"]["holder"] == "group:service-desk"


def test_ticketing_another_team_returns_its_incident_to_the_service_desk_but_pushes_it_nowhere_else(env):
    """no-reassigning-incidents-away, narrowed: an agent may hand its own incident to the
    human service desk (another group), still not to a third team."""
    sys_id = new_incident(env, "network")
    url = env.mocks.url("ticketing", f"{INC}/{sys_id}")
    assert env.call("network-bot", "PATCH", url, json={"state": "2"}).status_code == 200
    away = env.call("network-bot", "PATCH", url, json={"assignment_group": "database"})
    assert_refused(away, 403, ["no-reassigning-incidents-away"])
    assert incident(env, sys_id)["assignment_group"] == "network"
    # a refused reassignment moves nothing: the claim is still the network agent's
    assert not any(e["event"] == "handoff" for e in claim_events(env, sys_id))
    assert_refused(env.call("support-bot", "PATCH", url, json={"state": "3"}), 409, ["claim-held-by-another-agent"])

    back = env.call("network-bot", "PATCH", url, json={"assignment_group": "service-desk", "work_notes": "Not ours"})
    assert back.status_code == 200, back.text
    assert incident(env, sys_id)["assignment_group"] == "service-desk"
    wait_for(lambda: any(i["claim"]["resource"] == f'Incident::"{sys_id}"' for i in inbox(env)), timeout=5,
             what="the service desk's inbox item")
    body = assert_refused(env.call("network-bot", "PATCH", url, json={"state": "3"}), 409,
                          ["claim-held-by-another-agent"])
    assert body["claim"]["holder"] == "group:service-desk"


def erp_orders_with(env: Env, material: str) -> list[str]:
    return [po for po, o in mock_orders(env).items()
            if any(i["Material"] == material for i in o["to_PurchaseOrderItem"]["results"])]


def test_erp_duplicate_order_by_another_agent_is_suppressed(env):
    """The bundled ERP connector: the same order (supplier and items) raised again within
    10 minutes, by any agent, is not forwarded; the 409 names the first one."""
    tag = next(_ORDER_TAGS)
    first = env.call("procurement-bot", "POST", env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder"),
                     json=po_body(*SMALL, tag=tag))
    assert first.status_code == 201, first.text
    posts = len(env.mocks.forwarded("erp", "POST"))
    # the same order, numbers spelled differently: equal typed values, so the same work
    same = po_body(("10", "120.5"), (2, "99.990"), tag=tag)
    dup = env.call("procurement-bot-2", "POST", env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder"), json=same)
    body = assert_refused(dup, 409, None)
    assert body["first_decision_id"] == first.headers[DECISION_HEADER]
    assert body["first_status"] == 201
    assert dup.headers["Location"] == first.headers["Location"] == body["first_result"]
    assert body["window_ends_at"] - body["first_seen_at"] == pytest.approx(600)
    assert len(env.mocks.forwarded("erp", "POST")) == posts
    assert erp_orders_with(env, f"MAT-{tag}-0") == [first.json()["d"]["PurchaseOrder"]]
    rec = env.decision_of(dup)
    assert rec["decision"] == "deny" and rec["status"] == 409 and rec["refusal"]["kind"] == "duplicate"

    # another quantity or another supplier is another order
    for other in (po_body((11, "120.50"), (2, "99.99"), tag=tag), po_body(*SMALL, supplier="17300002", tag=tag)):
        r = env.call("procurement-bot-2", "POST", env.mocks.url("erp", f"{PO_SRV}/A_PurchaseOrder"), json=other)
        assert r.status_code == 201, (other, r.text)
    assert len(erp_orders_with(env, f"MAT-{tag}-0")) == 3
