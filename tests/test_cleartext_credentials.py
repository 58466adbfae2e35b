"""An upstream credential never crosses the network in the clear because the agent chose `http://`.

Connectors match hosts, not schemes: the agent picks `http://` or `https://`. Two ways that
would put the connector's injected credential on the wire unencrypted, each refused before
anything is dialled (real proxy, real clients, a recording upstream):

- plain HTTP to a port that carries TLS (443 always, and `transparent.tls_ports`), forward-proxied
  or inside a CONNECT tunnel to that port (tunnelled plain HTTP is parsed and decided like
  forward-proxied HTTP): 400 `plain-http-to-tls-port`;
- plain HTTP to a host a connector with `auth:` names without a port (`api.openai.com`: every
  port of it): 400 `cleartext-credential`. A host:port the connector names explicitly (the
  operator declared that endpoint, like the bundled mocks on 127.0.0.1) still gets it.
"""

from __future__ import annotations

import base64
import json
import socket

import pytest
import requests

from conftest import _start_upstream

pytestmark = pytest.mark.integration

SECRET = "crm-secret-never-in-the-clear"


@pytest.fixture
def crm(tmp_path):
    up = _start_upstream(tmp_path, None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


def crm_connector(hosts: list[str]) -> dict:
    return {
        "name": "crm",
        "hosts": hosts,
        "routes": [{"method": "GET", "path": "/sobjects/{id}", "action": "test.item.read",
                    "resource": {"type": "Item", "id": "{id}"}}],
        "auth": {"type": "bearer", "token": {"env": "CRM_TOKEN"}},
    }


def get(p, url: str, token: str) -> requests.Response:
    return requests.get(url, proxies={"http": p.proxy_url_with("reader-bot", token)}, timeout=10)


def tunnelled(p, token: str, host: str, port: int, request: bytes) -> bytes:
    """CONNECT host:port, then `request` in plain HTTP inside the tunnel (what undici's
    EnvHttpProxyAgent does for http:// URLs); what came back on the tunnel."""
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        auth = p.proxy_url_with("reader-bot", token).split("//", 1)[1].rsplit("@", 1)[0]
        cred = base64.b64encode(auth.encode()).decode()
        s.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        s.sendall(request)
        out = b""
        s.settimeout(10)
        while True:  # the answer's head, then its body (Content-Length)
            head, sep, body = out.partition(b"\r\n\r\n")
            if sep:
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if len(body) >= length:
                    return out
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk


def test_plain_http_to_a_tls_port_is_refused_before_any_dial(proctor_factory, crm, reader_token):
    """The upstream's port is declared TLS (`transparent.tls_ports`); the connector names it. An
    http:// URL to it would send the request, with the injected bearer, in the clear: refused,
    and the upstream sees no byte. Port 443 is TLS without any configuration."""
    p = proctor_factory({"transparent": {"tls_ports": [443, crm.port]}},
                        extra_connectors=[crm_connector([f"127.0.0.1:{crm.port}", "127.0.0.1:443"])],
                        env={"CRM_TOKEN": SECRET})
    for port in (crm.port, 443):
        r = get(p, f"http://127.0.0.1:{port}/sobjects/1", reader_token)
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["reasons"] == ["plain-http-to-tls-port"] and f"https://127.0.0.1:{port}/" in body["detail"]
        assert p.decision(body["decision_id"])["status"] == 400
    # inside a CONNECT tunnel to the TLS port: the same refusal
    out = tunnelled(p, reader_token, "127.0.0.1", crm.port,
                    b"GET /sobjects/1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % crm.port)
    assert out.startswith(b"HTTP/1.1 400"), out[:300]
    assert b"plain-http-to-tls-port" in out
    assert crm.received() == []
    assert SECRET not in p.log() + json.dumps(p.decisions())


def test_a_portless_connector_host_never_gets_its_credential_over_plain_http(proctor_factory, crm, reader_token):
    """`hosts: [crm.example.test]` covers every port of the host, and the agent picks the scheme:
    plain HTTP there would carry the connector's bearer unencrypted (think `http://api.openai.com/`).
    Refused before anything is dialled (so the name need not resolve); the same connector naming the
    host:port gets it, and so does a loopback upstream (its bytes never reach a network)."""
    p = proctor_factory(extra_connectors=[crm_connector(["crm.example.test", "127.0.0.1", "localhost"])],
                        env={"CRM_TOKEN": SECRET})
    for port in (80, crm.port):
        r = get(p, f"http://crm.example.test:{port}/sobjects/1", reader_token)
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["reasons"] == ["cleartext-credential"] and "'crm'" in body["detail"]
        assert "https://crm.example.test/" in body["detail"]
        assert body["action"] == "test.item.read"  # classified, refused before policy (no approval asked for nothing)
    # tunnelled plain HTTP to the same host:port: refused alike
    out = tunnelled(p, reader_token, "crm.example.test", 80,
                    b"GET /sobjects/2 HTTP/1.1\r\nHost: crm.example.test\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and b"cleartext-credential" in out, out[:300]
    assert SECRET not in p.log() + json.dumps(p.decisions())
    # loopback listed without a port is no exception: the agent shares that loopback (its pod, a
    # laptop), so a listener of its own there would receive the connector's credential
    with socket.socket() as own:
        own.bind(("127.0.0.1", 0))
        own.listen(1)
        own.settimeout(0.5)
        agent_port = own.getsockname()[1]
        for host in ("127.0.0.1", "localhost"):
            r = get(p, f"http://{host}:{agent_port}/sobjects/3", reader_token)
            assert r.status_code == 400 and r.json()["reasons"] == ["cleartext-credential"], r.text
        with pytest.raises(socket.timeout):
            own.accept()  # nothing was dialled
    assert crm.received() == []
    p.stop()
    explicit = proctor_factory(extra_connectors=[crm_connector([f"127.0.0.1:{crm.port}"])], env={"CRM_TOKEN": SECRET})
    r = get(explicit, f"http://127.0.0.1:{crm.port}/sobjects/1", reader_token)
    assert r.status_code == 200, r.text
    assert crm.headers_of(crm.last())["authorization"] == f"Bearer {SECRET}"

