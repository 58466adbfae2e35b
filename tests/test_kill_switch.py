"""Agent registry and kill switch, end to end: real Proctor processes, real upstreams.

One module-wide Proctor (`gov`) runs with:

- a copy of tests/data/policies plus a sync `@approval("managers")` hold for
  orders over 500 (as in tests/test_approvals.py);
- a second connector `crm` on its own recording upstream (action test.item.read);
- one pre-registered agent (REGISTERED) from the config's `agents:` list.

Every test uses its own agent ids and its own path/body markers, so upstream hits
are counted per test on the shared upstream log. Operators are approver-audience
tokens whose `approval_groups` contain `proctor-admins`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from conftest import DATA, Proctor, _start_upstream, start_proctor, wait_for

from proxy.governance.cli import agents as agents_cli
from proxy.governance.registry import Governance
from proxy.store import Suspension

pytestmark = pytest.mark.integration

ADMINS = "proctor-admins"
MANAGERS = "managers"
REGISTERED = {"id": "ks-registered-bot", "owner": "alice@example.com", "team": "ops", "description": "nightly reports"}
HOLD_CEDAR = """
@id("ks-big-orders-need-a-manager")
@approval("managers")
forbid (principal, action == Action::"test.order.create", resource)
when { context has fields && context.fields has total && context.fields.total.greaterThan(decimal("500.0")) }
unless { context has approval && context.approval.groups.contains("managers") };
"""
APPROVAL_TYPE = (
    "type Approval = { id: String, approver: String, approvers: Set<String>, groups: Set<String>, "
    "time: datetime, note: String };\n"
)


# ------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def crm(tmp_path_factory):
    up = _start_upstream(tmp_path_factory.mktemp("ks-crm"), None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


def crm_connector(port: int) -> dict:
    return {
        "name": "crm",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [{"method": "GET", "path": "/sobjects/{id}", "action": "test.item.read", "resource": {"type": "Item", "id": "{id}"}}],
    }


@pytest.fixture(scope="module")
def hold_policies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ks-policies") / "policies"
    shutil.copytree(DATA / "policies", d)
    schema = (d / "schema.cedarschema").read_text()
    assert "params: { tenant: Long }," in schema and "type Approval" not in schema
    schema = schema.replace("type OrderBody", APPROVAL_TYPE + "type OrderBody", 1)
    schema = schema.replace("params: { tenant: Long },", "params: { tenant: Long },\n  approval?: Approval,", 1)
    (d / "schema.cedarschema").write_text(schema)
    (d / "hold.cedar").write_text(HOLD_CEDAR)
    return d


@pytest.fixture(scope="module")
def gov(tmp_path_factory, idp, pki, upstream, upstream_tls, crm, hold_policies) -> Proctor:
    p = start_proctor(
        tmp_path_factory.mktemp("ks-proctor"), idp, pki, upstream, upstream_tls,
        {"approvals": {"mode": "sync", "sync_wait_seconds": 30, "expire_after_seconds": 120}, "agents": [REGISTERED]},
        policies_src=hold_policies, extra_connectors=[crm_connector(crm.port)],
    )
    yield p
    p.stop()


# ------------------------------------------------------------------------- helpers
def agent_token(idp, agent: str, *groups: str) -> str:
    return idp.token(agent, groups=list(groups or ["readers"]), ttl=600)


def operator_token(idp, who: str = "olga", *groups: str) -> str:
    return idp.token(who, aud="proctor-approvers", approval_groups=list(groups or [ADMINS]), ttl=600)


def api(p: Proctor, method: str, path: str, token: str | None, **kw) -> httpx.Response:
    headers = dict(kw.pop("headers", {}) or {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.request(method, f"{p.control_url}{path}", headers=headers, timeout=10, **kw)


def suspend(p: Proctor, op: str, kind: str, target: str, reason: str = "incident 42") -> dict:
    r = api(p, "POST", "/v1/suspensions", op, json={"kind": kind, "target": target, "reason": reason})
    assert r.status_code == 201, r.text
    return r.json()


def resume(p: Proctor, op: str, kind: str, target: str) -> None:
    r = api(p, "DELETE", f"/v1/suspensions/{kind}/{target}", op)
    assert r.status_code == 200, r.text


def client(p: Proctor, agent: str, token: str, timeout: float = 15) -> httpx.Client:
    return httpx.Client(proxy=p.proxy_url_with(agent, token), timeout=timeout)


def mark() -> str:
    return "ks-" + uuid.uuid4().hex[:16]


def hits(up, marker: str) -> list[dict]:
    return [e for e in up.received() if marker in e["path"] or marker in e["body"]]


def assert_suspended(r: httpx.Response, kind: str, target: str, by: str = "olga", reason: str = "incident 42") -> dict:
    assert r.status_code == 403, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["type"].endswith("/suspended"), body
    assert body["reasons"] == [f"suspended:{kind}:{target}"], body
    s = body["suspended"]
    assert (s["kind"], s["target"], s["by"], s["reason"]) == (kind, target, by, reason), body
    assert f"suspended since {s['since']} by {by}: {reason}" in body["detail"], body
    datetime.fromisoformat(s["since"].replace("Z", "+00:00"))  # an ISO timestamp
    return body


def suspension_events(p: Proctor, kind: str, target: str) -> list[dict]:
    return [r for r in p.decisions() if r.get("type") == "suspension" and r["kind"] == kind and r["target"] == target]


def relaunch(p: Proctor) -> Proctor:
    """SIGTERM `p` and start a new process on the same config and state dir (same ports)."""
    p.stop()
    log_path = p.dir / f"proctor-{int(time.time() * 1000)}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(p.config_path), "--log-level", "info"],
        stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=str(p.dir), env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    new = Proctor(p.dir, p.config_path, p.port, p.control_port, p.gateway_port, proc, log_path, p.ca_pem, p.policies_dir)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"proctor exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            return httpx.get(f"{new.control_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=30, what="restarted proctor readiness")
    return new


class Loop(threading.Thread):
    """Sends GET /items/<marker>-<n> through the proxy as `agent` until stopped; records
    (n, monotonic start, monotonic end, status, problem type)."""

    def __init__(self, p: Proctor, up, agent: str, token: str) -> None:
        super().__init__(daemon=True)
        self.p, self.up, self.agent, self.token = p, up, agent, token
        self.marker = mark()
        self.results: list[tuple[int, float, float, int, str]] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with client(self.p, self.agent, self.token) as c:
                n = 0
                while not self.stop.is_set():
                    t0 = time.monotonic()
                    r = c.get(f"http://127.0.0.1:{self.up.port}/items/{self.marker}-{n}")
                    t1 = time.monotonic()
                    kind = r.json().get("type", "") if r.status_code != 200 else ""
                    self.results.append((n, t0, t1, r.status_code, kind))
                    n += 1
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def upstream_ns(self) -> set[int]:
        prefix = f"/items/{self.marker}-"
        return {int(e["path"][len(prefix):]) for e in self.up.received() if e["path"].startswith(prefix)}

    def wait_count(self, n: int, timeout: float = 10) -> None:
        wait_for(lambda: len(self.results) >= n or self.error is not None, timeout=timeout, what=f"{self.agent} traffic")
        assert self.error is None, self.error


def raw_connect(p: Proctor, agent: str, token: str, host: str, port: int) -> bytes:
    """A bare CONNECT; the proxy's answer (head, and the body of a refusal)."""
    cred = base64.b64encode(f"{agent}:{token}".encode()).decode()
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: Basic {cred}\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return data
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
        length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)
        while len(data.split(b"\r\n\r\n", 1)[1]) < length:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data


