"""Timeouts: a hanging upstream is a recorded 504, an idle client is closed.

One proxy with small timeouts (connect 1 s, read 1.5 s, client idle 1 s) and
stub upstreams on loopback that misbehave on purpose: one accepts and never
answers, one stops in the middle of its body, one answers after 2.5 s (slower
than the idle timeout, within the read timeout), and one never completes a TCP
handshake (its accept queue is full). Plus clients that go quiet: before the
first byte, in the middle of a request head or body, between requests, and
inside a CONNECT tunnel before the TLS handshake.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time

import pytest
import requests
from pydantic import ValidationError

from conftest import start_proctor
from mitmproxy.proxy.server import TimeoutWatchdog

from proxy.config import RequestLimits, UpstreamConfig
from proxy.engine.patches import _watch_respecting_disarm
from support.jwks_server import JwksServer

CONNECT_TIMEOUT, READ_TIMEOUT, IDLE_TIMEOUT = 1.0, 1.5, 1.0


class StubUpstream:
    """A loopback HTTP/1.1 server that misbehaves: `silent`, `partial` or `slow`."""

    def __init__(self, mode: str, delay: float = 0.0) -> None:
        self.mode, self.delay = mode, delay
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        self.requests.append(data)
        if self.mode == "partial":
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        elif self.mode == "slow":
            time.sleep(self.delay)
            body = b'{"slow": true}'
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\n\r\n" + body)
        self._stop.wait(60)  # then hang (silent/partial) or keep the connection open (slow)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for c in self._conns:
            c.close()


class Unconnectable:
    """A port whose TCP handshakes never complete: its accept queue is full, so SYNs are dropped."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            try:
                c.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(c)
        time.sleep(0.1)

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


@pytest.fixture(scope="module")
def stubs():
    made = {"silent": StubUpstream("silent"), "partial": StubUpstream("partial"),
            "slow": StubUpstream("slow", delay=2.5), "unconnectable": Unconnectable()}
    yield made
    for s in made.values():
        s.close()


