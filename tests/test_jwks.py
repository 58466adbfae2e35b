"""Issuer keys from an HTTPS JWKS URL, through the real proxy process.

A local HTTPS server (certificate from the test CA) serves the test IdP's JWKS
and counts requests. Covered: tokens verified against fetched keys; key
rotation picked up by a refetch on an unknown `kid`; refetches rate-limited so
random `kid`s cannot turn Proctor into an amplifier; an unreachable,
untrusted, redirecting or broken JWKS endpoint fails closed (503), never
forwards; and fetched keys keep working while the IdP is down.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import requests
from conftest import free_port
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

pytestmark = pytest.mark.integration


def trusting(p) -> ssl.SSLContext:
    """A client TLS context that trusts the proxy's interception CA (what SSL_CERT_FILE gives an agent)."""
    return ssl.create_default_context(cafile=str(p.ca_pem))


class JwksServer:
    """HTTPS JWKS endpoint in a thread.

    /jwks.json   the current `doc` (or HTTP 500 while `broken` is set)
    /broken      always 500
    /garbage     200 with a body that is not JSON
    /redirect    302 to /jwks.json (must not be followed)
    /huge        200 with a JWKS document over the 512 KiB limit
    /huge-no-length  the same, without Content-Length (the limit must hold while streaming)
    /big         200 with a 400 kB JWKS document, no Content-Length (under the limit: must work)
    """

    def __init__(self, pki, doc: dict) -> None:
        self.doc = doc
        self.broken = False
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict | None = None, length: bool = True) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if length:  # without it, the body ends when the connection closes (HTTP/1.0)
                    self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                with server._lock:
                    server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path == "/jwks.json":
                    if server.broken:
                        self._send(500, b'{"error":"down"}')
                    else:
                        self._send(200, json.dumps(server.doc).encode())
                elif self.path == "/redirect":
                    self._send(302, b"", {"Location": "/jwks.json"})
                elif self.path == "/garbage":
                    self._send(200, b"<html>not a jwks</html>")
                elif self.path == "/huge":
                    self._send(200, json.dumps({**server.doc, "padding": "x" * 600_000}).encode())
                elif self.path == "/huge-no-length":
                    self._send(200, json.dumps({**server.doc, "padding": "x" * 600_000}).encode(), length=False)
                elif self.path == "/big":
                    self._send(200, json.dumps({**server.doc, "padding": "x" * 400_000}).encode(), length=False)
                else:
                    self._send(500, b'{"error":"broken"}')

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki.cert_pem), str(pki.key_pem))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/jwks.json") -> str:
        return f"https://localhost:{self.port}{path}"

    def count(self, path: str = "/jwks.json") -> int:
        with self._lock:
            return self.hits.get(path, 0)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server(pki, idp):
    srv = JwksServer(pki, json.loads(idp.jwks_path.read_text()))
    yield srv
    srv.stop()


def issuer_entry(idp, url: str, ca_file=None, issuer: str | None = None, **extra) -> dict:
    entry = {"issuer": issuer or idp.issuer, "audience": idp.audience, "jwks_url": url,
             "algorithms": ["RS256", "ES256"], **extra}
    if ca_file is not None:
        entry["jwks_ca_file"] = str(ca_file)
    return entry


def identity_override(*issuers: dict) -> dict:
    return {"identity": {"issuers": list(issuers), "principal": {"attributes": {"team": "team"}, "groups_claim": "groups"}}}


def forward(p, upstream, token: str, agent: str = "jwks-bot"):
    return requests.get(
        f"http://127.0.0.1:{upstream.port}/items/1", proxies={"http": p.proxy_url_with(agent, token)}, timeout=15
    )


def reverse(p, token: str):
    return httpx.get(f"{p.gateway_url}/svc/items/1", headers={"Authorization": f"Bearer {token}"}, timeout=15)


def new_rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def jwk_for(key, kid: str) -> dict:
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    return jwk