# --------------------------------------------------------------------------- 1. mid-stream
def test_suspend_mid_stream_refuses_within_a_second_and_resume_restores(gov, idp, upstream):
    op = operator_token(idp)
    a = Loop(gov, upstream, "ks-loop-a", agent_token(idp, "ks-loop-a"))
    b = Loop(gov, upstream, "ks-loop-b", agent_token(idp, "ks-loop-b"))
    a.start(), b.start()
    try:
        a.wait_count(20), b.wait_count(20)

        r = api(gov, "POST", "/v1/agents/ks-loop-a/suspend", op, json={"reason": "incident 42"})
        suspended_at = time.monotonic()
        assert r.status_code == 201, r.text
        assert r.json()["kind"] == "agent" and r.json()["by"] == "olga"

        wait_for(lambda: any(x[3] == 403 for x in a.results), timeout=3, interval=0.01, what="A's first 403")
        first = next(x for x in a.results if x[3] == 403)
        assert first[2] - suspended_at < 1.0, f"A's first refusal came {first[2] - suspended_at:.3f} s after the suspend call"
        assert first[4].endswith("/suspended")
        # keep both loops going for a while under the suspension
        n_b = len(b.results)
        time.sleep(1.0)
        assert len(b.results) > n_b + 10, "B stopped making progress while A was suspended"

        # the refusal itself
        with client(gov, "ks-loop-a", a.token) as c:
            assert_suspended(c.get(f"http://127.0.0.1:{upstream.port}/items/{mark()}"), "agent", "ks-loop-a")

        resume_called = time.monotonic()
        r = api(gov, "POST", "/v1/agents/ks-loop-a/resume", op, json={"reason": "fixed"})
        resumed_at = time.monotonic()
        assert r.status_code == 200, r.text
        wait_for(lambda: any(x[3] == 200 and x[1] >= resumed_at for x in a.results), timeout=3, interval=0.01,
                 what="A's first 200 after resume")
        first_ok = next(x for x in a.results if x[3] == 200 and x[1] >= resumed_at)
        assert first_ok[2] - resumed_at < 1.0
        a.wait_count(len(a.results) + 5)
    finally:
        a.stop.set(), b.stop.set()
        a.join(15), b.join(15)
    assert a.error is None and b.error is None, (a.error, b.error)

    # B: never refused
    assert all(x[3] == 200 for x in b.results), [x for x in b.results if x[3] != 200][:3]
    # A: every request started after the suspend call returned and before resume was called is refused
    during = [x for x in a.results if suspended_at <= x[1] and x[2] < resume_called]
    assert len(during) > 10
    assert all(x[3] == 403 and x[4].endswith("/suspended") for x in during), [x for x in during if x[3] != 403][:3]
    # once refused, refused until resumed
    refused_from = first[0]
    window = [x for x in a.results if x[0] >= refused_from and x[2] < resume_called]
    assert all(x[3] == 403 for x in window), [x for x in window if x[3] != 403][:3]
    # what reached the upstream: exactly A's 200s (so nothing after the first refusal until the resume)
    wait_for(lambda: a.upstream_ns() >= {x[0] for x in a.results if x[3] == 200}, timeout=3, what="upstream log")
    reached = a.upstream_ns()
    assert reached == {x[0] for x in a.results if x[3] == 200}
    assert not any(refused_from <= n and a.results[n][2] < resume_called for n in reached), "A reached the upstream while suspended"
    assert b.upstream_ns() == {x[0] for x in b.results}

    evs = suspension_events(gov, "agent", "ks-loop-a")
    assert [e["event"] for e in evs] == ["suspended", "resumed"], evs
    assert evs[0]["by"] == "olga" and evs[0]["reason"] == "incident 42" and evs[1]["reason"] == "fixed"


