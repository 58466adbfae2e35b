"""Hostile requests to the gateway listener, on both gateway engines (mitmproxy, aiohttp).

Raw sockets, because ordinary clients never send these on purpose: request
smuggling shapes (CL+TE, duplicate or malformed Content-Length, Transfer-Encoding
variants, obs-fold, bare CR, NUL), oversized heads, `100 Continue` before
authentication, bodies over the limit (declared and chunked), absolute-form and
other non-origin request lines, and Host headers that disagree with the route.

Each case says what the gateway must do, whatever engine serves it: both engines
pass every case. (mitmproxy's HTTP/1 reader accepts request lines aiohttp's parser
refuses, such as other HTTP versions, lower-case methods and raw non-ASCII targets;
the target stage, core/target.py, refuses them for every engine.)
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import time

import httpx
import pytest

pytestmark = pytest.mark.integration

STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")


def status_of(reply: bytes) -> int | None:
    m = STATUS.match(reply)
    return int(m.group(1)) if m else None


def read_response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One answer (head + Content-Length body), or what came before the close or the timeout."""
    sock.settimeout(timeout)
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep and not head.startswith(b"HTTP/1.1 100"):
            length = 0
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v)
            if len(body) >= length:
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


def send_raw(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_response(s, timeout)


def problem(reply: bytes) -> dict:
    return json.loads(reply.partition(b"\r\n\r\n")[2])


@pytest.fixture
def token(idp) -> str:
    return idp.token("writer-bot", groups=["writers", "readers"])


def _post(token: str, framing: str, body: bytes = b"", path: str = "/svc/items") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\n{framing}\r\n").encode() + body


def _get(token: str, extra: str = "", target: str = "/svc/items/1", version: str = "HTTP/1.1",
         host: str | None = "127.0.0.1", method: str = "GET") -> bytes:
    host_line = f"Host: {host}\r\n" if host is not None else ""
    return f"{method} {target} {version}\r\n{host_line}Authorization: Bearer {token}\r\n{extra}\r\n".encode("latin-1")


SMUGGLED = b"GET /svc/items/666 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"

# Framing the two engines must both refuse (400) before anything reaches the upstream;
# each body ends with a smuggled second request that must never arrive either.
FRAMING = {
    "cl-and-te": "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
    "te-not-chunked": "Transfer-Encoding: gzip\r\n",
    "te-chunked-twice": "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    "te-space-before-colon": "Transfer-Encoding : chunked\r\n",
    "te-obs-fold": "Transfer-Encoding:\r\n chunked\r\n",
    "duplicate-cl-same": "Content-Length: 2\r\nContent-Length: 2\r\n",
    "duplicate-cl-different": "Content-Length: 2\r\nContent-Length: 40\r\n",
    "cl-list": "Content-Length: 2, 2\r\n",
    "cl-signed": "Content-Length: +2\r\n",
    "obs-fold": "Content-Length: 2\r\nX-A: 1\r\n Transfer-Encoding: chunked\r\n",
    "bare-cr": "Content-Length: 2\r\nX-A: 1\rTransfer-Encoding: chunked\r\n",
    "nul": "Content-Length: 2\r\nX-A: 1\x00x\r\n",
    "duplicate-content-type": "Content-Length: 2\r\nContent-Type: text/plain\r\n",
}


@pytest.mark.parametrize("case", list(FRAMING))
def test_ambiguous_framing_is_refused_and_nothing_is_smuggled(gateway_proctor, upstream, token, case):
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _post(token, FRAMING[case], b"0\r\n\r\n" + SMUGGLED))
    assert status_of(reply) == 400, reply[:300]
    assert b"application/problem+json" in reply.partition(b"\r\n\r\n")[0].lower()
    time.sleep(0.2)
    assert upstream.received() == []


def test_transfer_codings_the_upstream_would_decode_are_refused(gateway_proctor, upstream, token):
    """gzip, chunked: framed as chunked, but an upstream could gunzip what policy never read."""
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _post(token, "Transfer-Encoding: gzip, chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"))
    assert status_of(reply) == 415, reply[:300]
    assert problem(reply)["title"] == "Transfer-Encoding refused"
    assert upstream.received() == []


