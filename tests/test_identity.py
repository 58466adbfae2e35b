"""Agent identity through the real proxy process: every bad credential is refused, explained, and never leaks.

Each attack is sent with real HTTP clients three ways:
- forward proxy, `Proxy-Authorization: Basic <agent>:<jwt>` (what `HTTP_PROXY=http://agent:jwt@proctor` sends);
- forward proxy, `Proxy-Authorization: Bearer <jwt>`;
- reverse (gateway) mode, `Authorization: Bearer <jwt>`.

A refusal must be 407 (forward) / 401 (reverse), an `application/problem+json`
body whose `detail` says why, a decision record of kind "authentication", no
trace of the token in the body, headers, record or log, and nothing at the upstream.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

import httpx
import jwt
import pytest
import requests
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

pytestmark = pytest.mark.integration


def trusting(p) -> ssl.SSLContext:
    """A client TLS context that trusts the proxy's interception CA (what SSL_CERT_FILE gives an agent)."""
    return ssl.create_default_context(cafile=str(p.ca_pem))

AGENT = "agent-1"


# ------------------------------------------------------------------ token crafting
def b64url(data: bytes | dict) -> str:
    if isinstance(data, dict):
        data = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims_for(idp, sub: str = AGENT, **extra) -> dict:
    now = int(time.time())
    c = {"iss": idp.issuer, "aud": idp.audience, "sub": sub, "iat": now, "nbf": now, "exp": now + 300,
         "jti": uuid.uuid4().hex}
    c.update(extra)
    return c


def alg_none(idp, trailing_dot: bool = True, alg: str = "none") -> str:
    tok = b64url({"alg": alg, "typ": "JWT"}) + "." + b64url(claims_for(idp))
    return tok + "." if trailing_dot else tok


def hs256_with_public_pem(idp, kid: str = "rsa-1") -> str:
    """The classic key confusion: HMAC keyed with the RSA public key the verifier already trusts."""
    signing_input = b64url({"alg": "HS256", "typ": "JWT", "kid": kid}) + "." + b64url(claims_for(idp))
    sig = hmac.new(idp.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(sig)


def tamper_signature(token: str) -> str:
    head, payload, sig = token.split(".")
    # flip a character in the middle (the last one may only carry padding bits)
    i = len(sig) // 2
    sig = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1 :]
    return ".".join((head, payload, sig))


def tamper_payload(token: str, **changes) -> str:
    head, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return ".".join((head, b64url(claims), sig))


def raw_header_token(idp, header: dict) -> str:
    """A token with an arbitrary (valid-JSON) header, properly signed with the IdP's RSA key."""
    signing_input = b64url(header) + "." + b64url(claims_for(idp))
    sig = idp.rsa_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(sig)


@pytest.fixture(scope="module")
def attacker_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Attack:
    make: Callable  # (idp, attacker_key) -> token
    detail: str  # a fragment the refusal's detail must contain