# --------------------------------------------------------------- 2. connector and action
def test_suspend_a_connector_then_a_single_action(gov, idp, upstream, crm):
    op = operator_token(idp)
    x_tok, w_tok = agent_token(idp, "ks-conn-x"), agent_token(idp, "ks-conn-w", "writers")
    m = mark()
    with client(gov, "ks-conn-x", x_tok) as x, client(gov, "ks-conn-w", w_tok) as w:
        assert x.get(f"http://127.0.0.1:{upstream.port}/items/{m}-0").status_code == 200
        assert x.get(f"http://127.0.0.1:{crm.port}/sobjects/{m}-0").status_code == 200

        suspend(gov, op, "connector", "testsvc")
        for c in (x, w):  # every agent, every action of that connector
            assert_suspended(c.get(f"http://127.0.0.1:{upstream.port}/items/{m}-1"), "connector", "testsvc")
        assert_suspended(w.post(f"http://127.0.0.1:{upstream.port}/items", json={"marker": m}), "connector", "testsvc")
        # the same action on another connector goes through
        assert x.get(f"http://127.0.0.1:{crm.port}/sobjects/{m}-1").status_code == 200
        assert w.get(f"http://127.0.0.1:{crm.port}/sobjects/{m}-2").status_code == 200
        listed = api(gov, "GET", "/v1/suspensions", op).json()["suspensions"]
        assert {"kind": "connector", "target": "testsvc"}.items() <= next(s for s in listed if s["target"] == "testsvc").items()
        resume(gov, op, "connector", "testsvc")
        assert x.get(f"http://127.0.0.1:{upstream.port}/items/{m}-2").status_code == 200

        suspend(gov, op, "action", "test.item.create", reason="bad writes")
        r = w.post(f"http://127.0.0.1:{upstream.port}/items", json={"marker": m})
        assert_suspended(r, "action", "test.item.create", reason="bad writes")
        assert w.get(f"http://127.0.0.1:{upstream.port}/items/{m}-3").status_code == 200  # other actions: fine
        assert x.get(f"http://127.0.0.1:{crm.port}/sobjects/{m}-3").status_code == 200
        resume(gov, op, "action", "test.item.create")
        assert w.post(f"http://127.0.0.1:{upstream.port}/items", json={"marker": m + "-ok"}).status_code == 200

    paths = sorted(e["path"] for e in hits(upstream, m))
    assert paths == sorted([f"/items/{m}-0", f"/items/{m}-2", f"/items/{m}-3", "/items"]), paths
    assert [json.loads(e["body"]) for e in hits(upstream, m) if e["path"] == "/items"] == [{"marker": m + "-ok"}]
    assert len(hits(crm, m)) == 4
    assert [e["event"] for e in suspension_events(gov, "connector", "testsvc")] == ["suspended", "resumed"]
    assert [e["event"] for e in suspension_events(gov, "action", "test.item.create")] == ["suspended", "resumed"]
    # the refused requests' own decision records name the suspension
    recs = [r for r in gov.decisions() if r.get("type") != "suspension" and "suspended:connector:testsvc" in (r.get("reasons") or [])]
    assert len(recs) >= 3 and all(r["decision"] == "deny" for r in recs), recs[:1]


