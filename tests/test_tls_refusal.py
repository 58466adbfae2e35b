"""TLS that cannot be intercepted is refused and recorded, never tunnelled."""

from __future__ import annotations

import base64
import socket
import ssl
import time

import pytest

pytestmark = pytest.mark.integration


def _connect(proctor, host: str, port: int, token: str, agent: str = "tls-bot") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", proctor.port), timeout=10)
    cred = base64.b64encode(f"{agent}:{token}".encode()).decode()
    s.sendall(
        f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: Basic {cred}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, "proxy closed during CONNECT"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head
    return s


def _recv_all(s: socket.socket) -> bytes:
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, socket.timeout):
        pass
    return data


# Plain HTTP/1 inside a tunnel is governed like forward-proxied HTTP, not refused:
# tests/test_tunnel_http.py (allowed, denied, misdirected, smuggling, non-HTTP bytes).


def test_garbage_bytes_inside_connect_refused(proctor, upstream_tls, idp):
    upstream_tls.clear()
    tok = idp.token("tls-bot", groups=["readers"])
    s = _connect(proctor, "localhost", upstream_tls.port, tok)
    before = len(proctor.decisions())
    s.sendall(b"\x00\x01\x02\x03 binary protocol \xff\xfe\r\n\r\n")
    reply = _recv_all(s)
    s.close()
    assert not reply.startswith(b"HTTP/1.1 200")
    assert upstream_tls.received() == []
    recs = [r for r in proctor.decisions()[before:] if r.get("error") == "non-TLS traffic in tunnel"]
    assert recs and recs[-1]["agent"] == "tls-bot" and recs[-1]["port"] == upstream_tls.port


def test_client_rejecting_our_certificate_is_recorded(proctor, upstream_tls, idp, pki):
    """A client that does not trust Proctor's CA: handshake fails, nothing forwarded, recorded."""
    upstream_tls.clear()
    tok = idp.token("tls-bot", groups=["readers"])
    before = len(proctor.decisions())
    s = _connect(proctor, "localhost", upstream_tls.port, tok)
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))  # trusts the upstream's CA, not Proctor's
    with pytest.raises(ssl.SSLError):
        ctx.wrap_socket(s, server_hostname="localhost")
    s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        recs = [r for r in proctor.decisions()[before:] if r.get("error") == "client rejected interception certificate"]
        if recs:
            break
        time.sleep(0.05)
    assert recs, "the failed interception was not recorded"
    assert recs[-1]["agent"] == "tls-bot"
    assert recs[-1]["reasons"] == ["tls-interception-required"]
    assert recs[-1]["host"] == "localhost" and recs[-1]["port"] == upstream_tls.port
    assert upstream_tls.received() == []


def test_upstream_with_untrusted_cert_is_not_reached(proctor_factory, upstream_tls, idp):
    """Upstream TLS is verified: without the test CA configured, the upstream cert is rejected."""
    p = proctor_factory({"upstream": {"ca_file": None}})
    upstream_tls.clear()
    import requests

    tok = idp.token("tls-bot", groups=["readers"])
    r = requests.get(
        f"https://localhost:{upstream_tls.port}/items/1",
        proxies={"https": p.proxy_url_with("tls-bot", tok)},
        verify=str(p.ca_pem),
        timeout=15,
    )
    assert r.status_code == 502
    body = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert body["decision_id"] == r.headers["x-proctor-decision-id"]
    assert body["action"] == "test.item.read"
    assert "certificate" in body["detail"].lower()
    rec = p.decision(body["decision_id"])
    assert rec["decision"] == "allow" and rec["status"] == 502 and rec["upstream_status"] is None
    assert upstream_tls.received() == [] or all(e.get("path") != "/items/1" for e in upstream_tls.received())
