"""No work before authentication, and bounded request bodies.

Through a real proxy with raw sockets (ordinary clients hide `100 Continue` and
early answers): a request announcing a body is authenticated from its head; a
refusal comes back before the body is read and without `100 Continue`; an
oversized declared body is refused unread; a chunked body is cut off at the
limit; bodies still arriving share a process-wide budget (many concurrent slow
uploads); while authentication waits for the IdP, the body stays in the
client's socket. Plus fast unit tests of the body budget and of the adapter
reusing the identity it proved.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import select
import socket
import time

import pytest
from mitmproxy.test import tflow

from proxy.config import RequestLimits
from proxy.core.chain import Chain, Stage
from proxy.core.exchange import Exchange
from proxy.core.model import AgentIdentity
from proxy.engine.bodylimits import BodyBudget, BodyGuard
from proxy.engine.mitm import ProctorAddon
from proxy.engine.patches import BODY_GUARD, EARLY_ANSWER
from support.jwks_server import JwksServer


# ----------------------------------------------------------------- helpers
def _cred(agent: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{agent}:{token}".encode()).decode()


def _head(url_host: str, path: str, cred: str | None, extra: str = "", method: str = "POST") -> bytes:
    auth = f"Proxy-Authorization: {cred}\r\n" if cred else ""
    return (f"{method} http://{url_host}{path} HTTP/1.1\r\nHost: {url_host}\r\n{auth}"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


def _recv_some(sock: socket.socket, timeout: float) -> bytes:
    """Whatever arrives within `timeout` (b"" when nothing, or the peer closed)."""
    sock.settimeout(timeout)
    try:
        return sock.recv(65536)
    except (socket.timeout, BlockingIOError):
        return b""
    except ConnectionResetError:
        return b"<reset>"


def _read_response(sock: socket.socket, timeout: float = 10) -> bytes:
    """One whole response (head + Content-Length body), or what came before the peer closed."""
    sock.settimeout(timeout)
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if head.startswith(b"HTTP/1.1 100") and len(head) + 4 <= len(data):
                pass  # an interim response: the caller decides what to do
            elif len(body) >= length:
                return data
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            return data
        if not chunk:
            return data
        data += chunk
        if data.startswith(b"HTTP/1.1 100") and data.endswith(b"\r\n\r\n") and data.count(b"\r\n\r\n") == 1:
            return data


def _problem(reply: bytes) -> dict:
    return json.loads(reply.partition(b"\r\n\r\n")[2])


def _closed(sock: socket.socket, timeout: float = 5) -> bool:
    """The proxy closed the connection (EOF or reset) within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _recv_some(sock, 0.2)
        if got in (b"", b"<reset>"):
            try:
                sock.settimeout(0.2)
                more = sock.recv(1)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return True
            if more == b"":
                return True
    return False


def _json_body(size: int) -> bytes:
    body = b'{"pad":"' + b"x" * (size - 10) + b'"}'
    assert len(body) == size
    return body


@pytest.fixture
def writer(idp):
    return _cred("writer-bot", idp.token("writer-bot", groups=["writers"]))


# ----------------------------------------------------------- authentication first
@pytest.mark.integration
def test_unauthenticated_body_is_refused_from_the_head_without_100_continue(proctor, upstream, idp):
    upstream.clear()
    target = f"127.0.0.1:{upstream.port}"
    for cred in (_cred("writer-bot", "not-a-jwt"), None, _cred("writer-bot", idp.token("writer-bot", aud="other"))):
        with socket.create_connection(("127.0.0.1", proctor.port), timeout=10) as s:
            s.sendall(_head(target, "/items", cred, "Content-Length: 5000\r\nExpect: 100-continue\r\n"))
            reply = _read_response(s)  # the body is never sent: the answer must not wait for it
        assert reply.startswith(b"HTTP/1.1 407"), reply[:200]
        assert b"100 Continue" not in reply
        head = reply.partition(b"\r\n\r\n")[0].lower()
        assert b"connection: close" in head and b"proxy-authenticate:" in head
        problem = _problem(reply)
        assert problem["title"] == "Proxy authentication required" and problem["decision_id"]
        rec = proctor.decision(problem["decision_id"])
        assert rec["status"] == 407 and rec["decision"] == "deny"
    assert upstream.received() == []