@pytest.fixture(scope="module")
def timed(tmp_path_factory, idp, pki, upstream, upstream_tls, stubs):
    hosts = [f"127.0.0.1:{s.port}" for s in stubs.values()]
    p = start_proctor(
        tmp_path_factory.mktemp("timeouts"), idp, pki, upstream, upstream_tls,
        overrides={
            "upstream": {"connect_timeout_seconds": CONNECT_TIMEOUT, "read_timeout_seconds": READ_TIMEOUT},
            "limits": {"client_idle_timeout_seconds": IDLE_TIMEOUT},
            "egress": {"default": "deny", "unclassified_hosts": hosts},
        },
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def egress_proxies(timed, idp):
    token = idp.token("egress-bot", groups=["egress"])
    return {"http": timed.proxy_url_with("egress-bot", token)}


def _assert_recorded_504(p, r, started: float, budget: float) -> dict:
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["title"] == "Upstream timed out" and "timed out" in body["detail"]
    assert body["decision_id"] and body["decision_id"] == r.headers["x-proctor-decision-id"]
    assert elapsed < budget, f"took {elapsed:.1f} s"
    rec = p.decision(body["decision_id"])
    assert rec["decision"] == "allow" and rec["status"] == 504 and "timed out" in rec["error"]
    return body


# ------------------------------------------------------------------- upstreams
@pytest.mark.integration
def test_an_upstream_that_never_answers_is_a_recorded_504(timed, stubs, egress_proxies):
    started = time.monotonic()
    r = requests.get(f"http://127.0.0.1:{stubs['silent'].port}/hang", proxies=egress_proxies, timeout=30)
    body = _assert_recorded_504(timed, r, started, READ_TIMEOUT + 3)
    assert time.monotonic() - started >= READ_TIMEOUT * 0.9
    assert "read_timeout_seconds" in body["detail"]
    assert any(b"GET /hang " in req for req in stubs["silent"].requests)  # it was forwarded, then given up on


@pytest.mark.integration
def test_an_upstream_that_stops_mid_body_is_a_recorded_504(timed, stubs, egress_proxies):
    started = time.monotonic()
    r = requests.get(f"http://127.0.0.1:{stubs['partial'].port}/half", proxies=egress_proxies, timeout=30)
    _assert_recorded_504(timed, r, started, READ_TIMEOUT + 3)


@pytest.mark.integration
def test_an_upstream_that_cannot_be_connected_to_is_a_recorded_504(timed, stubs, egress_proxies):
    started = time.monotonic()
    r = requests.get(f"http://127.0.0.1:{stubs['unconnectable'].port}/x", proxies=egress_proxies, timeout=30)
    body = _assert_recorded_504(timed, r, started, CONNECT_TIMEOUT + 3)
    assert "connect" in body["detail"] and "connect_timeout_seconds" in body["detail"]


@pytest.mark.integration
def test_an_upstream_that_never_completes_tls_is_a_recorded_504(timed, stubs, idp):
    """Through a CONNECT tunnel to a host that accepts TCP but never answers the TLS handshake."""
    token = idp.token("egress-bot", groups=["egress"])
    proxies = {"https": timed.proxy_url_with("egress-bot", token)}
    started = time.monotonic()
    r = requests.get(f"https://127.0.0.1:{stubs['silent'].port}/tls", proxies=proxies, timeout=30, verify=str(timed.ca_pem))
    body = _assert_recorded_504(timed, r, started, READ_TIMEOUT + 3)
    assert "TLS handshake" in body["detail"]


@pytest.fixture(scope="module")
def patient(tmp_path_factory, idp, pki, upstream, upstream_tls, stubs):
    """Idle timeout 1 s, read timeout 5 s, and JWKS keys that take 2.5 s to arrive."""
    jwks = JwksServer(pki, json.loads(idp.jwks_path.read_text()), delay=2.5)
    issuer = {"issuer": idp.issuer, "audience": idp.audience, "jwks_url": jwks.url,
              "jwks_ca_file": str(pki.ca_pem), "algorithms": ["RS256", "ES256"]}
    p = start_proctor(
        tmp_path_factory.mktemp("patient"), idp, pki, upstream, upstream_tls,
        overrides={
            "upstream": {"read_timeout_seconds": 5},
            "limits": {"client_idle_timeout_seconds": IDLE_TIMEOUT},
            "egress": {"default": "deny", "unclassified_hosts": [f"127.0.0.1:{stubs['slow'].port}"]},
            "identity": {"issuers": [issuer]},
        },
    )
    yield p
    p.stop()
    jwks.close()


@pytest.mark.integration
def test_waiting_for_proctor_is_not_idleness(patient, stubs, idp, upstream):
    """Idle timeout 1 s: authentication waits 2.5 s for the IdP's keys (in a hook), then
    the upstream takes 2.5 s to answer (the client waits for us: the idle watchdog is
    disarmed until the answer is sent). Both requests succeed on one connection."""
    token = idp.token("egress-bot", groups=["egress"])
    with requests.Session() as s:
        s.proxies = {"http": patient.proxy_url_with("egress-bot", token)}
        started = time.monotonic()
        r = s.get(f"http://127.0.0.1:{upstream.port}/items/1", timeout=30)
        assert r.status_code == 200, r.text
        assert time.monotonic() - started >= 2.0  # it did wait for the keys
        started = time.monotonic()
        r = s.get(f"http://127.0.0.1:{stubs['slow'].port}/slow", timeout=30)
        assert r.status_code == 200 and r.json() == {"slow": True}
        assert time.monotonic() - started >= 2.0


# --------------------------------------------------------------------- clients
def _closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the proxy closed `sock` (EOF or reset); fails if it stays open past `limit`."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the connection was still open after {limit} s")
    return time.monotonic() - started


def _cred(idp) -> str:
    token = idp.token("writer-bot", groups=["writers"])
    return base64.b64encode(f"writer-bot:{token}".encode()).decode()