ATTACKS: dict[str, Attack] = {
    "expired": Attack(lambda idp, k: idp.token(AGENT, ttl=-120), "expired"),
    "nbf-in-future": Attack(lambda idp, k: idp.token(AGENT, nbf=int(time.time()) + 3600), "not valid yet"),
    "iat-in-future": Attack(lambda idp, k: idp.token(AGENT, iat=int(time.time()) + 3600), "not valid yet"),
    "wrong-audience": Attack(lambda idp, k: idp.token(AGENT, aud="some-other-service"), "audience"),
    "untrusted-issuer": Attack(lambda idp, k: idp.token(AGENT, iss="https://evil.example"), "issuer is not trusted"),
    "missing-exp": Attack(lambda idp, k: idp.token(AGENT, omit=("exp",)), "'exp'"),
    "missing-aud": Attack(lambda idp, k: idp.token(AGENT, omit=("aud",)), "'aud'"),
    "missing-iss": Attack(lambda idp, k: idp.token(AGENT, omit=("iss",)), "issuer is not trusted"),
    "missing-sub": Attack(lambda idp, k: idp.token(AGENT, omit=("sub",)), "'sub'"),
    "alg-none-trailing-dot": Attack(lambda idp, k: alg_none(idp, True), "'none'"),
    "alg-none-no-dot": Attack(lambda idp, k: alg_none(idp, False), "not a well-formed JWT"),
    "alg-None-mixed-case": Attack(lambda idp, k: alg_none(idp, True, alg="nOnE"), "'none'"),
    "hs256-key-confusion": Attack(lambda idp, k: hs256_with_public_pem(idp), "HS256 is not allowed"),
    "unknown-kid": Attack(lambda idp, k: idp.token(AGENT, kid="no-such-key"), "kid"),
    "no-kid-ambiguous": Attack(lambda idp, k: idp.token(AGENT, kid=None), "kid"),
    "non-string-kid": Attack(lambda idp, k: raw_header_token(idp, {"alg": "RS256", "kid": 1}), "not a well-formed JWT"),
    "unsupported-crit": Attack(
        lambda idp, k: raw_header_token(idp, {"alg": "RS256", "kid": "rsa-1", "crit": ["exp"], "exp": 1}),
        "not a well-formed JWT",
    ),
    "tampered-signature": Attack(lambda idp, k: tamper_signature(idp.token(AGENT)), "signature is invalid"),
    "tampered-payload-sub": Attack(lambda idp, k: tamper_payload(idp.token(AGENT), sub="admin-bot"), "signature is invalid"),
    "tampered-payload-exp": Attack(
        lambda idp, k: tamper_payload(idp.token(AGENT, ttl=-120), exp=int(time.time()) + 3600), "signature is invalid"
    ),
    "attacker-key-idp-kid": Attack(lambda idp, k: idp.token(AGENT, key=k, kid="rsa-1"), "signature is invalid"),
    "attacker-key-es-kid-rs-alg": Attack(lambda idp, k: idp.token(AGENT, key=k, alg="RS256", kid="ec-1"), "algorithm"),
    "es256-token-with-rsa-kid": Attack(lambda idp, k: idp.token(AGENT, alg="ES256", kid="rsa-1"), "algorithm"),
    "oversized": Attack(lambda idp, k: idp.token(AGENT, blob="x" * 9000), "larger than 8192"),
    "garbage": Attack(lambda idp, k: "not-a-jwt-garbage-7f3a9c", "not a well-formed JWT"),
    "garbage-three-segments": Attack(lambda idp, k: "bm90.YSBqd3Q.Z2FyYmFnZQ", "not a well-formed JWT"),
    "empty-segments": Attack(lambda idp, k: "..", "not a well-formed JWT"),
    "empty-agent-id": Attack(lambda idp, k: idp.token(""), "not a valid agent id"),
}

FORWARD_BASIC, FORWARD_BEARER, REVERSE = "forward-basic", "forward-bearer", "reverse-bearer"
CARRIERS = (FORWARD_BASIC, FORWARD_BEARER, REVERSE)


def send(proctor, upstream, carrier: str, token: str, agent: str = AGENT, path: str = "/items/1") -> requests.Response | httpx.Response:
    """One request carrying `token` as a real client would, through the proxy."""
    if carrier == FORWARD_BASIC:
        # what HTTP_PROXY=http://<agent>:<jwt>@proctor makes requests send
        proxy = f"http://{quote(agent, safe='')}:{quote(token, safe='')}@127.0.0.1:{proctor.port}"
        return requests.get(f"http://127.0.0.1:{upstream.port}{path}", proxies={"http": proxy}, timeout=10)
    if carrier == FORWARD_BEARER:
        with httpx.Client(proxy=proctor.proxy_url, timeout=10) as c:
            return c.get(f"http://127.0.0.1:{upstream.port}{path}", headers={"Proxy-Authorization": f"Bearer {token}"})
    assert carrier == REVERSE
    return requests.get(f"{proctor.gateway_url}/svc{path}", headers={"Authorization": f"Bearer {token}"}, timeout=10)


def secret_fragments(token: str | None) -> list[str]:
    """The token and each of its substantial segments: none may appear anywhere we write."""
    if not token:
        return []
    # (a very short "token" such as ".." could match unrelated text, e.g. a path in the record)
    frags = [token] if len(token) >= 8 else []
    frags += [seg for seg in token.split(".") if len(seg) >= 12]
    if len(token) > 64:
        frags.append(token[-40:])
    return frags


def assert_no_leak(token: str | None, *texts: str) -> None:
    for frag in secret_fragments(token):
        for text in texts:
            assert frag not in text, "the token (or part of it) leaked"