@pytest.mark.integration
def test_a_refused_client_still_sending_a_small_body_reads_the_refusal(proctor, upstream):
    """No Expect: the body follows the head at once. It is read and discarded (never
    buffered), so the client gets the 407 rather than a reset connection."""
    upstream.clear()
    target = f"127.0.0.1:{upstream.port}"
    body = _json_body(200_000)
    with socket.create_connection(("127.0.0.1", proctor.port), timeout=10) as s:
        s.sendall(_head(target, "/items", _cred("writer-bot", "bad"), f"Content-Length: {len(body)}\r\n") + body)
        reply = _read_response(s)
        assert _closed(s)
    assert reply.startswith(b"HTTP/1.1 407"), reply[:200]
    assert upstream.received() == []


@pytest.mark.integration
def test_authenticated_expect_100_continue_then_forwarded(proctor, upstream, writer):
    upstream.clear()
    target = f"127.0.0.1:{upstream.port}"
    body = b'{"amount": 5}'
    with socket.create_connection(("127.0.0.1", proctor.port), timeout=10) as s:
        s.sendall(_head(target, "/items", writer, f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"))
        interim = _read_response(s)
        assert interim.startswith(b"HTTP/1.1 100"), interim[:200]
        s.sendall(body)
        reply = _read_response(s)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    got = upstream.last()
    assert got["body"] == body.decode()
    headers = upstream.headers_of(got)
    assert "proxy-authorization" not in headers and "authorization" not in headers and "expect" not in headers


@pytest.mark.integration
def test_declared_body_over_the_limit_is_refused_unread(proctor, upstream, writer):
    upstream.clear()
    target = f"127.0.0.1:{upstream.port}"
    with socket.create_connection(("127.0.0.1", proctor.port), timeout=10) as s:
        s.sendall(_head(target, "/items", writer, f"Content-Length: {2 * 1024 * 1024}\r\nExpect: 100-continue\r\n"))
        reply = _read_response(s)
        assert _closed(s)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"100 Continue" not in reply
    problem = _problem(reply)
    assert problem["title"] == "Request body too large" and problem["agent"] == "writer-bot"
    assert proctor.decision(problem["decision_id"])["status"] == 413
    assert upstream.received() == []


@pytest.mark.integration
def test_an_unauthenticated_client_cannot_make_proctor_read_its_body(proctor, upstream):
    """50 MiB declared (under the engine's 64 MiB ceiling), a bad token: the answer comes
    from the head and the connection is closed; the body is never read."""
    target = f"127.0.0.1:{upstream.port}"
    sent = 0
    with socket.create_connection(("127.0.0.1", proctor.port), timeout=10) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        s.sendall(_head(target, "/items", _cred("x", "bad"), f"Content-Length: {50 * 1024 * 1024}\r\n"))
        chunk = b"x" * 65536
        try:
            while sent < 50 * 1024 * 1024:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
    assert sent < 16 * 1024 * 1024, f"the proxy accepted {sent} body bytes from an unauthenticated client"
    assert proctor.health()["status"] in ("ok", "degraded")


@pytest.mark.integration
def test_gateway_body_needs_authentication_first(proctor, upstream):
    upstream.clear()
    with socket.create_connection(("127.0.0.1", proctor.gateway_port), timeout=10) as s:
        s.sendall(b"POST /svc/items HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer nope\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 9000\r\nExpect: 100-continue\r\n\r\n")
        reply = _read_response(s)
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert b"100 Continue" not in reply and b"www-authenticate:" in reply.lower()
    rec = proctor.decision(_problem(reply)["decision_id"])
    assert rec["status"] == 401 and rec["path"] == "/svc/items"
    assert upstream.received() == []


@pytest.mark.integration
def test_gateway_bearer_is_stripped_from_a_forwarded_body_request(proctor, upstream, idp):
    """The identity proven from the head is reused by the decision; the agent's token still never reaches the upstream."""
    upstream.clear()
    token = idp.token("writer-bot", groups=["writers"])
    body = b'{"amount": 3}'
    with socket.create_connection(("127.0.0.1", proctor.gateway_port), timeout=10) as s:
        s.sendall(b"POST /svc/items HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        reply = _read_response(s)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    got = upstream.last()
    assert got["body"] == body.decode()
    assert "authorization" not in upstream.headers_of(got)


# ---------------------------------------------------- the body waits for the IdP
@pytest.mark.integration
def test_the_body_stays_in_the_socket_while_authentication_waits(proctor_factory, pki, idp, upstream):
    """While the token's keys are being fetched, Proctor reads nothing past the head:
    the client can push only what the kernel's socket buffers hold, not its 48 MiB."""
    upstream.clear()
    jwks = JwksServer(pki, json.loads(idp.jwks_path.read_text()), hold=True)  # answers once released
    try:
        issuer = {"issuer": idp.issuer, "audience": idp.audience, "jwks_url": jwks.url,
                  "jwks_ca_file": str(pki.ca_pem), "algorithms": ["RS256", "ES256"]}
        p = proctor_factory({"identity": {"issuers": [issuer]}})
        cred = _cred("writer-bot", idp.token("writer-bot", groups=["writers"]))
        target = f"127.0.0.1:{upstream.port}"
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            s.sendall(_head(target, "/items", cred, f"Content-Length: {48 * 1024 * 1024}\r\n"))
            s.setblocking(False)
            sent, chunk, idle_since = 0, b"x" * 65536, time.monotonic()
            while time.monotonic() - idle_since < 1.5 and sent < 48 * 1024 * 1024:
                if not select.select([], [s], [], 0.1)[1]:
                    continue
                try:
                    sent += s.send(chunk)
                    idle_since = time.monotonic()
                except BlockingIOError:
                    pass
            assert sent < 16 * 1024 * 1024, f"the proxy read {sent} body bytes before authenticating"
            jwks.release.set()  # authentication completes: 48 MiB is over limits.max_body_bytes
            s.setblocking(True)

            deadline = time.monotonic() + 10
            while not [r for r in p.decisions() if r["status"] == 413] and time.monotonic() < deadline:
                time.sleep(0.1)
        recs = [r for r in p.decisions() if r["status"] == 413]
        assert len(recs) == 1 and recs[0]["agent"] == "writer-bot", p.decisions()
        assert upstream.received() == []
    finally:
        jwks.stop()


# ------------------------------------------------------------ in-flight budget
SMALL = {"limits": {"max_body_bytes": 65536, "max_inflight_body_bytes": 3 * 65536}}


@pytest.mark.integration
def test_many_concurrent_slow_uploads_share_the_budget(proctor_factory, upstream, idp):
    """Budget for three 60 KB bodies: of ten slow uploads three are admitted and wait
    for their bodies, seven get 503 at once (before their bodies are read); when an
    upload completes, its share is free again."""
    upstream.clear()
    p = proctor_factory(SMALL)
    cred = _cred("writer-bot", idp.token("writer-bot", groups=["writers"]))
    target = f"127.0.0.1:{upstream.port}"
    body = _json_body(60_000)
    socks = []
    try:
        for _ in range(10):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
            s.sendall(_head(target, "/items", cred, f"Content-Length: {len(body)}\r\n") + body[:100])
            socks.append(s)
            time.sleep(0.05)
        answers = [_recv_some(s, 1.0) for s in socks]
        waiting = [s for s, a in zip(socks, answers) if a == b""]
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        assert len(waiting) == 3 and len(refused) == 7, [a[:40] for a in answers]
        for a in refused:
            head = a.partition(b"\r\n\r\n")[0].lower()
            assert b"retry-after: 1" in head and b"application/problem+json" in head
            problem = _problem(a)
            assert problem["title"] == "Proctor is busy" and problem["agent"] == "writer-bot"
            assert p.decision(problem["decision_id"])["status"] == 503
        # one admitted upload completes: forwarded, and its share of the budget is back
        waiting[0].sendall(body[100:])
        assert _read_response(waiting[0]).startswith(b"HTTP/1.1 200")
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(_head(target, "/items", cred, f"Content-Length: {len(body)}\r\n") + body[:100])
            assert _recv_some(s, 1.0) == b""  # admitted: waits for its body
            s.sendall(body[100:])
            assert _read_response(s).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()
    assert len([e for e in upstream.received() if e["path"] == "/items"]) == 2


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.integration
def test_chunked_bodies_are_bounded_while_they_arrive(proctor_factory, upstream, idp):
    upstream.clear()
    p = proctor_factory(SMALL)
    cred = _cred("writer-bot", idp.token("writer-bot", groups=["writers"]))
    target = f"127.0.0.1:{upstream.port}"
    chunked = "Transfer-Encoding: chunked\r\n"
    # one chunked body past limits.max_body_bytes: 413 as soon as it crosses, connection closed
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(_head(target, "/items", cred, chunked))
        reply = b""
        for _ in range(20):
            try:
                s.sendall(_chunk(b"y" * 8192))
            except (BrokenPipeError, ConnectionResetError):
                break
            reply = _recv_some(s, 0.2)
            if reply:
                break
        assert reply in (b"<reset>",) or reply.startswith(b"HTTP/1.1 413"), reply[:100]
        assert _closed(s)
    assert any(r["status"] == 413 and "writer-bot" in json.dumps(r) for r in p.decisions())
    # slow chunked uploads fill the in-flight budget: the one that overflows it gets 503
    held = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", p.port), timeout=10)
            s.sendall(_head(target, "/items", cred, chunked) + _chunk(b'{"pad":"' + b"z" * 60_000))
            held.append(s)
        time.sleep(0.3)
        assert all(_recv_some(s, 0.2) == b"" for s in held)  # all three within the budget
        with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
            s.sendall(_head(target, "/items", cred, chunked) + _chunk(b'{"pad":"' + b"z" * 20_000))
            reply = _read_response(s, 5)
        assert reply.startswith(b"HTTP/1.1 503"), reply[:100]
        assert _problem(reply)["title"] == "Proctor is busy"
        # an admitted chunked upload still completes
        held[0].sendall(_chunk(b'"}') + b"0\r\n\r\n")
        assert _read_response(held[0]).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
    assert [e["path"] for e in upstream.received()] == ["/items"]


# ------------------------------------------------------------------ unit tests
def test_body_guard_reserves_declared_bytes_and_grows_chunked_ones():
    budget = BodyBudget(100)
    a = BodyGuard(budget, max_bytes=60, declared=60)
    assert a.admitted and budget.in_use == 60
    assert BodyGuard(budget, max_bytes=60, declared=50).verdict == "busy"
    assert BodyGuard(budget, max_bytes=60, declared=61).verdict == "too-large"
    assert budget.in_use == 60  # refused guards hold nothing
    c = BodyGuard(budget, max_bytes=60, declared=None)
    assert c.on_data(30) is None and budget.in_use == 90
    assert c.on_data(20) == "busy" and budget.in_use == 60  # refused: its share is returned
    a.on_data(60)
    assert budget.in_use == 60  # within what was declared: nothing more taken
    a.release()
    assert budget.in_use == 0
    d = BodyGuard(budget, max_bytes=60, declared=None)
    assert d.on_data(61) == "too-large" and budget.in_use == 0


def test_a_forgotten_reservation_is_returned_when_the_request_is_collected():
    budget = BodyBudget(100)
    guard = BodyGuard(budget, max_bytes=100, declared=80)
    assert budget.in_use == 80
    del guard
    gc.collect()
    assert budget.in_use == 0


def test_inflight_budget_must_hold_one_body():
    with pytest.raises(ValueError):
        RequestLimits(max_body_bytes=2 * 1024 * 1024, max_inflight_body_bytes=1024 * 1024)


class _CountingAuthentication(Stage):
    """Authenticates (counting) from the head or in the request phase, like the real stage."""

    name = "authenticate"

    def __init__(self) -> None:
        self.identity = AgentIdentity(agent_id="writer-bot", issuer="https://idp.test", claims={}, expires_at=None)
        self.authentications = 0
        self.decided: list = []

    def on_head(self, ex: Exchange) -> None:
        self.authentications += 1
        ex.identity = self.identity
        ex.stage_data["proven"] = True

    def on_request(self, ex: Exchange) -> None:
        if not ex.stage_data.pop("proven", False):
            self.authentications += 1
        self.decided.append((ex.request, ex.identity))


class _Recorder:
    def __init__(self) -> None:
        self.records = []

    def write(self, rec) -> None:
        self.records.append(rec)


def _addon(stage):
    from proxy.record.stage import RecordDecision

    record = RecordDecision(_Recorder())
    return ProctorAddon(Chain([record, stage]), Chain([record]), router=None, limits=RequestLimits())


def test_identity_proven_from_the_head_is_used_by_the_decision():
    stage = _CountingAuthentication()
    addon = _addon(stage)
    flow = tflow.tflow()
    flow.request.method = "POST"
    flow.request.headers["content-length"] = "5"
    flow.request.content = b"hello"

    async def scenario():
        await addon.requestheaders(flow)
        assert EARLY_ANSWER not in flow.metadata and flow.response is None
        assert flow.metadata[BODY_GUARD].held == 5 and addon.body_budget.in_use == 5
        flow.metadata[BODY_GUARD].release()
        await addon.request(flow)

    asyncio.run(scenario())
    assert stage.authentications == 1  # once, from the head
    assert len(stage.decided) == 1  # and still a full decision before forwarding
    req, identity = stage.decided[0]
    assert identity is stage.identity
    assert req.body == b"hello"
    assert flow.response is None  # allowed: forwarded


def test_a_request_without_a_body_is_authenticated_by_the_decision_only():
    stage = _CountingAuthentication()
    addon = _addon(stage)
    flow = tflow.tflow()
    del flow.request.headers["content-length"]  # a GET without a body
    flow.request.content = b""
    assert addon.requestheaders(flow) is None
    asyncio.run(addon.request(flow))
    assert stage.authentications == 1 and len(stage.decided) == 1