def assert_refused(r, status: int, detail: str, token: str, p, upstream) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert detail in body["detail"], body["detail"]
    assert body["decision_id"] == r.headers["x-proctor-decision-id"]
    assert token not in r.text
    rec = p.decision(body["decision_id"])
    assert rec["decision"] == "deny" and rec["status"] == status and rec["agent"] is None
    assert token not in json.dumps(rec)
    assert upstream.received() == [], "a refused request must not reach the upstream"
    return rec


# ------------------------------------------------------------------ happy path, rotation, recovery
def test_jwks_url_valid_rotation_recovery_and_stale_keys(proctor_factory, jwks_server, pki, idp, upstream):
    jwks_server.broken = True  # the IdP is down when the first agent arrives
    p = proctor_factory(identity_override(
        issuer_entry(idp, jwks_server.url(), pki.ca_pem, jwks_min_refetch_seconds=1)
    ))
    upstream.clear()

    # 1. no keys yet, IdP failing: fail closed
    tok = idp.token("jwks-bot")
    rec = assert_refused(forward(p, upstream, tok), 503, "unavailable", tok, p, upstream)
    assert rec["refusal"]["kind"] == "fail-closed"
    assert jwks_server.count() == 1

    # 2. the IdP recovers: after the refetch interval, keys are fetched and tokens accepted
    jwks_server.broken = False
    time.sleep(1.1)
    for alg in ("RS256", "ES256"):
        tok = idp.token("jwks-bot", alg=alg)
        r = forward(p, upstream, tok)
        assert r.status_code == 200, r.text
        assert p.decision(r.headers["x-proctor-decision-id"])["agent"] == "jwks-bot"
    assert reverse(p, idp.token("jwks-bot")).status_code == 200
    assert jwks_server.count() == 2  # one fetch served all of them

    # 3. rotation: the IdP publishes a new key; a token with the new kid triggers a refetch
    new_key = new_rsa_key()
    jwks_server.doc = {"keys": jwks_server.doc["keys"] + [jwk_for(new_key, "rsa-2")]}
    time.sleep(1.1)
    r = forward(p, upstream, idp.token("jwks-bot", key=new_key, kid="rsa-2"))
    assert r.status_code == 200, r.text
    assert jwks_server.count() == 3
    assert forward(p, upstream, idp.token("jwks-bot")).status_code == 200  # old key still valid

    # 4. a burst of random kids right after: at most one refetch per interval
    attacker = new_rsa_key()
    before, t0 = jwks_server.count(), time.monotonic()
    tokens = [idp.token("jwks-bot", key=attacker, kid=f"rand-{uuid.uuid4().hex}") for _ in range(24)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: forward(p, upstream, t), tokens))
    elapsed = time.monotonic() - t0
    assert all(r.status_code == 407 and "kid" in r.json()["detail"] for r in results)
    assert jwks_server.count() - before <= 1 + int(elapsed), "unknown kids must not trigger a fetch each"

    # 5. the IdP goes down again: keys already fetched keep working; unknown kids are refused (407, not 503)
    jwks_server.broken = True
    upstream.clear()
    r = forward(p, upstream, idp.token("jwks-bot", key=new_key, kid="rsa-2"))
    assert r.status_code == 200, r.text
    time.sleep(1.1)
    upstream.clear()
    tok = idp.token("jwks-bot", key=attacker, kid="rsa-3")
    assert_refused(forward(p, upstream, tok), 407, "kid", tok, p, upstream)


