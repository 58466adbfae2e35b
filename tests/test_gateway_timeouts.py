"""Timeouts on the gateway listener, on both gateway engines.

The same misbehaving stub upstreams as tests/test_timeouts.py (which covers the
forward proxy): one that never answers, one that stops in the middle of its body,
one whose TCP handshake never completes, one that answers slowly. A hanging
upstream is a recorded 504 carrying the decision id; an idle client is closed;
waiting for Proctor (a slow upstream) is not idleness.
"""

from __future__ import annotations

import base64
import socket
import time

import pytest
import requests

from conftest import start_proctor
from test_timeouts import CONNECT_TIMEOUT, IDLE_TIMEOUT, StubUpstream, Unconnectable

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stubs():
    made = {"silent": StubUpstream("silent"), "partial": StubUpstream("partial"),
            "slow": StubUpstream("slow", delay=2.5), "unconnectable": Unconnectable()}
    yield made
    for s in made.values():
        s.close()


@pytest.fixture(scope="module")
def timed_gateway(tmp_path_factory, gateway_engine, idp, pki, upstream, upstream_tls, stubs):
    routes = [{"prefix": f"/{name}", "upstream": f"http://127.0.0.1:{stub.port}"} for name, stub in stubs.items()]
    routes.append({"prefix": "/svc", "upstream": f"http://127.0.0.1:{upstream.port}"})
    p = start_proctor(
        tmp_path_factory.mktemp(f"gateway-timeouts-{gateway_engine}"), idp, pki, upstream, upstream_tls,
        overrides={
            "gateway": {"engine": gateway_engine, "routes": routes},
            "upstream": {"connect_timeout_seconds": CONNECT_TIMEOUT, "read_timeout_seconds": 4.0},
            "limits": {"client_idle_timeout_seconds": IDLE_TIMEOUT},
            "egress": {"default": "deny", "unclassified_hosts": [f"127.0.0.1:{s.port}" for s in stubs.values()]},
        },
    )
    yield p
    p.stop()


@pytest.fixture(scope="module")
def bearer(idp) -> dict[str, str]:
    return {"Authorization": f"Bearer {idp.token('egress-bot', groups=['egress'])}"}


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


def test_an_upstream_that_never_answers_is_a_recorded_504(timed_gateway, stubs, bearer):
    started = time.monotonic()
    r = requests.get(f"{timed_gateway.gateway_url}/silent/hang", headers=bearer, timeout=30)
    body = _assert_recorded_504(timed_gateway, r, started, 4.0 + 3)
    assert time.monotonic() - started >= 4.0 * 0.9
    assert "read_timeout_seconds" in body["detail"]
    assert any(b"GET /hang " in req for req in stubs["silent"].requests)


def test_an_upstream_that_stops_mid_body_is_a_recorded_504(timed_gateway, bearer):
    started = time.monotonic()
    r = requests.get(f"{timed_gateway.gateway_url}/partial/half", headers=bearer, timeout=30)
    _assert_recorded_504(timed_gateway, r, started, 4.0 + 3)


def test_an_upstream_that_cannot_be_connected_to_is_a_recorded_504(timed_gateway, bearer):
    started = time.monotonic()
    r = requests.get(f"{timed_gateway.gateway_url}/unconnectable/x", headers=bearer, timeout=30)
    body = _assert_recorded_504(timed_gateway, r, started, CONNECT_TIMEOUT + 3)
    assert "connect" in body["detail"] and "connect_timeout_seconds" in body["detail"]


def test_waiting_for_a_slow_upstream_is_not_idleness(timed_gateway, bearer):
    """Idle timeout 1 s, the upstream takes 2.5 s: the client is waiting for us, not idle."""
    with requests.Session() as s:
        started = time.monotonic()
        r = s.get(f"{timed_gateway.gateway_url}/slow/slow", headers=bearer, timeout=30)
        assert r.status_code == 200 and r.json() == {"slow": True}
        assert time.monotonic() - started >= 2.0
        assert s.get(f"{timed_gateway.gateway_url}/svc/items/1", headers=bearer, timeout=30).status_code in (200, 403)


def _closed_after(sock: socket.socket, limit: float) -> float:
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the connection was still open after {limit} s")
    return time.monotonic() - started


@pytest.mark.parametrize("opening", [b"", b"GET /svc/items/1 HTTP/1.1\r\nHost: 127.0.0.1"], ids=["silent", "half-a-head"])
def test_an_idle_client_is_closed(timed_gateway, opening):
    with socket.create_connection(("127.0.0.1", timed_gateway.gateway_port), timeout=10) as s:
        if opening:
            s.sendall(opening)
        took = _closed_after(s, IDLE_TIMEOUT + 4)
    assert took >= IDLE_TIMEOUT * 0.8


def test_a_client_that_stops_in_the_middle_of_its_body_is_closed(timed_gateway, idp, upstream):
    upstream.clear()
    token = idp.token("writer-bot", groups=["writers"])
    with socket.create_connection(("127.0.0.1", timed_gateway.gateway_port), timeout=10) as s:
        s.sendall(f"POST /svc/items HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"amount\":".encode())
        took = _closed_after(s, IDLE_TIMEOUT + 4)
    assert took >= IDLE_TIMEOUT * 0.8
    assert upstream.received() == []


def test_an_idle_keep_alive_connection_is_closed(timed_gateway, idp):
    token = base64.b64encode(b"unused").decode()  # any answer will do: a 401 keeps the connection too
    with socket.create_connection(("127.0.0.1", timed_gateway.gateway_port), timeout=10) as s:
        s.sendall(f"GET /svc/items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
        s.settimeout(10)
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 401"), first[:200]
        took = _closed_after(s, IDLE_TIMEOUT + 4)
    assert took >= IDLE_TIMEOUT * 0.5