def test_suspended_agent_cannot_open_a_tunnel(gov, idp, upstream_tls):
    op = operator_token(idp)
    tok = agent_token(idp, "ks-tunnel")
    assert raw_connect(gov, "ks-tunnel", tok, "localhost", upstream_tls.port).startswith(b"HTTP/1.1 200")
    suspend(gov, op, "agent", "ks-tunnel")
    try:
        data = raw_connect(gov, "ks-tunnel", tok, "localhost", upstream_tls.port)
        assert data.startswith(b"HTTP/1.1 403"), data[:200]
        assert b"suspended:agent:ks-tunnel" in data
    finally:
        resume(gov, op, "agent", "ks-tunnel")


# --------------------------------------------------------------- 3. held for approval
def test_request_held_for_approval_is_refused_within_a_second_of_suspension(gov, idp, upstream):
    op = operator_token(idp)
    manager = operator_token(idp, "mia", MANAGERS)
    agent = "ks-held-bot"
    m = mark()
    box: dict = {}

    def send() -> None:
        try:
            with client(gov, agent, agent_token(idp, agent, "writers"), timeout=40) as c:
                r = c.post(f"http://127.0.0.1:{upstream.port}/tenants/7/orders",
                           json={"order": {"total": 750, "items": [{"sku": "A-1"}], "marker": m}})
                box["r"], box["t"] = r, time.monotonic()
        except BaseException as e:  # noqa: BLE001
            box["e"] = e

    t = threading.Thread(target=send, daemon=True)
    t.start()
    pending: list[str] = []

    def held() -> bool:
        r = api(gov, "GET", "/v1/approvals", manager, params={"state": "pending", "agent": agent})
        assert r.status_code == 200, r.text
        pending[:] = [a["id"] for a in r.json()["approvals"]]
        return bool(pending)

    wait_for(held, timeout=15, what="the held request")
    time.sleep(0.3)
    assert t.is_alive() and "r" not in box, "the sync wait ended before the suspension"

    suspend(gov, op, "agent", agent)
    suspended_at = time.monotonic()
    try:
        t.join(5)
        assert not t.is_alive(), "the held request was not refused (still waiting for approval)"
        assert "e" not in box, box.get("e")
        assert box["t"] - suspended_at < 1.0, f"refused {box['t'] - suspended_at:.3f} s after the suspension"
        body = assert_suspended(box["r"], "agent", agent)
        assert body.get("approval_id") in (None, pending[0])
        assert hits(upstream, m) == []
        # approving now must not forward anything either: the agent is gone
        api(gov, "POST", f"/v1/approvals/{pending[0]}/approve", manager, json={"reason": "too late"})
        time.sleep(0.5)
        assert hits(upstream, m) == []
    finally:
        resume(gov, op, "agent", agent)


