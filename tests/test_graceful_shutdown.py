"""Graceful shutdown on SIGTERM (docs/configuration.md, `shutdown.grace_seconds`).

Real `proctor run` processes, real HTTP clients, a slow upstream on loopback (it
answers after `?s=` seconds). For both gateway engines (mitmproxy, aiohttp) and the
forward listener (mitmproxy):

- after SIGTERM `/readyz` is 503 at once, new TCP connections are refused, a request
  on a keep-alive connection opened before is answered 503 + Retry-After +
  `Connection: close`, requests already forwarded finish with their 200, and the
  process exits 0 within the grace period;
- a request held open for a sync approval is answered promptly: 503 with Retry-After
  and the status URL in Location; the approval stays pending in the store, is approved
  on another proxy sharing the store (PostgreSQL when PROCTOR_TEST_POSTGRES_DSN is set,
  else one SQLite file), and the agent's retry there goes through exactly once;
- past the grace period what is still open is cut and logged, and the process still
  exits 0; a second SIGTERM exits at once.

Plus unit tests of the drain sequence, the signal handling and the config bounds.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import signal
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from conftest import Proctor, basic_proxy_auth, start_proctor, wait_for
from test_approvals import (  # noqa: F401 - hold_policies is a fixture
    AGENT,
    MANAGERS,
    agent_token,
    approver_token,
    hits,
    hold_policies,
    in_thread,
    marker,
    order,
    request_records,
    show,
    vote,
    wait_pending,
)

from proxy.config import ProctorConfig, ShutdownConfig
from proxy import shutdown as shutdown_mod
from proxy.shutdown import Shutdown, drain

PG_DSN = os.environ.get("PROCTOR_TEST_POSTGRES_DSN")
ENGINES = ("mitmproxy", "aiohttp")


# ------------------------------------------------------------------ a slow upstream
class SlowUpstream:
    """Answers every GET with 200 JSON after `?s=` seconds (default 0); records each path
    as soon as the request arrives (so a test knows it was forwarded)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                url = urlsplit(self.path)
                outer.paths.append(url.path)
                time.sleep(float(parse_qs(url.query).get("s", ["0"])[0]))
                body = json.dumps({"slow": True, "path": url.path}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the proxy cut the request meanwhile

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def arrived(self, path: str) -> bool:
        return path in self.paths

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def slow():
    s = SlowUpstream()
    yield s
    s.close()


# -------------------------------------------------------------------------- helpers
def start(tmp: Path, idp, pki, upstream, upstream_tls, slow: SlowUpstream, engine: str, grace: float,
          policies_src: Path | None = None, store: dict | None = None, env: dict | None = None,
          approvals: dict | None = None) -> Proctor:
    """A proxy whose gateway (served by `engine`) routes /svc to the echo upstream and /slow to
    the slow one; the slow upstream is generic egress, open to agents in group `egress`."""
    overrides: dict = {
        "gateway": {
            "engine": engine,
            "routes": [
                {"prefix": "/svc", "upstream": f"http://127.0.0.1:{upstream.port}"},
                {"prefix": "/slow", "upstream": f"http://127.0.0.1:{slow.port}"},
            ],
        },
        "egress": {"default": "deny", "unclassified_hosts": [f"127.0.0.1:{slow.port}"]},
        "shutdown": {"grace_seconds": grace},
        "approvals": {"sync_wait_seconds": 60, "expire_after_seconds": 600, **(approvals or {})},
    }
    if store is not None:
        overrides["store"] = store
    kw = {"policies_src": policies_src} if policies_src is not None else {}
    return start_proctor(tmp, idp, pki, upstream, upstream_tls, overrides, env=env, **kw)


def egress_token(idp) -> str:
    return idp.token("slow-bot", groups=["egress"], ttl=600)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


def signal_and_time(p: Proctor, sig: int = signal.SIGTERM) -> float:
    t0 = time.monotonic()
    p.proc.send_signal(sig)
    return t0


def assert_refused_for_shutdown(resp: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> dict:
    body = json.loads(resp.read())
    assert resp.status == 503, body
    assert resp.getheader("Retry-After") == "1"
    assert resp.getheader("Connection", "").lower() == "close"
    assert resp.getheader("Content-Type") == "application/problem+json"
    assert body["title"] == "Proctor is shutting down" and body["reasons"] == ["shutting-down"]
    assert body["decision_id"] == resp.getheader("X-Proctor-Decision-Id")
    assert conn.sock is None  # the client closed it, as told (and the proxy closed its end)
    return body


# ---------------------------------------------------------------------------- tests
@pytest.mark.integration
@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_drains_in_flight_requests_and_refuses_new_work(engine, tmp_path, idp, pki, upstream, upstream_tls,
                                                                 slow, reader_token):
    grace = 15.0
    p = start(tmp_path / "p", idp, pki, upstream, upstream_tls, slow, engine, grace)
    try:
        # keep-alive connections opened before the signal, one on each listener
        gw = http.client.HTTPConnection("127.0.0.1", p.gateway_port, timeout=10)
        gw.request("GET", "/svc/items/before", headers={"Authorization": f"Bearer {reader_token}"})
        first = gw.getresponse()
        assert first.status == 200 and json.loads(first.read())["echo"] is True and gw.sock is not None
        fw = http.client.HTTPConnection("127.0.0.1", p.port, timeout=10)
        fw_auth = {"Proxy-Authorization": basic_proxy_auth("reader-bot", reader_token)}
        fw.request("GET", f"http://127.0.0.1:{upstream.port}/items/before", headers=fw_auth)
        first = fw.getresponse()
        assert first.status == 200 and json.loads(first.read())["echo"] is True and fw.sock is not None
        # and an HTTPS request inside a CONNECT tunnel, the tunnel kept open
        tunnel = http.client.HTTPSConnection("127.0.0.1", p.port, timeout=10,
                                             context=ssl.create_default_context(cafile=str(p.ca_pem)))
        tunnel.set_tunnel(f"localhost:{upstream_tls.port}", headers=fw_auth)
        tunnel.request("GET", "/items/before")
        first = tunnel.getresponse()
        assert first.status == 200 and json.loads(first.read())["echo"] is True and tunnel.sock is not None

        # a slow request in flight on each listener (already forwarded when the signal comes)
        tag = uuid.uuid4().hex[:8]
        tok = egress_token(idp)
        via_gateway = in_thread(httpx.get, f"{p.gateway_url}/slow/gw-{tag}?s=4",
                                headers={"Authorization": f"Bearer {tok}"}, timeout=30)
        via_proxy = in_thread(httpx.get, f"http://127.0.0.1:{slow.port}/fw-{tag}?s=4",
                              proxy=p.proxy_url_with("slow-bot", tok), timeout=30)
        wait_for(lambda: slow.arrived(f"/slow/gw-{tag}") or slow.arrived(f"/gw-{tag}"), what="gateway request forwarded")
        wait_for(lambda: slow.arrived(f"/fw-{tag}"), what="forward request forwarded")

        t0 = signal_and_time(p)
        # readiness flips at once, so load balancers stop sending
        ready = httpx.get(f"{p.control_url}/readyz", timeout=5)
        assert ready.status_code == 503, ready.text
        assert ready.json()["reasons"][0].startswith("shutting down")
        assert time.monotonic() - t0 < 1.0
        assert p.health()["components"]["listeners"]["shutting_down"] is True
        # new TCP connections are refused on both listeners
        wait_for(lambda: refused(p.gateway_port) and refused(p.port), timeout=2, what="listeners closed")
        # a request on a connection opened before: 503, Retry-After, Connection: close
        gw.request("GET", "/svc/items/after", headers={"Authorization": f"Bearer {reader_token}"})
        gw_refusal = assert_refused_for_shutdown(gw.getresponse(), gw)
        fw.request("GET", f"http://127.0.0.1:{upstream.port}/items/after", headers=fw_auth)
        fw_refusal = assert_refused_for_shutdown(fw.getresponse(), fw)
        tunnel.request("GET", "/items/after")
        tunnel_refusal = assert_refused_for_shutdown(tunnel.getresponse(), tunnel)
        assert p.proc.poll() is None  # still draining: the slow requests are open

        # the requests in flight finish with the upstream's answer, and close their connections
        for got, path in ((via_gateway(), f"/slow/gw-{tag}"), (via_proxy(), f"/fw-{tag}")):
            assert got.status_code == 200, got.text
            assert got.json()["slow"] is True and got.json()["path"].endswith(path.rsplit("/", 1)[1])
            assert got.headers.get("connection", "").lower() == "close"
        # then the process exits 0, within the grace period
        assert p.proc.wait(grace + 5) == 0
        elapsed = time.monotonic() - t0
        assert 2.5 < elapsed < grace, elapsed
    finally:
        p.stop()
    log = p.log()
    assert "SIGTERM received: shutting down" in log and "drained in" in log
    assert "cutting" not in log
    # every answer is in the record: the two refusals (never forwarded) and the two slow 200s
    recs = {r["decision_id"]: r for r in p.decisions() if "type" not in r}
    for refusal in (gw_refusal, fw_refusal, tunnel_refusal):
        rec = recs[refusal["decision_id"]]
        assert rec["status"] == 503 and rec["decision"] == "deny" and rec["refusal"]["kind"] == "fail-closed"
    slow_recs = [r for r in recs.values() if r.get("status") == 200 and tag in json.dumps(r)]
    assert len(slow_recs) == 2 and all(r["decision"] == "allow" for r in slow_recs)


@pytest.fixture
def shared_store(tmp_path):
    """Two proxies' common store: a fresh PostgreSQL schema when PROCTOR_TEST_POSTGRES_DSN is
    set, else one SQLite file. (store config, environment)"""
    if not PG_DSN:
        yield {"url": f"sqlite:///{tmp_path / 'shared.db'}"}, {}
        return
    import asyncpg

    schema = "proctor_sd_" + uuid.uuid4().hex[:12]
    sep = "&" if "?" in PG_DSN else "?"
    yield {"url_env": "PROCTOR_TEST_SD_STORE"}, {"PROCTOR_TEST_SD_STORE": f"{PG_DSN}{sep}schema={schema}"}

    async def drop() -> None:
        conn = await asyncpg.connect(PG_DSN, timeout=10)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    asyncio.run(drop())


@pytest.mark.integration
@pytest.mark.parametrize("engine", ENGINES)
def test_a_sync_held_request_is_handed_over_and_its_approval_survives(engine, tmp_path, idp, pki, upstream,
                                                                      upstream_tls, slow, hold_policies,
                                                                      shared_store):
    store, env = shared_store
    grace = 15.0
    a = start(tmp_path / "a", idp, pki, upstream, upstream_tls, slow, engine, grace, hold_policies, store, env)
    b = start(tmp_path / "b", idp, pki, upstream, upstream_tls, slow, engine, grace, hold_policies, store, env)
    try:
        tok = agent_token(idp)
        mark = marker()
        headers = {"Authorization": f"Bearer {tok}"}
        held = in_thread(httpx.post, f"{a.gateway_url}/svc/tenants/7/orders", json=order(mark), headers=headers,
                         timeout=60)
        alice = approver_token(idp, "alice", MANAGERS)
        (aid,) = wait_pending(a, alice)

        t0 = signal_and_time(a)
        resp = held(timeout=10)
        answered = time.monotonic() - t0
        assert answered < 2.0, answered  # promptly, not at the end of the sync wait or the grace period
        body = resp.json()
        assert resp.status_code == 503, body
        assert resp.headers["Retry-After"] == "5"  # approvals.retry_after_seconds
        status_url = f"{a.control_url}/v1/approvals/{aid}/status"
        assert resp.headers["Location"] == status_url == body["status_url"]
        assert resp.headers.get("connection", "").lower() == "close"
        assert body["title"] == "Proctor is shutting down" and body["type"].endswith("/approval-pending")
        assert body["approval_id"] == aid and body["approval_state"] == "pending"
        assert "retry the same request" in body["detail"] and "stays pending" in body["detail"]
        assert hits(upstream, mark) == []
        # nothing else was open: the process exits 0 long before the grace period ends
        assert a.proc.wait(grace) == 0
        assert time.monotonic() - t0 < 5.0
        assert "answered 1 request(s) held for approval" in a.log()
        (rec,) = request_records(a, aid)
        assert rec["decision"] == "hold" and rec["status"] == 503 and rec["refusal"]["kind"] == "approval-pending"

        # the approval survives in the store: pending on the other proxy, its status URL there too
        assert show(b, aid, alice)["state"] == "pending"
        st = httpx.get(f"{b.control_url}/v1/approvals/{aid}/status", headers=headers, timeout=10)
        assert st.status_code == 200 and st.json()["state"] == "pending", st.text
        assert vote(b, aid, alice, "approve", "fine").json()["state"] == "approved"
        # the agent's retry on the other proxy is released by it, exactly once
        retry = httpx.post(f"{b.gateway_url}/svc/tenants/7/orders", json=order(mark), headers=headers, timeout=30)
        assert retry.status_code == 200, retry.text
        assert retry.json() == {"echo": True, "method": "POST", "path": "/tenants/7/orders"}
        assert len(hits(upstream, mark)) == 1
        assert show(b, aid, alice)["state"] == "forwarded"
        (rec_b,) = request_records(b, aid)
        assert rec_b["decision"] == "allow" and rec_b["status"] == 200
    finally:
        a.stop()
        b.stop()


@pytest.mark.integration
@pytest.mark.parametrize("engine", ENGINES)
def test_past_the_grace_period_open_requests_are_cut_and_logged(engine, tmp_path, idp, pki, upstream, upstream_tls,
                                                                slow):
    grace = 2.0
    p = start(tmp_path / "p", idp, pki, upstream, upstream_tls, slow, engine, grace)
    try:
        tag = uuid.uuid4().hex[:8]
        tok = egress_token(idp)
        stuck = in_thread(httpx.get, f"{p.gateway_url}/slow/stuck-{tag}?s=20",
                          headers={"Authorization": f"Bearer {tok}"}, timeout=30)
        wait_for(lambda: any(f"stuck-{tag}" in x for x in slow.paths), what="request forwarded")
        t0 = signal_and_time(p)
        assert p.proc.wait(grace + 5) == 0
        elapsed = time.monotonic() - t0
        assert grace <= elapsed < grace + 2.5, elapsed
        with pytest.raises(httpx.HTTPError):  # cut: the connection closes without an answer
            stuck()
    finally:
        p.stop()
    log = p.log()
    assert f"the grace period of {grace:g} s is over: cutting 1 open request(s)" in log
    cut_line = next(line for line in log.splitlines() if "cutting 1 open request" in line)
    # the decision id and the request (as routed, or as asked), never its query string (it may carry secrets)
    (rec,) = [r for r in p.decisions() if "type" not in r and f"stuck-{tag}" in json.dumps(r)]
    assert f"{rec['decision_id']} GET " in cut_line and f"/stuck-{tag} " in cut_line and "?s=" not in cut_line
    # the record says it was forwarded and then cut: no answer reached the agent
    assert rec["decision"] == "allow" and rec["status"] is None and rec["error"].startswith("cut at shutdown")


@pytest.mark.integration
def test_a_second_signal_exits_at_once(tmp_path, idp, pki, upstream, upstream_tls, slow):
    p = start(tmp_path / "p", idp, pki, upstream, upstream_tls, slow, "mitmproxy", 30.0)
    try:
        tag = uuid.uuid4().hex[:8]
        tok = egress_token(idp)
        stuck = in_thread(httpx.get, f"http://127.0.0.1:{slow.port}/stuck-{tag}?s=20",
                          proxy=p.proxy_url_with("slow-bot", tok), timeout=30)
        wait_for(lambda: slow.arrived(f"/stuck-{tag}"), what="request forwarded")
        p.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: httpx.get(f"{p.control_url}/readyz", timeout=5).status_code == 503, timeout=5,
                 what="draining")
        time.sleep(0.3)
        assert p.proc.poll() is None  # draining: waiting for the slow request
        t1 = signal_and_time(p, signal.SIGINT)
        assert p.proc.wait(5) == 128 + signal.SIGINT
        assert time.monotonic() - t1 < 2.0
        with pytest.raises(httpx.HTTPError):
            stuck()
    finally:
        p.stop()
    assert "SIGINT received again" in p.log()


# ----------------------------------------------------------------------- unit tests
class FakeEngine:
    def __init__(self, name: str, open_for: int) -> None:
        self.name = name
        self.open_for = open_for  # polls until nothing is open (-1: never)
        self.calls: list[str] = []

    async def stop_accepting(self) -> None:
        self.calls.append("stop_accepting")

    def open_requests(self) -> list[str]:
        if self.open_for == 0:
            return []
        if self.open_for > 0:
            self.open_for -= 1
        return [f"{self.name}-req GET /x"]

    async def cut(self) -> None:
        self.calls.append("cut")


def test_drain_order_waits_for_open_requests_then_stops():
    async def run() -> tuple[list[str], list[str], float]:
        sd = Shutdown(grace_seconds=5)
        engines = [FakeEngine("a", 3), FakeEngine("b", 1)]
        events: list[str] = []
        task = asyncio.create_task(drain(sd, engines, lambda: events.append("release") or 2, lambda: events.append("stop"),
                                         poll=0.01))
        await asyncio.sleep(0.05)
        assert events == [] and engines[0].calls == []  # nothing before the signal
        sd.on_signal(signal.SIGTERM)
        await asyncio.wait_for(task, 2)
        return engines[0].calls + engines[1].calls, events, sd.elapsed()

    calls, events, elapsed = asyncio.run(run())
    assert calls == ["stop_accepting", "cut", "stop_accepting", "cut"]
    assert events == ["release", "stop"]
    assert elapsed < 1


def test_drain_cuts_and_logs_what_is_open_when_the_grace_period_ends(caplog):
    async def run() -> Shutdown:
        sd = Shutdown(grace_seconds=1)
        stopped: list[bool] = []
        sd.begin()
        await asyncio.wait_for(drain(sd, [FakeEngine("a", -1)], None, lambda: stopped.append(True), poll=0.01), 3)
        assert stopped == [True]
        return sd

    with caplog.at_level(logging.INFO, logger="proctor.shutdown"):
        sd = asyncio.run(run())
    assert 1.0 <= sd.elapsed() < 1.5
    assert "the grace period of 1 s is over: cutting 1 open request(s): a-req GET /x" in caplog.text


def test_drain_survives_a_failing_engine(caplog):
    class Broken(FakeEngine):
        async def stop_accepting(self) -> None:
            raise RuntimeError("no")

        def open_requests(self) -> list[str]:
            raise RuntimeError("no")

    async def run() -> list[bool]:
        sd = Shutdown(grace_seconds=5)
        sd.begin()
        stopped: list[bool] = []
        await asyncio.wait_for(drain(sd, [Broken("x", 0)], None, lambda: stopped.append(True), poll=0.01), 2)
        return stopped

    assert asyncio.run(run()) == [True]  # a broken engine never holds the process


def test_second_signal_exits_at_once(monkeypatch):
    exits: list[int] = []
    monkeypatch.setattr(shutdown_mod.os, "_exit", exits.append)
    monkeypatch.setattr(shutdown_mod.logging, "shutdown", lambda: None)
    sd = Shutdown(grace_seconds=20)
    assert not sd.draining and sd.remaining() == 20
    sd.on_signal(signal.SIGTERM)
    assert sd.draining and sd.begun.is_set() and exits == []
    assert 19 < sd.remaining() <= 20
    sd.on_signal(signal.SIGTERM)
    assert exits == [128 + signal.SIGTERM]


def test_grace_seconds_config():
    assert ProctorConfig().shutdown.grace_seconds == 20
    assert ShutdownConfig(grace_seconds=1).grace_seconds == 1
    for bad in (0, 0.5, 3601, -1):
        with pytest.raises(ValidationError):
            ShutdownConfig(grace_seconds=bad)
    with pytest.raises(ValidationError):
        ShutdownConfig.model_validate({"grace": 10})  # unknown keys are errors


def test_held_waiters_are_released_at_once(tmp_path):
    """ApprovalService.wait returns the still-pending approval as soon as the drain begins,
    and a request held after that does not wait at all."""
    from proxy.approvals.service import ApprovalService
    from proxy.config import ApprovalsConfig
    from proxy.core.model import AgentIdentity, AgentRequest, Classification
    from proxy.store.sqlite import SQLiteStore

    async def run() -> None:
        store = SQLiteStore(str(tmp_path / "state.db"))
        await store.open()
        try:
            svc = ApprovalService(store, ApprovalsConfig(), record=lambda rec: None)
            ident = AgentIdentity(agent_id=AGENT, issuer="i", claims={}, expires_at=None)
            req = AgentRequest(method="POST", scheme="http", host="erp", port=80, path="/orders", query="",
                               headers={"content-type": "application/json"}, body=b'{"total": 1}',
                               client_ip="127.0.0.1", mode="reverse")
            cls = Classification(connector="erp", action="test.order.create", resource_type="Order", resource_id="new")
            approval = await svc.hold(decision_id="d1", identity=ident, req=req, cls=cls, groups={MANAGERS: 1},
                                      policy_ids=["p"], mode="sync", derived={})
            waiting = asyncio.create_task(svc.wait(approval, 60))
            await asyncio.sleep(0.05)
            assert svc.waiting == 1 and not waiting.done()
            t0 = time.monotonic()
            assert svc.release_held() == 1
            got = await asyncio.wait_for(waiting, 2)
            assert got.state == "pending" and time.monotonic() - t0 < 0.5
            assert svc.waiting == 0
            t0 = time.monotonic()
            assert (await svc.wait(approval, 60)).state == "pending" and time.monotonic() - t0 < 0.5
        finally:
            await store.close()

    asyncio.run(run())