def test_an_encoded_request_body_is_refused(gateway_proctor, upstream, token):
    """Policy reads the body as sent; a gzip body would be one thing to Proctor and another upstream."""
    upstream.clear()
    body = gzip.compress(b'{"amount": 1}')
    raw = _post(token, f"Content-Encoding: gzip\r\nContent-Length: {len(body)}\r\n", body)
    reply = send_raw(gateway_proctor.gateway_port, raw)
    assert status_of(reply) == 415, reply[:300]
    assert upstream.received() == []


def test_chunked_bodies_are_forwarded_as_read(gateway_proctor, upstream, token):
    upstream.clear()
    raw = _post(token, "Transfer-Encoding: chunked\r\n", b"5;ext=1\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n")
    reply = send_raw(gateway_proctor.gateway_port, raw)
    assert status_of(reply) == 200, reply[:300]
    assert upstream.last()["body"] == '{"a":1}'


def test_chunked_trailer_fields_never_reach_the_upstream(gateway_proctor, upstream, token):
    """mitmproxy refuses a chunked body with trailers; aiohttp reads and drops the trailer
    fields. Either way the upstream never gets a field policy did not see."""
    upstream.clear()
    raw = _post(token, "Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\nX-Trailer: sneaky\r\n\r\n")
    reply = send_raw(gateway_proctor.gateway_port, raw)
    time.sleep(0.2)
    got = upstream.received()
    assert status_of(reply) in (None, 200, 400), reply[:200]
    assert "sneaky" not in json.dumps(got)
    assert all(e["body"] == "{}" for e in got)