# -------------------------------------------------------------------- 4. restart
def test_suspensions_survive_a_restart(tmp_path, idp, pki, upstream, upstream_tls):
    p = start_proctor(tmp_path / "restart", idp, pki, upstream, upstream_tls)
    try:
        op = operator_token(idp)
        agent = "ks-restart-bot"
        tok = agent_token(idp, agent)
        m = mark()
        with client(p, agent, tok) as c:
            assert c.get(f"http://127.0.0.1:{upstream.port}/items/{m}-0").status_code == 200
        suspend(p, op, "agent", agent, reason="compromised key")
        suspend(p, op, "action", "test.item.create", reason="freeze")
        p = relaunch(p)  # at once: the activity must be flushed on the way down at the latest
        with client(p, agent, tok) as c:
            assert_suspended(c.get(f"http://127.0.0.1:{upstream.port}/items/{m}-1"), "agent", agent, reason="compromised key")
        with client(p, "ks-restart-w", agent_token(idp, "ks-restart-w", "writers")) as w:
            assert_suspended(w.post(f"http://127.0.0.1:{upstream.port}/items", json={"m": m}), "action",
                             "test.item.create", reason="freeze")
        listed = {(s["kind"], s["target"]) for s in api(p, "GET", "/v1/suspensions", op).json()["suspensions"]}
        assert listed == {("agent", agent), ("action", "test.item.create")}
        shown: dict = {}

        def counted() -> bool:
            shown.update(api(p, "GET", f"/v1/agents/{agent}", op).json())
            return shown.get("requests", 0) >= 2

        wait_for(counted, timeout=3, interval=0.1, what="the registry counts after the restart")
        assert (shown["requests"], shown["allowed"], shown["denied"]) == (2, 1, 1), shown
        assert shown["status"] == "suspended" and shown["suspension"]["reason"] == "compromised key"
        (ev,) = suspension_events(p, "agent", agent)
        assert ev["event"] == "suspended" and ev["by"] == "olga" and ev["reason"] == "compromised key"
        assert [e["path"] for e in hits(upstream, m)] == [f"/items/{m}-0"]
        # and a resume survives a restart too
        resume(p, op, "agent", agent)
        p = relaunch(p)
        with client(p, agent, tok) as c:
            assert c.get(f"http://127.0.0.1:{upstream.port}/items/{m}-2").status_code == 200
    finally:
        p.stop()


