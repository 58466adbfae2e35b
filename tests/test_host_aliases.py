"""Host aliases do not escape their connector (issue: hardening, item 2).

`egress.default: generic` plus a broad `http.request` permit (the `egress`
group may reach any host generically) must not let an agent reach the test
connector's upstream under another spelling or name of its host, around the
connector's policies (`no-item-deletes`). Real proxy, real recording upstream.
"""

from __future__ import annotations

import base64
import socket
import ssl

import httpx
import pytest

ALIASES = ["127.1", "127.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "127.000.000.001",
           "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "127.0.0.1.", "LOCALHOST", "localhost."]


@pytest.fixture(scope="module")
def generic(tmp_path_factory, idp, pki, upstream, upstream_tls):
    from conftest import start_proctor

    p = start_proctor(tmp_path_factory.mktemp("aliases"), idp, pki, upstream, upstream_tls,
                      overrides={"egress": {"default": "generic"}})
    yield p
    p.stop()


@pytest.fixture(scope="module")
def token(idp):
    # in the `egress` group (generic http.request permitted) and the writers
    return idp.token("alias-bot", groups=["egress", "writers"])


def raw_http(proxy_port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, rest = data.partition(b"\r\n\r\n")
            if sep:
                cl = [int(v.split(b":")[1]) for v in head.split(b"\r\n") if v.lower().startswith(b"content-length:")]
                if cl and len(rest) >= cl[0]:
                    break
    return data


def auth(token: str) -> bytes:
    return b"Proxy-Authorization: Basic " + base64.b64encode(b"alias-bot:" + token.encode()) + b"\r\n"


@pytest.mark.parametrize("alias", ALIASES)
def test_alias_is_classified_as_the_connector_and_its_policies_apply(generic, upstream, token, alias):
    upstream.clear()
    host = f"{alias}:{upstream.port}"
    req = (f"DELETE http://{host}/items/7 HTTP/1.1\r\nHost: {host}\r\n".encode() + auth(token) + b"\r\n")
    reply = raw_http(generic.port, req)
    assert reply.startswith(b"HTTP/1.1 403"), reply[:400]
    assert b"no-item-deletes" in reply
    assert upstream.received() == []
    decision_id = [v.split(b":", 1)[1].strip() for v in reply.split(b"\r\n") if v.lower().startswith(b"x-proctor-decision-id")][0]
    rec = generic.decision(decision_id.decode())
    assert rec["action"] == "test.item.delete"


@pytest.mark.parametrize("alias", ["127.1", "2130706433", "[::ffff:127.0.0.1]", "127.0.0.1."])
def test_allowed_request_dials_and_names_the_canonical_host(generic, upstream, token, alias):
    upstream.clear()
    host = f"{alias}:{upstream.port}"
    req = (f"GET http://{host}/items/7 HTTP/1.1\r\nHost: {host}\r\n".encode() + auth(token) + b"\r\n")
    reply = raw_http(generic.port, req)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:400]
    seen = upstream.last()
    assert upstream.headers_of(seen)["host"] == f"127.0.0.1:{upstream.port}"


@pytest.mark.parametrize("alias", ["127.0.0.2", "127.255.0.1", "[::1]", "0.0.0.0"])
def test_another_address_of_the_same_machine_is_refused_not_generic(generic, upstream, token, alias):
    """Not a spelling of 127.0.0.1 but reaches the same listener: refused, naming the right host."""
    upstream.clear()
    host = f"{alias}:{upstream.port}"
    req = (f"DELETE http://{host}/items/7 HTTP/1.1\r\nHost: {host}\r\n".encode() + auth(token) + b"\r\n")
    reply = raw_http(generic.port, req)
    assert reply.startswith(b"HTTP/1.1 403"), reply[:400]
    assert b"connector-alias" in reply and b"testsvc" in reply
    assert upstream.received() == []


@pytest.mark.parametrize("bad", ["127.0.0.1%2f", "256.0.0.1", "evil..com", "1.2.3.4.5"])
def test_invalid_hosts_are_refused(generic, upstream, token, bad):
    upstream.clear()
    host = f"{bad}:{upstream.port}"
    reply = raw_http(generic.port, f"GET http://{host}/items/7 HTTP/1.1\r\nHost: {host}\r\n".encode() + auth(token) + b"\r\n")
    assert reply.split(b" ", 2)[1] in (b"400", b"403"), reply[:300]
    assert upstream.received() == []


def test_host_header_alias_agrees_with_its_target(generic, upstream, token):
    """Host: 127.1 with a target of 127.0.0.1 names the same host: no 421, and Host is forwarded canonical."""
    upstream.clear()
    req = (f"GET http://127.0.0.1:{upstream.port}/items/7 HTTP/1.1\r\nHost: 0x7f.1:{upstream.port}\r\n".encode()
           + auth(token) + b"\r\n")
    reply = raw_http(generic.port, req)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert upstream.headers_of(upstream.last())["host"] == f"127.0.0.1:{upstream.port}"


def test_connect_to_an_alias_is_decided_as_the_connector(generic, upstream_tls, token):
    """CONNECT 127.1:<tls port>: the tunnel dials 127.0.0.1 and requests in it meet the connector's policies."""
    upstream_tls.clear()
    sock = socket.create_connection(("127.0.0.1", generic.port), timeout=10)
    try:
        sock.sendall(f"CONNECT 127.1:{upstream_tls.port} HTTP/1.1\r\nHost: 127.1:{upstream_tls.port}\r\n".encode()
                     + auth(token) + b"\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(generic.ca_pem))
        ctx.check_hostname = False
        tls = ctx.wrap_socket(sock, server_hostname=None)
        tls.sendall(f"DELETE /items/7 HTTP/1.1\r\nHost: 127.1:{upstream_tls.port}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 403") and b"no-item-deletes" in reply, reply[:300]
        assert upstream_tls.received() == []
    finally:
        sock.close()
    # an allowed read through the alias reaches the upstream as 127.0.0.1
    verify = ssl.create_default_context(cafile=str(generic.ca_pem))
    with httpx.Client(proxy=generic.proxy_url_with("alias-bot", token), verify=verify, timeout=10) as c:
        r = c.get(f"https://127.0.0.1:{upstream_tls.port}/items/7")
    assert r.status_code == 200