def test_unknown_kid_refetch_is_rate_limited(proctor_factory, jwks_server, pki, idp, upstream):
    """Default jwks_min_refetch_seconds (30): a flood of random kids costs the IdP nothing extra."""
    p = proctor_factory(identity_override(issuer_entry(idp, jwks_server.url(), pki.ca_pem)))
    assert forward(p, upstream, idp.token("jwks-bot")).status_code == 200
    assert jwks_server.count() == 1

    attacker = new_rsa_key()
    tokens = [idp.token("jwks-bot", key=attacker, kid=f"rand-{uuid.uuid4().hex}") for _ in range(30)]
    upstream.clear()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: forward(p, upstream, t) if len(t) % 2 else reverse(p, t), tokens))
    for r in results:
        assert r.status_code in (401, 407), r.text
        assert "kid" in r.json()["detail"]
    assert upstream.received() == []
    assert jwks_server.count() == 1, "no refetch within jwks_min_refetch_seconds of the last fetch"

    # Even a legitimately rotated key waits for the interval: the limit is not bypassable by kid choice.
    new_key = new_rsa_key()
    jwks_server.doc = {"keys": jwks_server.doc["keys"] + [jwk_for(new_key, "rsa-2")]}
    tok = idp.token("jwks-bot", key=new_key, kid="rsa-2")
    assert_refused(forward(p, upstream, tok), 407, "kid", tok, p, upstream)
    assert jwks_server.count() == 1


# ------------------------------------------------------------------ fail closed
FAILING = {
    "down": "unreachable port",
    "untrusted-tls": "server certificate not signed by a trusted CA (no jwks_ca_file)",
    "http-500": "HTTP 500",
    "not-json": "200 with HTML",
    "redirect": "302 to a valid JWKS (redirects are not followed)",
    "too-large": "over 512 KiB",
    "too-large-streamed": "over 512 KiB, no Content-Length",
}


def test_unreachable_untrusted_or_oversized_jwks_fails_closed(proctor_factory, jwks_server, pki, idp, upstream, upstream_tls):
    closed_port = free_port()  # nothing listens here, ever
    urls = {
        "down": (f"https://localhost:{closed_port}/jwks.json", pki.ca_pem),
        "untrusted-tls": (jwks_server.url(), None),
        "http-500": (jwks_server.url("/broken"), pki.ca_pem),
        "not-json": (jwks_server.url("/garbage"), pki.ca_pem),
        "redirect": (jwks_server.url("/redirect"), pki.ca_pem),
        "too-large": (jwks_server.url("/huge"), pki.ca_pem),
        "too-large-streamed": (jwks_server.url("/huge-no-length"), pki.ca_pem),
        "big": (jwks_server.url("/big"), pki.ca_pem),
    }
    issuers = {name: f"https://idp-{name}.test" for name in urls}
    p = proctor_factory(identity_override(
        *(issuer_entry(idp, url, ca, issuer=issuers[name]) for name, (url, ca) in urls.items())
    ))
    for name in FAILING:
        for send in ("forward", "reverse"):
            upstream.clear()
            tok = idp.token("jwks-bot", iss=issuers[name])
            r = forward(p, upstream, tok) if send == "forward" else reverse(p, tok)
            rec = assert_refused(r, 503, "unavailable", tok, p, upstream)
            assert rec["refusal"]["kind"] == "fail-closed", name
            assert r.json()["title"] == "Identity provider unavailable"

    # a large (multi-chunk) JWKS under the limit is read completely and works
    upstream.clear()
    r = forward(p, upstream, idp.token("jwks-bot", iss=issuers["big"]))
    assert r.status_code == 200, r.text
    assert p.decision(r.headers["x-proctor-decision-id"])["issuer"] == issuers["big"]

    # a tunnel is not opened either
    tok = idp.token("jwks-bot", iss=issuers["down"])
    upstream_tls.clear()
    with pytest.raises(httpx.ProxyError) as ei:
        with httpx.Client(proxy=p.proxy_url_with("jwks-bot", tok), verify=trusting(p), timeout=10) as c:
            c.get(f"https://localhost:{upstream_tls.port}/items/1")
    assert "503" in str(ei.value)
    assert upstream_tls.received() == []

    # the TLS failure never reached HTTP, and the redirect was not followed
    assert jwks_server.count("/jwks.json") == 0
    assert jwks_server.count("/redirect") >= 1
    # failed fetches are rate-limited too (one attempt per issuer, not one per request)
    for path in ("/broken", "/garbage", "/redirect", "/huge", "/huge-no-length", "/big"):
        assert jwks_server.count(path) == 1, path
    # and the proxy is still healthy for everything else
    assert p.health()["status"] == "ok"