# -------------------------------------------------------------------- 5. registry
def test_registry_lists_registered_and_seen_agents_with_counts(gov, idp, upstream):
    op = operator_token(idp)
    agent = "ks-count-bot"
    m = mark()
    before = time.time()
    with client(gov, agent, agent_token(idp, agent)) as c:
        for i in range(3):
            assert c.get(f"http://127.0.0.1:{upstream.port}/items/{m}-{i}").status_code == 200
        for i in range(2):
            assert c.delete(f"http://127.0.0.1:{upstream.port}/items/{m}-{i}").status_code == 403  # no-item-deletes
    with client(gov, REGISTERED["id"], agent_token(idp, REGISTERED["id"])) as c:
        assert c.get(f"http://127.0.0.1:{upstream.port}/items/{m}-r").status_code == 200
    after = time.time()

    doc: dict = {}

    def counted() -> bool:
        r = api(gov, "GET", "/v1/agents", op)
        assert r.status_code == 200, r.text
        doc["agents"] = {a["id"]: a for a in r.json()["agents"]}
        a, reg = doc["agents"].get(agent), doc["agents"].get(REGISTERED["id"])
        return bool(a and a["requests"] >= 5 and reg and reg["requests"] >= 1)

    wait_for(counted, timeout=3, interval=0.1, what="activity flushed to the registry")
    a = doc["agents"][agent]
    assert (a["requests"], a["allowed"], a["denied"]) == (5, 3, 2), a
    assert a["registered"] is False and a["status"] == "active" and a["suspension"] is None
    first = datetime.fromisoformat(a["first_seen"].replace("Z", "+00:00")).timestamp()
    last = datetime.fromisoformat(a["last_seen"].replace("Z", "+00:00")).timestamp()
    assert before - 0.01 <= first <= last <= after + 0.01, (before, a, after)

    reg = doc["agents"][REGISTERED["id"]]
    assert reg["registered"] is True
    assert {k: reg[k] for k in ("id", "owner", "team", "description")} == REGISTERED
    assert (reg["requests"], reg["allowed"], reg["denied"]) == (1, 1, 0) and reg["first_seen"]

    shown = api(gov, "GET", f"/v1/agents/{agent}", op)
    assert shown.status_code == 200 and shown.json() == a
    assert api(gov, "GET", "/v1/agents/ks-nobody", op).status_code == 404

    # registering through the API: appears before it is ever seen
    r = api(gov, "POST", "/v1/agents", op, json={"id": "ks-api-registered", "owner": "bob", "team": "t", "description": "d"})
    assert r.status_code == 201, r.text
    got = api(gov, "GET", "/v1/agents/ks-api-registered", op).json()
    assert got["registered"] is True and got["requests"] == 0 and got["first_seen"] is None and got["owner"] == "bob"

    # a suspended agent's refusals count as denied and it is listed as suspended
    suspend(gov, op, "agent", agent)
    try:
        with client(gov, agent, agent_token(idp, agent)) as c:
            assert c.get(f"http://127.0.0.1:{upstream.port}/items/{m}-9").status_code == 403

        def denied_again() -> bool:
            doc["a"] = api(gov, "GET", f"/v1/agents/{agent}", op).json()
            return doc["a"]["requests"] >= 6

        wait_for(denied_again, timeout=3, interval=0.1, what="the refusal counted")
        assert (doc["a"]["requests"], doc["a"]["allowed"], doc["a"]["denied"]) == (6, 3, 3)
        assert doc["a"]["status"] == "suspended" and doc["a"]["suspension"]["by"] == "olga"
    finally:
        resume(gov, op, "agent", agent)


# ------------------------------------------------------------------------- 6. CLI
def run_cli(runner: CliRunner, *args: str):
    return runner.invoke(agents_cli, list(args), catch_exceptions=False)