@pytest.mark.integration
@pytest.mark.parametrize(
    "opening",
    [
        b"",  # connected, never sends a byte
        b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1",  # half a request head
    ],
    ids=["silent", "half-a-head"],
)
def test_an_idle_client_is_closed(timed, opening):
    with socket.create_connection(("127.0.0.1", timed.port), timeout=10) as s:
        if opening:
            s.sendall(opening)
        took = _closed_after(s, IDLE_TIMEOUT + 4)
    assert took >= IDLE_TIMEOUT * 0.8


@pytest.mark.integration
def test_a_client_that_stops_in_the_middle_of_its_body_is_closed(timed, idp, upstream):
    upstream.clear()
    with socket.create_connection(("127.0.0.1", timed.port), timeout=10) as s:
        s.sendall(f"POST http://127.0.0.1:{upstream.port}/items HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                  f"Proxy-Authorization: Basic {_cred(idp)}\r\nContent-Type: application/json\r\n"
                  "Content-Length: 100\r\n\r\n{\"amount\":".encode())
        took = _closed_after(s, IDLE_TIMEOUT + 4)
    assert took >= IDLE_TIMEOUT * 0.8
    assert upstream.received() == []


@pytest.mark.integration
def test_an_idle_keep_alive_connection_is_closed(timed, idp, upstream):
    with socket.create_connection(("127.0.0.1", timed.port), timeout=10) as s:
        s.sendall(f"GET http://127.0.0.1:{upstream.port}/items/1 HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                  f"Proxy-Authorization: Basic {_cred(idp)}\r\n\r\n".encode())
        s.settimeout(10)
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200"), first[:200]
        took = _closed_after(s, IDLE_TIMEOUT + 4)
    assert took >= IDLE_TIMEOUT * 0.5


@pytest.mark.integration
def test_a_tunnel_without_a_tls_handshake_is_closed(timed, idp, upstream_tls):
    with socket.create_connection(("127.0.0.1", timed.port), timeout=10) as s:
        s.sendall(f"CONNECT localhost:{upstream_tls.port} HTTP/1.1\r\nHost: localhost:{upstream_tls.port}\r\n"
                  f"Proxy-Authorization: Basic {_cred(idp)}\r\n\r\n".encode())
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        took = _closed_after(s, IDLE_TIMEOUT + 4)
    assert took >= IDLE_TIMEOUT * 0.8


# ---------------------------------------------------------------------- config
def test_timeout_defaults_and_bounds():
    up, limits = UpstreamConfig(), RequestLimits()
    assert (up.connect_timeout_seconds, up.read_timeout_seconds, limits.client_idle_timeout_seconds) == (10, 60, 60)
    for bad in ({"connect_timeout_seconds": 0}, {"read_timeout_seconds": -1}, {"read_timeout_seconds": 7200}):
        with pytest.raises(ValidationError):
            UpstreamConfig(**bad)
    with pytest.raises(ValidationError):
        RequestLimits(client_idle_timeout_seconds=0)


def test_a_connection_disarmed_again_right_after_a_long_hook_is_not_timed_out():
    """mitmproxy's watchdog sleeps from the last activity and, on waking, closes the
    connection without checking whether it was disarmed meanwhile: a hook that starts
    right after a long one (e.g. `request` after `requestheaders` waited for the IdP)
    and outlasts the timeout would lose its connection. Proctor's watch re-checks."""
    fired: list[float] = []

    async def scenario() -> None:
        async def on_timeout() -> None:
            fired.append(time.monotonic())

        watchdog = TimeoutWatchdog(0.3, on_timeout)
        watch = asyncio.create_task(_watch_respecting_disarm(watchdog))
        with watchdog.disarm():  # a hook longer than the timeout: the watch waits for re-arming
            await asyncio.sleep(0.5)
        with watchdog.disarm():  # the next hook, right away, also longer than the timeout
            await asyncio.sleep(0.8)
        assert fired == []
        await asyncio.sleep(0.6)  # idle for real now
        assert len(fired) == 1
        await watch

    asyncio.run(scenario())
