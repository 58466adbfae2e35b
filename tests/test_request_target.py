"""The request agrees with itself about its destination, or it is refused before the upstream sees it.

Raw sockets, because ordinary clients never send these on purpose.
"""

from __future__ import annotations

import base64
import socket
import ssl

import pytest

pytestmark = pytest.mark.integration


def _tunnel(proctor, port: int, token: str, agent: str = "reader-bot") -> ssl.SSLSocket:
    s = socket.create_connection(("127.0.0.1", proctor.port), timeout=10)
    cred = base64.b64encode(f"{agent}:{token}".encode()).decode()
    s.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\nProxy-Authorization: Basic {cred}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    assert head.startswith(b"HTTP/1.1 200"), head
    ctx = ssl.create_default_context(cafile=str(proctor.ca_pem))
    return ctx.wrap_socket(s, server_hostname="localhost")


def _exchange(sock, raw: bytes) -> bytes:
    sock.sendall(raw)
    data = b""
    try:
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                if len(body) >= length:
                    break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout, ssl.SSLError):
        pass
    return data


def _plain(proctor, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proctor.port), timeout=10) as s:
        return _exchange(s, raw)


@pytest.fixture
def token(idp):
    return idp.token("reader-bot", groups=["readers"])


def test_absolute_form_to_another_host_inside_tunnel_refused(proctor, upstream_tls, token):
    upstream_tls.clear()
    with _tunnel(proctor, upstream_tls.port, token) as t:
        reply = _exchange(
            t, f"GET https://other-tenant.example.com/items/42 HTTP/1.1\r\nHost: localhost:{upstream_tls.port}\r\n\r\n".encode()
        )
    assert reply.startswith(b"HTTP/1.1 421"), reply
    assert b"request-line authority" in reply
    assert upstream_tls.received() == []


def test_absolute_form_to_the_tunnel_host_is_forwarded_in_origin_form(proctor, upstream_tls, token):
    upstream_tls.clear()
    with _tunnel(proctor, upstream_tls.port, token) as t:
        reply = _exchange(
            t, f"GET https://localhost:{upstream_tls.port}/items/42 HTTP/1.1\r\nHost: localhost:{upstream_tls.port}\r\n\r\n".encode()
        )
    assert reply.startswith(b"HTTP/1.1 200"), reply
    assert upstream_tls.last()["path"] == "/items/42"


@pytest.mark.parametrize(
    "host_line, status",
    [
        ("Host: localhost:1", b"421"),  # right host, wrong port
        ("Host: elsewhere.example:{port}", b"421"),
        ("Host: ", b"400"),
    ],
)
def test_host_header_must_match_tunnel_target(proctor, upstream_tls, token, host_line, status):
    upstream_tls.clear()
    with _tunnel(proctor, upstream_tls.port, token) as t:
        reply = _exchange(t, f"GET /items/1 HTTP/1.1\r\n{host_line.format(port=upstream_tls.port)}\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 " + status), reply
    assert upstream_tls.received() == []


def test_http10_without_host_gets_the_target_as_host(proctor, upstream_tls, token):
    upstream_tls.clear()
    with _tunnel(proctor, upstream_tls.port, token) as t:
        reply = _exchange(t, b"GET /items/1 HTTP/1.0\r\n\r\n")
    assert b" 200 " in reply.split(b"\r\n")[0], reply
    assert upstream_tls.headers_of(upstream_tls.last())["host"] == f"localhost:{upstream_tls.port}"


def test_plain_forward_host_port_mismatch_refused(proctor, upstream, token):
    upstream.clear()
    cred = base64.b64encode(f"reader-bot:{token}".encode()).decode()
    reply = _plain(
        proctor,
        f"GET http://127.0.0.1:{upstream.port}/items/1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"
        f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode(),
    )
    assert reply.startswith(b"HTTP/1.1 421"), reply
    assert upstream.received() == []


@pytest.mark.parametrize(
    "header",
    [
        "X-A: 1\r\n Transfer-Encoding: chunked",  # obs-fold
        "X-A: 1\rTransfer-Encoding: chunked",  # bare CR
        "X-A: 1\x00x",  # NUL
    ],
    ids=["obs-fold", "bare-cr", "nul"],
)
def test_smuggling_shaped_header_values_refused(proctor, upstream, token, header):
    upstream.clear()
    cred = base64.b64encode(f"reader-bot:{token}".encode()).decode()
    reply = _plain(
        proctor,
        f"GET http://127.0.0.1:{upstream.port}/items/1 HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n{header}\r\n"
        f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode("latin-1"),
    )
    assert reply[:12] in (b"HTTP/1.1 400",), reply
    assert upstream.received() == []


def test_header_flood_is_cut_off_early(proctor):
    """An unauthenticated client streaming header lines forever gets 431 and is disconnected."""
    import os
    import time

    import httpx

    with socket.create_connection(("127.0.0.1", proctor.port), timeout=10) as s:
        s.sendall(b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n")
        sent = 0
        reply = b""
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
    assert sent < 4 * 1024 * 1024, "the proxy kept accepting header bytes"
    assert reply.startswith(b"HTTP/1.1 431") or reply == b"", reply[:100]
    time.sleep(0.2)
    assert httpx.get(f"{proctor.control_url}/healthz", timeout=5).status_code == 200  # still serving


def test_chunked_trailers_are_a_clean_protocol_error(proctor, upstream, token):
    upstream.clear()
    before = proctor.log()
    cred = base64.b64encode(f"reader-bot:{token}".encode()).decode()
    reply = _plain(
        proctor,
        f"POST http://127.0.0.1:{upstream.port}/items HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
        f"Proxy-Authorization: Basic {cred}\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n0\r\nX-Trailer: y\r\n\r\n".encode(),
    )
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply
    assert upstream.received() == []
    import time

    time.sleep(0.3)
    assert "has crashed" not in proctor.log()[len(before):]