def test_cli_suspend_list_resume(gov, idp, upstream):
    runner = CliRunner(env={"PROCTOR_TOKEN": None, "PROCTOR_CONTROL_URL": None, "HTTP_PROXY": None, "http_proxy": None})
    admin = ["--as", "olga", "--group", ADMINS, "-c", str(gov.config_path)]
    agent = "ks-cli-bot"
    tok = agent_token(idp, agent)
    with client(gov, agent, tok) as c:
        assert c.get(f"http://127.0.0.1:{upstream.port}/items/{mark()}").status_code == 200
    wait_for(lambda: api(gov, "GET", f"/v1/agents/{agent}", operator_token(idp)).status_code == 200, timeout=3,
             interval=0.1, what="the agent in the registry")

    # the real entry point once (`proctor agents ...`)
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "agents", "suspend", agent, "--reason", "x", *admin],
                         capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                         env={k: v for k, v in os.environ.items() if k not in ("PROCTOR_TOKEN", "PROCTOR_CONTROL_URL")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"suspended agent {agent} since ") and "by olga" in out.stdout
    with client(gov, agent, tok) as c:
        assert_suspended(c.get(f"http://127.0.0.1:{upstream.port}/items/{mark()}"), "agent", agent, reason="x")

    r = run_cli(runner, "list", *admin)
    assert r.exit_code == 0, r.output
    row = next(line for line in r.output.splitlines() if line.startswith(agent))
    assert row.split()[1] == "SUSPENDED", row
    assert f"{agent}: suspended since " in r.output and "by olga: x" in r.output
    reg_row = next(line for line in r.output.splitlines() if line.startswith(REGISTERED["id"]))
    cols = reg_row.split()
    assert cols[1] == "active" and REGISTERED["owner"].startswith(cols[2].rstrip("…")) and cols[3] == REGISTERED["team"], reg_row

    r = run_cli(runner, "list", "--json", *admin)
    assert r.exit_code == 0
    assert next(a for a in json.loads(r.output)["agents"] if a["id"] == agent)["status"] == "suspended"

    r = run_cli(runner, "suspensions", *admin)
    assert r.exit_code == 0 and f"agent      {agent}" in r.output

    r = run_cli(runner, "resume", agent, "--reason", "all clear", *admin)
    assert r.exit_code == 0 and r.output.strip() == f"resumed agent {agent}", r.output
    r = run_cli(runner, "list", *admin)
    assert next(line for line in r.output.splitlines() if line.startswith(agent)).split()[1] == "active"
    with client(gov, agent, tok) as c:
        assert c.get(f"http://127.0.0.1:{upstream.port}/items/{mark()}").status_code == 200
    resumed = suspension_events(gov, "agent", agent)
    assert [e["event"] for e in resumed] == ["suspended", "resumed"] and resumed[1]["reason"] == "all clear"

    # resume of something not suspended: refused (exit 1)
    r = run_cli(runner, "resume", agent, *admin)
    assert r.exit_code == 1 and "404" in r.output

    r = run_cli(runner, "suspend", "--connector", "crm", "--reason", "vendor outage", *admin)
    assert r.exit_code == 0 and r.output.startswith("suspended connector crm"), r.output
    listed = api(gov, "GET", "/v1/suspensions", operator_token(idp)).json()["suspensions"]
    assert any((s["kind"], s["target"], s["reason"]) == ("connector", "crm", "vendor outage") for s in listed), listed
    r = run_cli(runner, "resume", "--connector", "crm", *admin)
    assert r.exit_code == 0 and r.output.strip() == "resumed connector crm"

    r = run_cli(runner, "suspend", "--action", "test.item.delete", "--reason", "no deletes", *admin)
    assert r.exit_code == 0 and r.output.startswith("suspended action test.item.delete"), r.output
    with client(gov, agent, tok) as c:
        assert_suspended(c.delete(f"http://127.0.0.1:{upstream.port}/items/1"), "action", "test.item.delete", reason="no deletes")
        assert c.get(f"http://127.0.0.1:{upstream.port}/items/{mark()}").status_code == 200
    r = run_cli(runner, "resume", "--action", "test.item.delete", *admin)
    assert r.exit_code == 0

    # not an operator: exit 1
    r = run_cli(runner, "suspend", agent, "--reason", "x", "--as", "mallory", "--group", MANAGERS, "-c", str(gov.config_path))
    assert r.exit_code == 1 and "Not an operator" in r.output, r.output
    r = run_cli(runner, "list", "--token", operator_token(idp, "mallory", MANAGERS), "-c", str(gov.config_path))
    assert r.exit_code == 1 and "Not an operator" in r.output, r.output
    # usage errors: exit 2
    r = run_cli(runner, "suspend", agent, *admin)
    assert r.exit_code == 2 and "--reason is required" in r.output, r.output
    r = run_cli(runner, "suspend", agent, "--reason", "   ", *admin)
    assert r.exit_code == 2, r.output
    r = run_cli(runner, "suspend", agent, "--connector", "crm", "--reason", "x", *admin)
    assert r.exit_code == 2 and "exactly one" in r.output, r.output
    assert not any(s["target"] in (agent, "crm") for s in api(gov, "GET", "/v1/suspensions", operator_token(idp)).json()["suspensions"])