# ---------------------------------------------------------------- oversized heads
def test_a_header_flood_is_cut_off_early(gateway_proctor):
    """An unauthenticated client streaming header lines forever gets 431 and is disconnected."""
    with socket.create_connection(("127.0.0.1", gateway_proctor.gateway_port), timeout=10) as s:
        s.sendall(b"GET /svc/items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent, reply = 0, b""
        try:
            while sent < 8 * 1024 * 1024:
                s.sendall(b"X-Flood: " + os.urandom(16).hex().encode() * 60 + b"\r\n")
                sent += 2000
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            reply = s.recv(65536)
        except (ConnectionResetError, socket.timeout):
            pass
    assert sent < 4 * 1024 * 1024, "the gateway kept accepting header bytes"
    assert status_of(reply) in (431, None), reply[:100]
    assert httpx.get(f"{gateway_proctor.control_url}/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("where", ["request-line", "one-header", "many-headers"])
def test_a_head_over_the_bound_is_431(gateway_proctor, upstream, token, where):
    upstream.clear()
    if where == "request-line":
        raw = _get(token, target="/svc/items/" + "a" * 70_000)
    elif where == "one-header":
        raw = _get(token, "X-Big: " + "b" * 70_000 + "\r\n")
    else:
        raw = _get(token, "".join(f"X-H{i}: {'v' * 90}\r\n" for i in range(800)))
    reply = send_raw(gateway_proctor.gateway_port, raw)
    assert status_of(reply) in (431, None), reply[:200]
    if reply:
        assert problem(reply)["title"] == "Request header fields too large"
    assert upstream.received() == []


def test_many_headers_within_the_bound_are_fine(gateway_proctor, upstream, token):
    """aiohttp's own default (128 headers) is not the limit: the head's size is."""
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _get(token, "".join(f"X-H{i}: v\r\n" for i in range(120))))
    assert status_of(reply) == 200, reply[:200]


# ------------------------------------------------- authentication before the body
@pytest.mark.parametrize("path", ["/svc/items", "/no/such/route"])
def test_no_100_continue_before_authentication(gateway_proctor, upstream, path):
    """A bad token with Expect: 100-continue gets 401 from the head alone (never 100, never
    404 for an unknown route: routes are not probed anonymously); the body is never read."""
    upstream.clear()
    raw = _post("not-a-jwt", "Content-Length: 9000\r\nExpect: 100-continue\r\n", path=path)
    reply = send_raw(gateway_proctor.gateway_port, raw)
    assert status_of(reply) == 401, reply[:200]
    assert b"100 Continue" not in reply
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert b"www-authenticate: bearer" in head and b"connection: close" in head
    rec = gateway_proctor.decision(problem(reply)["decision_id"])
    assert rec["status"] == 401 and rec["path"] == path
    assert upstream.received() == []


def test_100_continue_after_authentication_then_forwarded(gateway_proctor, upstream, token):
    upstream.clear()
    body = b'{"amount": 5}'
    with socket.create_connection(("127.0.0.1", gateway_proctor.gateway_port), timeout=10) as s:
        s.sendall(_post(token, f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"))
        interim = read_response(s)
        assert interim.startswith(b"HTTP/1.1 100"), interim[:200]
        s.sendall(body)
        reply = read_response(s)
    assert status_of(reply) == 200, reply[:300]
    got = upstream.last()
    assert got["body"] == body.decode()
    assert not {"expect", "authorization"} & set(upstream.headers_of(got))


def test_a_declared_body_over_the_limit_is_refused_unread(gateway_proctor, upstream, token):
    upstream.clear()
    with socket.create_connection(("127.0.0.1", gateway_proctor.gateway_port), timeout=10) as s:
        s.sendall(_post(token, f"Content-Length: {2 * 1024 * 1024}\r\nExpect: 100-continue\r\n"))
        reply = read_response(s)
    assert status_of(reply) == 413 and b"100 Continue" not in reply, reply[:200]
    p = problem(reply)
    assert p["title"] == "Request body too large" and p["agent"] == "writer-bot"
    assert gateway_proctor.decision(p["decision_id"])["status"] == 413
    assert upstream.received() == []


def test_a_refused_client_still_sending_a_small_body_reads_the_refusal(gateway_proctor, upstream):
    """No Expect: the body follows the head at once; it is read and discarded (never
    buffered) so the client gets the 401 rather than a reset connection."""
    upstream.clear()
    body = b'{"pad":"' + b"x" * 200_000 + b'"}'
    reply = send_raw(gateway_proctor.gateway_port, _post("bad", f"Content-Length: {len(body)}\r\n", body))
    assert status_of(reply) == 401, reply[:200]
    assert upstream.received() == []


SMALL = {"limits": {"max_body_bytes": 65536, "max_inflight_body_bytes": 3 * 65536}}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(proctor_factory, gateway_engine, upstream, token):
    upstream.clear()
    p = proctor_factory({**SMALL, "gateway": {"engine": gateway_engine}})
    with socket.create_connection(("127.0.0.1", p.gateway_port), timeout=10) as s:
        s.sendall(_post(token, "Transfer-Encoding: chunked\r\n"))
        reply = b""
        for _ in range(20):
            try:
                s.sendall(_chunk(b"y" * 8192))
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.2)
            try:
                reply = s.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                reply = b"<reset>"
            if reply:
                break
    assert reply == b"<reset>" or status_of(reply) == 413, reply[:100]
    recs = [r for r in p.decisions() if r["status"] == 413]
    assert recs and recs[-1]["agent"] == "writer-bot"
    assert upstream.received() == []


def test_bodies_being_received_share_the_budget(proctor_factory, gateway_engine, upstream, token):
    """Budget for three 60 KB bodies: the fourth slow upload gets 503 before its body is read."""
    upstream.clear()
    p = proctor_factory({**SMALL, "gateway": {"engine": gateway_engine}})
    body = b'{"pad":"' + b"z" * 59_980 + b'"}'
    socks = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", p.gateway_port), timeout=10)
            s.sendall(_post(token, f"Content-Length: {len(body)}\r\n", body[:100]))
            socks.append(s)
        time.sleep(0.3)
        reply = send_raw(p.gateway_port, _post(token, f"Content-Length: {len(body)}\r\n", body[:100]))
        assert status_of(reply) == 503 and problem(reply)["title"] == "Proctor is busy", reply[:200]
        socks[0].sendall(body[100:])
        assert status_of(read_response(socks[0])) == 200
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------ request lines
def test_absolute_form_request_lines_are_refused(request, gateway_proctor, gateway_engine, upstream, token):
    """RFC 9112 §3.2.2 makes the request-line authority win over Host; a gateway that routes
    by Host would act on another target than the one the client named: refused."""
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _get(token, target="http://evil.example/svc/items/1"))
    assert status_of(reply) == 400, reply[:200]
    assert upstream.received() == []


def test_absolute_form_never_reaches_the_named_host(gateway_proctor, upstream, token):
    """Whatever the engine does with it, the upstream gets origin form and its own Host."""
    upstream.clear()
    send_raw(gateway_proctor.gateway_port, _get(token, target=f"http://127.0.0.1:{upstream.port}/svc/items/1"))
    for got in upstream.received():
        assert got["path"].startswith("/") and upstream.headers_of(got)["host"] == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize("version, statuses", [
    ("", (400,)),  # HTTP/0.9: no version at all
    ("HTTP/0.9", (400,)),
    ("HTTP/2.0", (505,)),
    ("HTTP/3.0", (400, 505)),  # llhttp does not know the version: a parse error
])
def test_http_versions_other_than_1x_are_refused(request, gateway_proctor, gateway_engine, upstream, token,
                                                 version, statuses):
    upstream.clear()
    raw = _get(token, version=version) if version else b"GET /svc/items/1\r\n\r\n"
    reply = send_raw(gateway_proctor.gateway_port, raw)
    assert status_of(reply) in statuses, reply[:200]  # the status line itself is HTTP/1.x
    assert problem(reply)["type"].startswith("https://proctor.dev/problems/")  # Proctor's answer, not the upstream's
    assert upstream.received() == []


def test_a_method_policy_did_not_judge_is_refused(request, gateway_proctor, gateway_engine, upstream, token):
    """`get` is not `GET` to every server; policy judged the upper-case method."""
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _get(token, method="get"))
    assert status_of(reply) == 400, reply[:200]
    assert problem(reply)["type"].startswith("https://proctor.dev/problems/")  # Proctor's answer, not the upstream's
    assert upstream.received() == []


