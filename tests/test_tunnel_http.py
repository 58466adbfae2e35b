"""Plain HTTP/1 inside a CONNECT tunnel (proxy/engine/tunnel_http.py).

Clients that tunnel `http://` URLs too (undici's EnvHttpProxyAgent, Node's `fetch`
with it as the global dispatcher) send `CONNECT host:port` and then plain HTTP.
Proctor governs that like forward-proxied HTTP: the tunnel's proven identity, the
CONNECT target as the decision target, every request decided; anything that names
another target, smuggles, or is neither HTTP nor TLS is refused, and the upstream
sees nothing of it.
"""

from __future__ import annotations

import base64
import json
import socket
import time

import pytest

from conftest import wait_for
from proxy.engine.tunnel_http import MAX_FIRST_LINE, Payload, classify

pytestmark = pytest.mark.integration


def _tunnel(proctor, host: str, port: int, token: str, agent: str = "tunnel-bot") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proctor.port), timeout=10)
    cred = base64.b64encode(f"{agent}:{token}".encode()).decode()
    s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: Basic {cred}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        assert chunk, "proxy closed during CONNECT"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def _answers(s: socket.socket, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Read `n` answers in turn (Content-Length or chunked framing)."""
    f = s.makefile("rb")
    out = []
    for _ in range(n):
        status = int(f.readline().split(b" ", 2)[1])
        headers: dict[str, str] = {}
        while (line := f.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(f.readline().split(b";")[0], 16):
                body += f.read(size)
                f.readline()
            f.readline()
        else:
            body = f.read(int(headers.get("content-length", "0")))
        out.append((status, headers, body))
    return out


def _recv_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


def _paths(upstream) -> list[str]:
    return [e["path"] for e in upstream.received()]


@pytest.fixture
def token(idp) -> str:
    return idp.token("tunnel-bot", groups=["readers"])


# ------------------------------------------------------------------ unit: the first line


@pytest.mark.parametrize(
    "data, verdict",
    [
        (b"GET /items/1 HTTP/1.1\r\nHost: a\r\n\r\n", Payload.HTTP),
        (b"DELETE /x HTTP/1.0\n", Payload.HTTP),
        (b"G", Payload.MORE),
        (b"GET /items/1 HTTP/1.", Payload.MORE),
        (b"GET /items/1 HTTP/1.1\r", Payload.MORE),
        (b"EHLO mail.example\r\n", Payload.OTHER),  # a text protocol: no HTTP version
        (b"SSH-2.0-OpenSSH_9.6\r\n", Payload.OTHER),
        (b"GET /\r\n", Payload.OTHER),  # HTTP/0.9
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Payload.OTHER),  # HTTP/2 with prior knowledge
        (b"GET  /two-spaces HTTP/1.1\r\n", Payload.OTHER),
        (b"\x00\x01\x02binary", Payload.OTHER),
        (b"A" * 33, Payload.OTHER),  # no method is that long
        (b"GET /" + b"a" * MAX_FIRST_LINE, Payload.OTHER),  # a first line without end: not waited for forever
    ],
)
def test_first_line_classification(data, verdict):
    assert classify(data) is verdict


# ------------------------------------------------------------ governed like forward HTTP


def test_allowed_and_denied_requests_in_one_tunnel(proctor, upstream, token):
    """A keep-alive tunnel to the plain upstream: each request is decided on its own, with the
    tunnel's identity (no credentials inside), the CONNECT target as the target."""
    upstream.clear()
    s = _tunnel(proctor, "127.0.0.1", upstream.port, token)
    host = f"127.0.0.1:{upstream.port}"
    s.sendall(f"GET /items/tun-1 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    [(status, headers, body)] = _answers(s, 1)
    assert status == 200 and json.loads(body)["path"] == "/items/tun-1"
    allowed = proctor.decision(headers["x-proctor-decision-id"])
    assert allowed["agent"] == "tunnel-bot" and allowed["action"] == "test.item.read"
    assert allowed["decision"] == "allow" and allowed["port"] == upstream.port

    s.sendall(f"DELETE /items/tun-2 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    [(status, headers, body)] = _answers(s, 1)
    s.close()
    problem = json.loads(body)
    assert status == 403 and headers["content-type"] == "application/problem+json"
    assert problem["reasons"] == ["no-item-deletes"] and problem["agent"] == "tunnel-bot"
    assert problem["decision_id"] == headers["x-proctor-decision-id"]
    assert _paths(upstream) == ["/items/tun-1"]
    # the upstream got the request in origin form, without any proxy credential
    sent = upstream.headers_of(upstream.last())
    assert "proxy-authorization" not in sent and sent["host"] == host


def test_pipelined_requests_are_each_decided(proctor, upstream, token):
    upstream.clear()
    s = _tunnel(proctor, "127.0.0.1", upstream.port, token)
    host = f"127.0.0.1:{upstream.port}"
    s.sendall(
        f"GET /items/pipe-1 HTTP/1.1\r\nHost: {host}\r\n\r\n"
        f"DELETE /items/pipe-2 HTTP/1.1\r\nHost: {host}\r\n\r\n"
        f"GET /items/pipe-3 HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    )
    statuses = [a[0] for a in _answers(s, 3)]
    s.close()
    assert statuses == [200, 403, 200]
    assert _paths(upstream) == ["/items/pipe-1", "/items/pipe-3"]


def test_a_request_line_split_across_writes_is_still_http(proctor, upstream, token):
    """The first bytes are a prefix of a request line: Proctor waits for the line."""
    upstream.clear()
    s = _tunnel(proctor, "127.0.0.1", upstream.port, token)
    for piece in (b"GE", b"T /items/slow", f" HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n\r\n".encode()):
        s.sendall(piece)
        time.sleep(0.2)
    [(status, headers, _)] = _answers(s, 1)
    s.close()
    assert status == 200 and "x-proctor-decision-id" in headers
    assert _paths(upstream) == ["/items/slow"]


def test_credentials_inside_the_tunnel_do_not_change_the_identity(proctor, upstream, token, idp):
    """Another agent's Proxy-Authorization inside the tunnel is ignored and stripped."""
    upstream.clear()
    other = base64.b64encode(f"writer-bot:{idp.token('writer-bot', groups=['writers'])}".encode()).decode()
    s = _tunnel(proctor, "127.0.0.1", upstream.port, token)
    s.sendall(
        f"GET /items/who HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\nProxy-Authorization: Basic {other}\r\n\r\n".encode()
    )
    [(status, headers, _)] = _answers(s, 1)
    s.close()
    assert status == 200
    assert proctor.decision(headers["x-proctor-decision-id"])["agent"] == "tunnel-bot"
    assert "proxy-authorization" not in upstream.headers_of(upstream.last())


# ------------------------------------------------------------------------------ attacks


@pytest.mark.parametrize(
    "request_head",
    [
        "GET /items/mis HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n",  # Host names host B (also a connector host)
        "GET /items/mis HTTP/1.1\r\nHost: elsewhere.example:{port}\r\n\r\n",
        "GET /items/mis HTTP/1.1\r\nHost: 127.0.0.1:{other}\r\n\r\n",  # another port
        "GET /items/mis HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # no port: 80
        "GET http://localhost:{port}/items/mis HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n",  # absolute form to B
    ],
)
def test_another_target_inside_the_tunnel_is_misdirected(proctor, upstream, upstream_tls, token, request_head):
    upstream.clear()
    upstream_tls.clear()
    s = _tunnel(proctor, "127.0.0.1", upstream.port, token)
    s.sendall(request_head.format(port=upstream.port, other=upstream_tls.port).encode())
    [(status, headers, body)] = _answers(s, 1)
    s.close()
    assert status == 421, body
    problem = json.loads(body)
    assert problem["title"] == "Misdirected request" and problem["decision_id"] == headers["x-proctor-decision-id"]
    assert upstream.received() == [] and upstream_tls.received() == []


@pytest.mark.parametrize(
    "smuggle",
    [
        # Content-Length and Transfer-Encoding together: the upstream could frame it either way
        "POST /items HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 4\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nDELETE /items/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n",
        # two different lengths
        "POST /items HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        "Content-Length: 60\r\n\r\n{{}}DELETE /items/smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n",
        # an obs-folded Transfer-Encoding
        "POST /items HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
        "X-Pad: a\r\n Transfer-Encoding: chunked\r\n\r\n{{}}",
        # a Transfer-Encoding other than chunked
        "POST /items HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_smuggling_inside_the_tunnel_is_refused(proctor, upstream, idp, smuggle):
    upstream.clear()
    writer = idp.token("tunnel-bot", groups=["writers"])  # a writer: POST /items alone would be allowed
    s = _tunnel(proctor, "127.0.0.1", upstream.port, writer)
    s.sendall(smuggle.format(host=f"127.0.0.1:{upstream.port}").encode())
    reply = _recv_all(s)
    s.close()
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None
    assert status in (400, 415), reply[:300]  # refused by the engine or the target check
    assert b"HTTP/1.1 200" not in reply
    assert all(e["method"] != "DELETE" for e in upstream.received())
    assert all(e["path"] != "/items/smuggled" for e in upstream.received())


def test_a_nested_connect_is_refused(proctor, upstream, upstream_tls, token):
    upstream.clear()
    upstream_tls.clear()
    s = _tunnel(proctor, "127.0.0.1", upstream.port, token)
    s.sendall(f"CONNECT localhost:{upstream_tls.port} HTTP/1.1\r\nHost: localhost:{upstream_tls.port}\r\n\r\n".encode())
    reply = _recv_all(s)
    s.close()
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert upstream.received() == [] and upstream_tls.received() == []


@pytest.mark.parametrize(
    "payload",
    [b"EHLO mail.example\r\n", b"SSH-2.0-OpenSSH_9.6\r\n", b"GET /\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
     b"\x00\x01\x02\x03 binary \xff\r\n\r\n"],
)
def test_bytes_that_are_neither_http_nor_tls_are_still_refused(proctor, upstream, token, payload):
    upstream.clear()
    before = len(proctor.decisions())
    s = _tunnel(proctor, "127.0.0.1", upstream.port, token)
    s.sendall(payload)
    reply = _recv_all(s)
    s.close()
    assert not reply.startswith(b"HTTP/1.1 2")
    assert upstream.received() == []

    def recorded() -> list[dict]:
        return [r for r in proctor.decisions()[before:] if r.get("error") == "non-TLS traffic in tunnel"]

    wait_for(lambda: bool(recorded()), timeout=5, what="the refusal in the decision record")
    rec = recorded()[-1]
    assert rec["agent"] == "tunnel-bot" and rec["port"] == upstream.port
    assert rec["reasons"] == ["tls-interception-required"]


def test_an_expired_tunnel_identity_is_refused_inside(proctor, upstream, idp):
    """The tunnel's token expires: plain HTTP inside gets 407, like TLS inside a tunnel."""
    upstream.clear()
    # expired 27 s ago: still accepted for the default 30 s leeway, then no more
    short = idp.token("tunnel-bot", groups=["readers"], ttl=-27)
    s = _tunnel(proctor, "127.0.0.1", upstream.port, short)
    host = f"127.0.0.1:{upstream.port}"
    s.sendall(f"GET /items/early HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert _answers(s, 1)[0][0] == 200
    time.sleep(4)
    s.sendall(f"GET /items/late HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status = _answers(s, 1)[0][0]
    s.close()
    assert status == 407
    assert _paths(upstream) == ["/items/early"]