# ---------------------------------------------------------------- 7. control API auth
def test_control_api_auth(gov, idp):
    admin = operator_token(idp)
    body = {"kind": "agent", "target": "ks-auth-bot", "reason": "r"}
    for method, path, kw in (("GET", "/v1/agents", {}), ("POST", "/v1/suspensions", {"json": body}),
                             ("DELETE", "/v1/suspensions/agent/ks-auth-bot", {})):
        r = api(gov, method, path, None, **kw)
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json"), (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        # an agent token (the agent audience) never operates
        r = api(gov, method, path, agent_token(idp, "ks-auth-bot"), **kw)
        assert r.status_code == 401, (path, r.text)
        # an approver without the admin group
        r = api(gov, method, path, operator_token(idp, "mia", MANAGERS), **kw)
        assert r.status_code == 403 and r.json()["title"] == "Not an operator", (path, r.text)
    r = api(gov, "GET", "/v1/agents", "not-a-jwt")
    assert r.status_code == 401

    r = api(gov, "POST", "/v1/suspensions", admin, json=body, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "Cross-origin" in r.json()["title"], r.text
    r = api(gov, "POST", "/v1/agents/ks-auth-bot/suspend", admin, json={"reason": "r"}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403, r.text
    r = api(gov, "POST", "/v1/suspensions", admin, content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    r = api(gov, "POST", "/v1/suspensions", admin, content=b"{nope", headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    r = api(gov, "POST", "/v1/suspensions", admin, json={"kind": "agent", "target": "ks-auth-bot"})
    assert r.status_code == 400 and r.json()["title"] == "Reason required", r.text
    r = api(gov, "POST", "/v1/suspensions", admin, json={"kind": "tenant", "target": "x", "reason": "r"})
    assert r.status_code == 400, r.text
    # none of the refused calls suspended anything
    assert not any(s["target"] == "ks-auth-bot" for s in api(gov, "GET", "/v1/suspensions", admin).json()["suspensions"])
    assert suspension_events(gov, "agent", "ks-auth-bot") == []
    # same-origin (the console) is fine
    r = api(gov, "POST", "/v1/suspensions", admin, json=body, headers={"Origin": gov.control_url})
    assert r.status_code == 201, r.text
    resume(gov, admin, "agent", "ks-auth-bot")



def test_gateway_and_ids_with_slashes(gov, idp, upstream):
    op = operator_token(idp)
    agent = "team/ks-slash"
    tok = agent_token(idp, agent)
    suspend(gov, op, "agent", agent)
    r = httpx.get(f"{gov.gateway_url}/svc/items/{mark()}", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert_suspended(r, "agent", agent)
    r = api(gov, "DELETE", "/v1/suspensions/agent/team%2Fks-slash", op)
    assert r.status_code == 200 and r.json()["target"] == agent, r.text
    r = httpx.get(f"{gov.gateway_url}/svc/items/{mark()}", headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert r.status_code == 200, r.text
    assert api(gov, "DELETE", "/v1/suspensions/agent/team%2Fks-slash", op).status_code == 404


# ------------------------------------------------ in-process: refresh vs. a local suspend
class _SlowReadStore:
    """A store whose list_suspensions answers late (as aiosqlite/asyncpg can, after a
    concurrent write committed): the rows are read first, returned once `gate` opens."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], Suspension] = {}
        self.version = 0
        self.gate: asyncio.Event | None = None

    async def suspensions_version(self) -> int:
        return self.version

    async def list_suspensions(self) -> list:
        snapshot = list(self.rows.values())
        if self.gate is not None:
            await self.gate.wait()
        return snapshot

    async def suspend(self, s) -> None:
        self.rows[(s.kind, s.target)] = s
        self.version += 1

    async def resume(self, kind: str, target: str) -> bool:
        removed = self.rows.pop((kind, target), None) is not None
        self.version += removed
        return removed


@pytest.mark.parametrize("op", ["suspend", "resume"])
def test_refresh_in_flight_does_not_undo_a_local_change(op):
    async def scenario() -> None:
        store = _SlowReadStore()
        await store.suspend(Suspension("connector", "other", 1.0, "x", "y"))  # e.g. another replica
        if op == "resume":
            await store.suspend(Suspension("agent", "A", 1.0, "olga", "r"))
        gov = Governance(store)
        await gov.refresh(force=True)
        await store.suspend(Suspension("action", "z", 2.0, "x", "y"))  # another replica again: version moves
        store.gate = asyncio.Event()
        refreshing = asyncio.create_task(gov.refresh())
        await asyncio.sleep(0)  # the refresh has read the (old) rows and waits for the answer
        if op == "suspend":
            await gov.suspend("agent", "A", "olga", "r")
            assert gov.agent_suspension("A") is not None  # effective at once...
        else:
            assert await gov.resume("agent", "A", "olga")
            assert gov.agent_suspension("A") is None
        store.gate.set()
        await refreshing
        # ...and still in effect once the concurrent refresh lands
        if op == "suspend":
            assert gov.agent_suspension("A") is not None, "the suspension was lost by a concurrent refresh"
        else:
            assert gov.agent_suspension("A") is None, "the resumed agent was suspended again by a concurrent refresh"

    asyncio.run(scenario())