def test_a_raw_non_ascii_request_target_is_refused(request, gateway_proctor, gateway_engine, upstream, token):
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _get(token, target="/svc/items/\u00ff"))
    assert status_of(reply) == 400, reply[:200]
    assert problem(reply)["type"].startswith("https://proctor.dev/problems/")  # Proctor's answer, not the upstream's
    assert upstream.received() == []


# ------------------------------------------------------------------------ Host
def test_a_foreign_host_header_never_reaches_the_upstream(gateway_proctor, upstream, token):
    """The gateway routes by Host and path, and the upstream gets its own Host, never the agent's."""
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _get(token, host="evil.example"))
    assert status_of(reply) == 200, reply[:200]
    got = upstream.last()
    assert upstream.headers_of(got)["host"] == f"127.0.0.1:{upstream.port}"
    rec = gateway_proctor.decision(dict(
        line.split(": ", 1) for line in reply.partition(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
        if ": " in line)["X-Proctor-Decision-Id"])
    assert rec["host"] == "127.0.0.1" and rec["port"] == upstream.port


def test_a_host_route_matches_any_spelling_of_its_host(gateway_proctor, upstream, token):
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _get(token, target="/items/4", host="SVC.Internal.:9999"))
    assert status_of(reply) == 200, reply[:200]
    assert upstream.last()["path"] == "/items/4"


def test_two_host_headers_are_refused(request, gateway_proctor, gateway_engine, upstream, token):
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _get(token, "Host: svc.internal\r\n"))
    assert status_of(reply) == 400, reply[:200]
    assert upstream.received() == []


def test_http11_without_host_is_refused(request, gateway_proctor, gateway_engine, upstream, token):
    """RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without Host."""
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _get(token, host=None))
    assert status_of(reply) == 400, reply[:200]
    assert upstream.received() == []


def test_http10_without_host_is_routed_by_path(gateway_proctor, upstream, token):
    upstream.clear()
    reply = send_raw(gateway_proctor.gateway_port, _get(token, version="HTTP/1.0", host=None))
    assert status_of(reply) == 200, reply[:200]
    assert upstream.headers_of(upstream.last())["host"] == f"127.0.0.1:{upstream.port}"


def test_pipelined_requests_are_each_decided(gateway_proctor, upstream, token):
    upstream.clear()
    raw = _get(token, target="/svc/items/1") + _get(token, target="/svc/items/2") + _get(
        token, "Connection: close\r\n", target="/svc/items/3", method="DELETE")
    with socket.create_connection(("127.0.0.1", gateway_proctor.gateway_port), timeout=10) as s:
        s.sendall(raw)
        s.settimeout(5)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except socket.timeout:
            pass
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == [200, 200, 403], data[:500]
    assert [e["path"] for e in upstream.received()] == ["/items/1", "/items/2"]