def assert_auth_refused(r, proctor, upstream, status: int, detail: str | None, token: str | None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status
    assert body["title"]
    if detail is not None:
        assert detail in body["detail"], body["detail"]
    assert body["decision_id"] == r.headers["x-proctor-decision-id"]
    assert body["reasons"] == []
    assert "agent" not in body, "a refused credential must not be attributed to an agent"
    if status == 407:
        assert "Basic" in r.headers["proxy-authenticate"] and "Bearer" in r.headers["proxy-authenticate"]
    else:
        assert r.headers["www-authenticate"].startswith("Bearer")
    rec = proctor.decision(body["decision_id"])
    assert rec["decision"] == "deny"
    assert rec["status"] == status
    assert rec["agent"] is None and rec["issuer"] is None
    assert rec["refusal"]["kind"] == "authentication"
    assert rec["refusal"]["detail"] == body["detail"]
    assert rec["upstream_status"] is None
    header_text = json.dumps(dict(r.headers))
    decisions_text = (proctor.dir / "state" / "decisions.jsonl").read_text()
    assert_no_leak(token, r.text, header_text, decisions_text, proctor.log())
    assert upstream.received() == [], "a refused request must not reach the upstream"
    return rec


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("attack", list(ATTACKS), ids=list(ATTACKS))
def test_bad_token_refused(proctor, upstream, idp, attacker_key, carrier, attack):
    a = ATTACKS[attack]
    token = a.make(idp, attacker_key)
    upstream.clear()
    r = send(proctor, upstream, carrier, token)
    status = 401 if carrier == REVERSE else 407
    rec = assert_auth_refused(r, proctor, upstream, status, a.detail, token)
    assert rec["mode"] == ("reverse" if carrier == REVERSE else "forward")


@pytest.mark.parametrize("carrier", ["forward", "reverse"])
def test_no_token_refused(proctor, upstream, carrier):
    upstream.clear()
    if carrier == "forward":
        r = requests.get(f"http://127.0.0.1:{upstream.port}/items/1", proxies={"http": proctor.proxy_url}, timeout=10)
        assert_auth_refused(r, proctor, upstream, 407, "no agent credential", None)
    else:
        r = httpx.get(f"{proctor.gateway_url}/svc/items/1", timeout=10)
        assert_auth_refused(r, proctor, upstream, 401, "no agent credential", None)


@pytest.mark.parametrize(
    "header,detail",
    [
        ("Basic " + base64.b64encode(b"agent-1:").decode(), "must be <agent-id>:<jwt>"),
        ("Basic " + base64.b64encode(b"agent-1").decode(), "must be <agent-id>:<jwt>"),
        ("Basic !!!not-base64!!!", "not valid base64"),
        ("Bearer", "no credentials"),
        ("Digest username=agent-1", "unsupported scheme"),
    ],
    ids=["basic-empty-password", "basic-no-colon", "basic-not-base64", "bearer-empty", "digest"],
)
def test_malformed_proxy_authorization_refused(proctor, upstream, header, detail):
    upstream.clear()
    with httpx.Client(proxy=proctor.proxy_url, timeout=10) as c:
        r = c.get(f"http://127.0.0.1:{upstream.port}/items/1", headers={"Proxy-Authorization": header})
    assert_auth_refused(r, proctor, upstream, 407, detail, None)


def test_basic_without_password_via_proxy_url(proctor, upstream):
    """HTTP_PROXY=http://agent-1@proctor (user, no password) is refused, not treated as anonymous."""
    upstream.clear()
    r = requests.get(
        f"http://127.0.0.1:{upstream.port}/items/1", proxies={"http": f"http://{AGENT}:@127.0.0.1:{proctor.port}"},
        timeout=10,
    )
    assert_auth_refused(r, proctor, upstream, 407, "token goes in the password", None)


def test_reverse_mode_refuses_basic_authorization(proctor, upstream, idp):
    """In gateway mode `Authorization` carries only a Bearer JWT; Basic there is not an agent credential."""
    upstream.clear()
    token = idp.token(AGENT)
    r = requests.get(f"{proctor.gateway_url}/svc/items/1", auth=(AGENT, token), timeout=10)
    assert_auth_refused(r, proctor, upstream, 401, "unsupported scheme", token)


def test_proxy_username_must_match_subject_reverse_proxy_authorization(proctor, upstream, idp):
    upstream.clear()
    token = idp.token("agent-1")
    header = "Basic " + base64.b64encode(f"impostor:{token}".encode()).decode()
    r = requests.get(f"{proctor.gateway_url}/svc/items/1", headers={"Proxy-Authorization": header}, timeout=10)
    assert r.status_code == 401
    assert "username must equal" in r.json()["detail"]
    assert upstream.received() == []
    assert_no_leak(token, r.text, proctor.log())


def test_refusal_does_not_poison_a_later_valid_request(proctor, upstream, idp):
    """A tampered copy of a valid token is refused; the genuine token still works (and vice versa)."""
    token = idp.token(AGENT)
    upstream.clear()
    assert send(proctor, upstream, FORWARD_BEARER, tamper_payload(token, sub="admin-bot")).status_code == 407
    assert send(proctor, upstream, FORWARD_BEARER, token).status_code == 200
    upstream.clear()
    # the genuine token is now cached: a tampered copy must still be refused
    r = send(proctor, upstream, FORWARD_BEARER, tamper_signature(token))
    assert_auth_refused(r, proctor, upstream, 407, "signature is invalid", token)


# ------------------------------------------------------------------ acceptance
@pytest.mark.parametrize("carrier", CARRIERS)
@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_valid_token_accepted(proctor, upstream, idp, carrier, alg):
    token = idp.token(AGENT, alg=alg)
    upstream.clear()
    r = send(proctor, upstream, carrier, token, path="/items/77")
    assert r.status_code == 200, r.text
    got = upstream.received()
    assert len(got) == 1 and got[0]["path"] == "/items/77"
    h = upstream.headers_of(got[0])
    assert "proxy-authorization" not in h and "authorization" not in h
    assert_no_leak(token, json.dumps(got))
    rec = proctor.decision(r.headers["x-proctor-decision-id"])
    assert rec["decision"] == "allow"
    assert rec["agent"] == AGENT and rec["issuer"] == idp.issuer
    assert_no_leak(token, json.dumps(proctor.decisions()), proctor.log())


def test_token_within_leeway_accepted(proctor, upstream, idp):
    """exp 10 s ago is inside the 30 s leeway (clock skew); 120 s ago is not (test_bad_token_refused)."""
    r = send(proctor, upstream, FORWARD_BASIC, idp.token(AGENT, ttl=-10))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "headers",
    [("authorization",), ("proxy-authorization",), ("authorization", "proxy-authorization")],
    ids=["authorization", "proxy-authorization", "both"],
)
def test_reverse_mode_strips_agent_credentials(proctor, upstream, idp, headers):
    token = idp.token(AGENT)
    upstream.clear()
    r = httpx.get(
        f"{proctor.gateway_url}/svc/items/3",
        headers={name: f"Bearer {token}" for name in headers},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    got = upstream.last()
    h = upstream.headers_of(got)
    assert "authorization" not in h and "proxy-authorization" not in h
    assert_no_leak(token, json.dumps(got))
    assert proctor.decision(r.headers["x-proctor-decision-id"])["agent"] == AGENT


def test_forward_mode_strips_agent_token_copied_into_authorization(proctor, upstream, idp):
    """An agent that also puts its JWT in Authorization must not hand it to the upstream."""
    token = idp.token(AGENT)
    upstream.clear()
    with httpx.Client(proxy=proctor.proxy_url, timeout=10) as c:
        r = c.get(
            f"http://127.0.0.1:{upstream.port}/items/3",
            headers={"Proxy-Authorization": f"Bearer {token}", "Authorization": f"Bearer {token}"},
        )
    assert r.status_code == 200, r.text
    got = upstream.last()
    h = upstream.headers_of(got)
    assert "authorization" not in h and "proxy-authorization" not in h
    assert_no_leak(token, json.dumps(got))


# ------------------------------------------------------------------ CONNECT binds identity
def test_connect_tunnel_binds_identity(proctor, upstream_tls, idp):
    token = idp.token("tunnel-bot", groups=["readers"])
    upstream_tls.clear()
    with httpx.Client(proxy=proctor.proxy_url_with("tunnel-bot", token), verify=trusting(proctor), timeout=10) as c:
        r1 = c.get(f"https://localhost:{upstream_tls.port}/items/1")
        r2 = c.get(f"https://localhost:{upstream_tls.port}/items/2")
    assert r1.status_code == 200 and r2.status_code == 200
    ids = [r1.headers["x-proctor-decision-id"], r2.headers["x-proctor-decision-id"]]
    assert ids[0] != ids[1]
    for did, item in zip(ids, ("1", "2")):
        rec = proctor.decision(did)
        assert rec["agent"] == "tunnel-bot" and rec["issuer"] == idp.issuer
        assert rec["resource"] == f'Item::"{item}"' and rec["decision"] == "allow"
    got = upstream_tls.received()
    assert [g["path"] for g in got] == ["/items/1", "/items/2"]
    for g in got:
        assert "proxy-authorization" not in upstream_tls.headers_of(g)
    assert_no_leak(token, json.dumps(got), json.dumps(proctor.decisions()), proctor.log())


def test_concurrent_tunnels_keep_their_own_identity(proctor, upstream_tls, idp):
    """Two agents' tunnels are interleaved; each request is attributed to its own tunnel's agent."""
    ta, tb = idp.token("alpha-bot"), idp.token("beta-bot")
    url = f"https://localhost:{upstream_tls.port}/items"
    with httpx.Client(proxy=proctor.proxy_url_with("alpha-bot", ta), verify=trusting(proctor), timeout=10) as a, \
            httpx.Client(proxy=proctor.proxy_url_with("beta-bot", tb), verify=trusting(proctor), timeout=10) as b:
        rs = [(a.get(f"{url}/a1"), "alpha-bot"), (b.get(f"{url}/b1"), "beta-bot"),
              (a.get(f"{url}/a2"), "alpha-bot"), (b.get(f"{url}/b2"), "beta-bot")]
    for r, agent in rs:
        assert r.status_code == 200
        assert proctor.decision(r.headers["x-proctor-decision-id"])["agent"] == agent


def raw_connect(proctor, port: int, proxy_authorization: str | None) -> tuple[int, dict, bytes]:
    """Send a bare CONNECT and read the proxy's answer (status, lower-cased headers, body)."""
    s = socket.create_connection(("127.0.0.1", proctor.port), timeout=10)
    try:
        auth = f"Proxy-Authorization: {proxy_authorization}\r\n" if proxy_authorization else ""
        s.sendall(f"CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n{auth}\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return status, headers, body
    finally:
        s.close()


@pytest.mark.parametrize(
    "attack", ["expired", "alg-none-trailing-dot", "hs256-key-confusion", "attacker-key-idp-kid", "non-string-kid",
               "unsupported-crit", "tampered-payload-sub", "oversized", "garbage"],
)
def test_connect_with_bad_token_refused(proctor, upstream_tls, idp, attacker_key, attack):
    """A bad token is refused at CONNECT (407): no tunnel is opened, so nothing can be sent through it."""
    a = ATTACKS[attack]
    token = a.make(idp, attacker_key)
    upstream_tls.clear()
    cred = base64.b64encode(f"{AGENT}:{token}".encode()).decode()
    status, headers, body = raw_connect(proctor, upstream_tls.port, f"Basic {cred}")
    assert status == 407, body
    assert headers["content-type"] == "application/problem+json"
    problem = json.loads(body)
    assert a.detail in problem["detail"]
    rec = proctor.decision(problem["decision_id"])
    assert rec["method"] == "CONNECT" and rec["refusal"]["kind"] == "authentication" and rec["agent"] is None
    assert_no_leak(token, body.decode(), json.dumps(headers), json.dumps(proctor.decisions()), proctor.log())
    assert upstream_tls.received() == []


def test_connect_without_token_refused(proctor, upstream_tls):
    status, headers, body = raw_connect(proctor, upstream_tls.port, None)
    assert status == 407
    assert headers["content-type"] == "application/problem+json"
    assert "no agent credential" in json.loads(body)["detail"]


def test_tunnel_identity_expires_with_its_token(proctor_factory, idp, upstream_tls):
    """A tunnel authenticated once must not outlive the token it was opened with."""
    p = proctor_factory({"identity": {"leeway_seconds": 0}})
    token = idp.token("short-bot", ttl=2)
    upstream_tls.clear()
    with httpx.Client(proxy=p.proxy_url_with("short-bot", token), verify=trusting(p), timeout=10) as c:
        r1 = c.get(f"https://localhost:{upstream_tls.port}/items/1")
        assert r1.status_code == 200
        time.sleep(max(0.0, jwt.decode(token, options={"verify_signature": False})["exp"] - time.time()) + 0.3)
        upstream_tls.clear()
        r2 = c.get(f"https://localhost:{upstream_tls.port}/items/2")
    assert r2.status_code == 407
    assert r2.headers["content-type"] == "application/problem+json"
    assert "expired" in r2.json()["detail"]
    assert upstream_tls.received() == []
