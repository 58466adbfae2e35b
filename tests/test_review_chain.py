"""Review of the stage-chain refactor (issue 11): what reaches the upstream must be
exactly what was decided, on both gateway engines and through the forward proxy.

Each test is an attack through real processes (proctor, the recording echo upstream).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from conftest import DATA, basic_proxy_auth

from test_gateway_attacks import send_raw, status_of

pytestmark = pytest.mark.integration

# Item 42 may never be read; every other item may.
FORBID_42 = """
@id("never-item-42")
forbid (principal, action == Action::"test.item.read", resource == Item::"42");
"""


@pytest.fixture
def token(idp) -> str:
    return idp.token("writer-bot", groups=["writers", "readers"])


@pytest.fixture(scope="session")
def forbid_42_policies(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("forbid-42") / "policies"
    shutil.copytree(DATA / "policies", d)
    (d / "forbid42.cedar").write_text(FORBID_42)
    return d


def _reads_of_item_42(upstream) -> list[dict]:
    # what an upstream framework routes on: the path without a fragment
    return [e for e in upstream.received() if e["path"].partition("#")[0].partition("?")[0] == "/items/42"]


# ---------------------------------------------------------------- 1. fragments
def test_a_fragment_in_a_gateway_request_target_does_not_bypass_a_resource_policy(
        proctor_factory, gateway_engine, upstream, token, forbid_42_policies):
    """Policy judged Item::"42#x"; an upstream that parses the target (aiohttp, Starlette,
    Express, ...) drops the fragment and reads item 42, which policy forbids."""
    p = proctor_factory({"gateway": {"engine": gateway_engine}}, policies_src=forbid_42_policies)
    upstream.clear()
    plain = send_raw(p.gateway_port, (f"GET /svc/items/42 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      f"Authorization: Bearer {token}\r\n\r\n").encode())
    assert status_of(plain) == 403, plain[:300]  # the policy works
    reply = send_raw(p.gateway_port, (f"GET /svc/items/42#x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                      f"Authorization: Bearer {token}\r\n\r\n").encode())
    time.sleep(0.3)
    assert _reads_of_item_42(upstream) == [], f"item 42 reached the upstream: {reply[:300]!r}"
    assert status_of(reply) == 400, reply[:300]


def test_a_fragment_in_a_forward_proxy_request_target_does_not_bypass_a_resource_policy(
        proctor_factory, upstream, token, forbid_42_policies):
    p = proctor_factory(policies_src=forbid_42_policies)
    upstream.clear()
    auth = basic_proxy_auth("writer-bot", token)
    target = f"http://127.0.0.1:{upstream.port}/items/42"
    plain = send_raw(p.port, (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                              f"Proxy-Authorization: {auth}\r\n\r\n").encode())
    assert status_of(plain) == 403, plain[:300]
    reply = send_raw(p.port, (f"GET {target}#x HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
                              f"Proxy-Authorization: {auth}\r\n\r\n").encode())
    time.sleep(0.3)
    assert _reads_of_item_42(upstream) == [], f"item 42 reached the upstream: {reply[:300]!r}"
    assert status_of(reply) == 400, reply[:300]


# ------------------------------------------------- 2. Connection-listed headers
def test_a_header_policy_read_is_never_dropped_on_the_way_upstream(gateway_proctor, gateway_engine, upstream, token):
    """`Connection: X-Request-Id` makes an RFC-conforming intermediary (the aiohttp gateway
    engine itself) drop a header Cedar saw (x-request-id is in limits.context_headers):
    the upstream must get exactly what was decided, or the request must be refused."""
    upstream.clear()
    raw = (f"GET /svc/items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
           "X-Request-Id: audit-123\r\nConnection: keep-alive, X-Request-Id\r\n\r\n").encode()
    reply = send_raw(gateway_proctor.gateway_port, raw)
    time.sleep(0.3)
    decision_id = next((line.split(b":", 1)[1].strip().decode() for line in reply.split(b"\r\n")
                        if line.lower().startswith(b"x-proctor-decision-id:")), None)
    assert decision_id is not None, reply[:300]
    rec = gateway_proctor.decision(decision_id)
    if status_of(reply) == 200:
        assert rec["cedar"]["context"]["headers"].get("x-request-id") == "audit-123"  # what policy judged
        got = upstream.headers_of(upstream.last())
        assert got.get("x-request-id") == "audit-123", f"the upstream got {got}"
    else:
        assert status_of(reply) == 400 and upstream.received() == []


def test_content_type_policy_read_is_never_dropped_on_the_way_upstream(gateway_proctor, gateway_engine, upstream, token):
    """The body was read as JSON because of Content-Type (and the approval fingerprint binds it);
    the upstream must not get the body without it."""
    upstream.clear()
    body = b'{"amount": 5}'
    raw = (f"POST /svc/items HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: Content-Type\r\n\r\n"
           ).encode() + body
    reply = send_raw(gateway_proctor.gateway_port, raw)
    time.sleep(0.3)
    if status_of(reply) == 200:
        got = upstream.headers_of(upstream.last())
        assert got.get("content-type") == "application/json", f"the upstream got {got}"
    else:
        assert status_of(reply) == 400 and upstream.received() == []


# ------------------------------------------- 3. the fail-closed record's latency
def test_an_engine_hook_exception_is_recorded_with_null_latency_as_documented(monkeypatch):
    """docs/decision-record.md: a 503 after an exception in the engine adapter's request hook
    "has no method, host, ... and `latency_ms` is `null`" (as at 5b4d6ef)."""
    import asyncio

    from mitmproxy.test import tflow
    from test_engine_fail_closed_unit import _addon, _Allow

    addon, recorder = _addon([_Allow()])

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug in the adapter")

    monkeypatch.setattr(addon, "_agent_request", boom)
    asyncio.run(addon.request(tflow.tflow()))
    rec = recorder.records[-1]
    assert rec["status"] == 503 and rec["error"] == "internal error in request"
    assert "method" not in rec
    assert rec["latency_ms"] is None
