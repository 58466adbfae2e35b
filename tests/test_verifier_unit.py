"""TokenVerifier, key sources and credential extraction called directly (fast, no processes).

The same attack list as tests/test_identity.py, plus what only a unit test can
reach cheaply: the verified-token cache (expiry and key revocation on cache
hits), symmetric-key confusion even when HS256 is (mis)configured, malformed
headers and claims, and that no AuthError message ever contains the token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid

import pytest
from conftest import Idp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from proxy.config import DevIssuerConfig, IdentityConfig, IssuerConfig
from proxy.identity import verifier as verifier_mod
from proxy.identity.credentials import extract_credential
from proxy.identity.dev_issuer import DevIssuer
from proxy.identity.errors import AuthError, IdentityUnavailable
from proxy.identity.jwks import FileKeySource, UrlKeySource, parse_jwks
from proxy.identity.verifier import TokenVerifier

ISS = "https://idp.unit"
AUD = "proctor"


# ------------------------------------------------------------------ fixtures
def jwk_of(key, kid: str, alg: str) -> dict:
    algo = RSAAlgorithm if alg.startswith(("RS", "PS")) else ECAlgorithm
    d = json.loads(algo.to_jwk(key.public_key()))
    d.update({"kid": kid, "use": "sig", "alg": alg})
    return d


@pytest.fixture(scope="module")
def keys():
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec": ec.generate_private_key(ec.SECP256R1()),
        "attacker": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }


@pytest.fixture
def uidp(tmp_path, keys) -> Idp:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk_of(keys["rsa"], "rsa-1", "RS256"), jwk_of(keys["ec"], "ec-1", "ES256")]}))
    return Idp(path, keys["rsa"], keys["ec"], issuer=ISS, audience=AUD)


def make_verifier(idp: Idp, **settings) -> TokenVerifier:
    issuer = settings.pop("issuer_cfg", None) or IssuerConfig(
        issuer=idp.issuer, audience=idp.audience, jwks_file=idp.jwks_path, algorithms=["RS256", "ES256"]
    )
    return TokenVerifier([issuer], IdentityConfig(issuers=[], **settings))


def run(coro):
    return asyncio.run(coro)


def refused(v: TokenVerifier, token: str) -> str:
    """Verify must fail with AuthError; return its message (checked never to contain the token)."""
    with pytest.raises(AuthError) as ei:
        run(v.verify(token))
    msg = str(ei.value)
    assert_no_leak(token, msg)
    return msg


def assert_no_leak(token: str, text: str) -> None:
    if not token:
        return
    assert token not in text
    for seg in token.split("."):
        if len(seg) >= 12:
            assert seg not in text


# ------------------------------------------------------------------ crafting
def b64url(data: bytes | dict) -> str:
    if isinstance(data, dict):
        data = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(idp: Idp, sub: str = "agent-1", **extra) -> dict:
    now = int(time.time())
    c = {"iss": idp.issuer, "aud": idp.audience, "sub": sub, "iat": now, "nbf": now, "exp": now + 300,
         "jti": uuid.uuid4().hex}
    c.update(extra)
    return c


def rs256_raw(idp: Idp, header: bytes | dict, payload: bytes | dict) -> str:
    """Sign arbitrary header/payload bytes with the IdP's RSA key (PyJWT would refuse to build these)."""
    signing_input = b64url(header) + "." + b64url(payload)
    sig = idp.rsa_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + b64url(sig)


def hs256_with_pem(idp: Idp, kid: str = "rsa-1") -> str:
    header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid is not None else {})
    signing_input = b64url(header) + "." + b64url(claims(idp))
    return signing_input + "." + b64url(hmac.new(idp.public_pem(), signing_input.encode(), hashlib.sha256).digest())


def tamper_signature(token: str) -> str:
    h, p, s = token.split(".")
    i = len(s) // 2
    return ".".join((h, p, s[:i] + ("A" if s[i] != "A" else "B") + s[i + 1 :]))


def tamper_payload(token: str, **changes) -> str:
    h, p, s = token.split(".")
    c = json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))
    c.update(changes)
    return ".".join((h, b64url(c), s))


def none_token(idp: Idp, alg: str = "none", dot: bool = True) -> str:
    t = b64url({"alg": alg, "typ": "JWT"}) + "." + b64url(claims(idp))
    return t + "." if dot else t


# ------------------------------------------------------------------ the attack list
ATTACKS = {
    "expired": (lambda i, k: i.token(ttl=-120), "expired"),
    "nbf-in-future": (lambda i, k: i.token(nbf=int(time.time()) + 3600), "not valid yet"),
    "iat-in-future": (lambda i, k: i.token(iat=int(time.time()) + 3600), "not valid yet"),
    "wrong-audience": (lambda i, k: i.token(aud="other"), "audience"),
    "audience-list-without-ours": (lambda i, k: i.token(aud=["a", "b"]), "audience"),
    "untrusted-issuer": (lambda i, k: i.token(iss="https://evil.example"), "issuer is not trusted"),
    "issuer-prefix": (lambda i, k: i.token(iss=ISS + ".evil"), "issuer is not trusted"),
    "missing-exp": (lambda i, k: i.token(omit=("exp",)), "'exp'"),
    "missing-aud": (lambda i, k: i.token(omit=("aud",)), "'aud'"),
    "missing-iss": (lambda i, k: i.token(omit=("iss",)), "issuer is not trusted"),
    "missing-sub": (lambda i, k: i.token(omit=("sub",)), "'sub'"),
    "alg-none": (lambda i, k: none_token(i), "'none'"),
    "alg-none-no-dot": (lambda i, k: none_token(i, dot=False), "not a well-formed JWT"),
    "alg-NONE": (lambda i, k: none_token(i, "NONE"), "'none'"),
    "alg-none-with-signature": (lambda i, k: none_token(i) + b64url(b"sig"), "'none'"),
    "alg-missing": (lambda i, k: rs256_raw(i, {"kid": "rsa-1"}, claims(i)), "no algorithm"),
    "alg-not-a-string": (lambda i, k: rs256_raw(i, {"alg": ["RS256"], "kid": "rsa-1"}, claims(i)), "no algorithm"),
    "hs256-public-pem": (lambda i, k: hs256_with_pem(i), "HS256 is not allowed"),
    "hs256-no-kid": (lambda i, k: hs256_with_pem(i, kid=None), "HS256 is not allowed"),
    "unlisted-asymmetric-alg": (lambda i, k: i.token(alg="PS256"), "PS256 is not allowed"),
    "unknown-kid": (lambda i, k: i.token(kid="nope"), "kid"),
    "no-kid-two-keys": (lambda i, k: i.token(kid=None), "kid"),
    "non-string-kid": (lambda i, k: rs256_raw(i, {"alg": "RS256", "kid": 7}, claims(i)), "not a well-formed JWT"),
    "unsupported-crit": (lambda i, k: rs256_raw(i, {"alg": "RS256", "kid": "rsa-1", "crit": ["x"], "x": 1}, claims(i)),
                         "not a well-formed JWT"),
    "header-not-object": (lambda i, k: rs256_raw(i, b"[1]", claims(i)), "not a well-formed JWT"),
    "payload-not-object": (lambda i, k: rs256_raw(i, {"alg": "RS256", "kid": "rsa-1"}, b"[1,2]"), "not a well-formed JWT"),
    "tampered-signature": (lambda i, k: tamper_signature(i.token()), "signature is invalid"),
    "tampered-payload-sub": (lambda i, k: tamper_payload(i.token(), sub="admin-bot"), "signature is invalid"),
    "truncated-signature": (lambda i, k: i.token().rsplit(".", 1)[0] + ".", "signature is invalid"),
    "es256-short-signature": (lambda i, k: i.token(alg="ES256").rsplit(".", 1)[0] + ".AAAA", "signature is invalid"),
    "attacker-key-idp-kid": (lambda i, k: i.token(key=k, kid="rsa-1"), "signature is invalid"),
    "es256-with-rsa-kid": (lambda i, k: i.token(alg="ES256", kid="rsa-1"), "algorithm"),
    "rs256-with-ec-kid": (lambda i, k: i.token(alg="RS256", kid="ec-1"), "algorithm"),
    "oversized": (lambda i, k: i.token(blob="x" * 9000), "larger than 8192"),
    "oversized-multibyte": (lambda i, k: "é" * 5000, "larger than 8192"),
    "non-ascii": (lambda i, k: "é.é.é", "not a well-formed JWT"),
    "undecodable-bytes": (lambda i, k: "ab\udcff.cd.ef", "not a well-formed JWT"),
    "garbage": (lambda i, k: "not-a-jwt-garbage-7f3a9c", "not a well-formed JWT"),
    "empty": (lambda i, k: "", "not a well-formed JWT"),
    "dots": (lambda i, k: "..", "not a well-formed JWT"),
    "four-segments": (lambda i, k: i.token() + ".x", "not a well-formed JWT"),
    "sub-empty": (lambda i, k: i.token(""), "not a valid agent id"),
    "sub-whitespace": (lambda i, k: i.token(" agent-1"), "not a valid agent id"),
    "sub-control-char": (lambda i, k: i.token("agent\n1"), "not a valid agent id"),
    "sub-too-long": (lambda i, k: i.token("a" * 300), "not a valid agent id"),
    "sub-not-string": (lambda i, k: rs256_raw(i, {"alg": "RS256", "kid": "rsa-1"}, claims(i, sub=5)), "invalid"),
    "exp-string": (lambda i, k: rs256_raw(i, {"alg": "RS256", "kid": "rsa-1"}, claims(i, exp="soon")), "invalid"),
    "exp-nan": (lambda i, k: rs256_raw(i, {"alg": "RS256", "kid": "rsa-1"},
                                       json.dumps(claims(i, exp=float("nan"))).encode()), "invalid"),
    "nbf-string": (lambda i, k: rs256_raw(i, {"alg": "RS256", "kid": "rsa-1"}, claims(i, nbf="x")), "invalid"),
    "iss-list": (lambda i, k: rs256_raw(i, {"alg": "RS256", "kid": "rsa-1"}, claims(i, iss=[ISS])), "issuer is not trusted"),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_refused(uidp, keys, name):
    make, fragment = ATTACKS[name]
    v = make_verifier(uidp)
    msg = refused(v, make(uidp, keys["attacker"]))
    assert fragment in msg, msg


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_valid_token_accepted(uidp, alg):
    v = make_verifier(uidp)
    ident = run(v.verify(uidp.token("agent-7", alg=alg, team="ops", groups=["readers"])))
    assert ident.agent_id == "agent-7" and ident.issuer == ISS
    assert ident.claims["team"] == "ops" and ident.claims["groups"] == ["readers"]
    assert ident.expires_at == pytest.approx(time.time() + 300, abs=5)


def test_audience_list_with_ours_accepted(uidp):
    assert run(make_verifier(uidp).verify(uidp.token(aud=["other", AUD]))).agent_id == "agent-1"


def test_leeway_bounds(uidp):
    v = make_verifier(uidp)
    assert run(v.verify(uidp.token(ttl=-10))).agent_id == "agent-1"  # within the 30 s leeway
    refused(v, uidp.token(ttl=-31 - 1))
    strict = make_verifier(uidp, leeway_seconds=0)
    assert "expired" in refused(strict, uidp.token(ttl=-2))


def test_no_kid_accepted_only_when_unambiguous(tmp_path, keys):
    path = tmp_path / "one.json"
    path.write_text(json.dumps({"keys": [jwk_of(keys["rsa"], "only", "RS256")]}))
    one = Idp(path, keys["rsa"], keys["ec"], issuer=ISS, audience=AUD)
    assert run(make_verifier(one).verify(one.token(kid=None))).agent_id == "agent-1"
    # still bound to that key: another key without a kid is refused
    assert "signature is invalid" in refused(make_verifier(one), one.token(kid=None, key=keys["attacker"]))


def test_missing_exp_accepted_only_when_not_required(uidp):
    tok = uidp.token(omit=("exp",))
    refused(make_verifier(uidp), tok)
    ident = run(make_verifier(uidp, require_exp=False).verify(tok))
    assert ident.expires_at is None


def test_custom_agent_id_claim(uidp):
    v = make_verifier(uidp, principal={"agent_id_claim": "agent"})
    assert run(v.verify(uidp.token("user-x", agent="bot-9"))).agent_id == "bot-9"
    assert "'agent'" in refused(v, uidp.token("user-x"))


def test_key_confusion_refused_even_with_symmetric_algorithms_enabled(uidp):
    """A (mis)configuration allowing HS256 next to RS256 must still not verify HMAC with the RSA public key."""
    cfg = IssuerConfig(
        issuer=ISS, audience=AUD, jwks_file=uidp.jwks_path, algorithms=["HS256", "RS256"], allow_symmetric=True
    )
    v = make_verifier(uidp, issuer_cfg=cfg)
    msg = refused(v, hs256_with_pem(uidp))
    assert "algorithm" in msg
    # and the genuine RS256 token still works
    assert run(v.verify(uidp.token())).agent_id == "agent-1"


@pytest.mark.parametrize("jwk_alg", [None, "RS256"])
def test_key_confusion_with_hmac_over_jwk_json(tmp_path, keys, jwk_alg):
    """HMAC keyed with the JWK's own JSON or modulus is refused too (alg is bound to the key type)."""
    jwk = jwk_of(keys["rsa"], "rsa-1", "RS256")
    if jwk_alg is None:
        jwk.pop("alg")
    path = tmp_path / "j.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    idp = Idp(path, keys["rsa"], keys["ec"], issuer=ISS, audience=AUD)
    cfg = IssuerConfig(issuer=ISS, audience=AUD, jwks_file=path, algorithms=["HS256", "RS256"], allow_symmetric=True)
    v = make_verifier(idp, issuer_cfg=cfg)
    signing_input = b64url({"alg": "HS256", "kid": "rsa-1"}) + "." + b64url(claims(idp))
    for secret in (json.dumps(jwk).encode(), jwk["n"].encode(), idp.public_pem()):
        sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        refused(v, signing_input + "." + b64url(sig))


def test_multiple_issuers_are_isolated(tmp_path, uidp, keys):
    """Issuer B's key cannot vouch for a token claiming issuer A (keys are looked up per issuer)."""
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"keys": [jwk_of(keys["attacker"], "rsa-1", "RS256")]}))
    v = TokenVerifier(
        [
            IssuerConfig(issuer=ISS, audience=AUD, jwks_file=uidp.jwks_path, algorithms=["RS256"]),
            IssuerConfig(issuer="https://other.idp", audience=AUD, jwks_file=other, algorithms=["RS256"]),
        ],
        IdentityConfig(issuers=[]),
    )
    assert run(v.verify(uidp.token(key=keys["attacker"], iss="https://other.idp"))).issuer == "https://other.idp"
    refused(v, uidp.token(key=keys["attacker"]))  # claims ISS, signed by the other issuer's key
    assert run(v.verify(uidp.token())).issuer == ISS


# ------------------------------------------------------------------ the verified-token cache
class _Clock:
    """Stands in for the `time` module inside proxy.identity.verifier only."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset


def test_cache_skips_signature_check_but_not_expiry(uidp, monkeypatch):
    v = make_verifier(uidp)
    tok = uidp.token(ttl=60)
    assert run(v.verify(tok)).agent_id == "agent-1"

    # From now on any full verification would blow up: the next call must be a cache hit.
    def no_decode(*a, **k):
        raise AssertionError("cache miss")

    monkeypatch.setattr(verifier_mod.jwt, "decode", no_decode)
    assert run(v.verify(tok)).agent_id == "agent-1"

    clock = _Clock()
    monkeypatch.setattr(verifier_mod, "time", clock)
    clock.offset = 60 + 29  # inside exp + 30 s leeway: still valid
    assert run(v.verify(tok)).agent_id == "agent-1"
    clock.offset = 60 + 32  # past it: the cached token is refused, without re-decoding
    assert "expired" in refused(v, tok)


def test_cache_honours_zero_leeway(uidp, monkeypatch):
    v = make_verifier(uidp, leeway_seconds=0)
    tok = uidp.token(ttl=5)
    run(v.verify(tok))
    monkeypatch.setattr(verifier_mod, "time", _Clock(6))
    assert "expired" in refused(v, tok)


def test_cache_does_not_accept_a_tampered_copy(uidp):
    v = make_verifier(uidp)
    tok = uidp.token()
    run(v.verify(tok))
    refused(v, tamper_payload(tok, sub="admin-bot"))
    refused(v, tamper_signature(tok))
    refused(v, tok + "x")


def test_cache_is_bounded(uidp):
    v = make_verifier(uidp, cache_size=3)
    for _ in range(10):
        run(v.verify(uidp.token()))
    assert len(v._cache) <= 3


def test_cache_disabled(uidp, monkeypatch):
    v = make_verifier(uidp, cache_size=0)
    tok = uidp.token()
    run(v.verify(tok))
    calls = []
    real = verifier_mod.jwt.decode
    monkeypatch.setattr(verifier_mod.jwt, "decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(v.verify(tok))
    assert calls, "with cache_size 0 every token is fully verified"


def _set_min_refetch(v: TokenVerifier, seconds: float) -> None:
    # FileKeySource re-checks its file at most once a second; tests do not wait for that.
    for issuer in v._issuers.values():
        issuer.keys.min_refetch = seconds


def test_removed_key_revokes_tokens_even_cached(uidp, keys):
    v = make_verifier(uidp)
    _set_min_refetch(v, 0)
    rs, es = uidp.token(), uidp.token(alg="ES256")
    run(v.verify(rs))
    run(v.verify(es))
    # the IdP revokes rsa-1
    uidp.jwks_path.write_text(json.dumps({"keys": [jwk_of(keys["ec"], "ec-1", "ES256")]}))
    assert "kid" in refused(v, rs)  # was cached
    assert "kid" in refused(v, uidp.token())  # fresh
    assert run(v.verify(es)).agent_id == "agent-1"  # the other key is unaffected


def test_replaced_key_under_same_kid(uidp, keys):
    """The IdP re-keys `rsa-1`: tokens signed by the old key stop working, cached or not."""
    v = make_verifier(uidp)
    _set_min_refetch(v, 0)
    old = uidp.token()
    run(v.verify(old))
    uidp.jwks_path.write_text(json.dumps({"keys": [jwk_of(keys["rsa2"], "rsa-1", "RS256")]}))
    assert "signature is invalid" in refused(v, old)
    assert run(v.verify(uidp.token(key=keys["rsa2"]))).agent_id == "agent-1"


def test_rotation_new_kid_picked_up_from_file(uidp, keys):
    v = make_verifier(uidp)
    run(v.verify(uidp.token()))
    doc = json.loads(uidp.jwks_path.read_text())
    doc["keys"].append(jwk_of(keys["rsa2"], "rsa-2", "RS256"))
    uidp.jwks_path.write_text(json.dumps(doc))
    # unknown kid triggers a re-read (not rate-limited yet: no miss so far)
    assert run(v.verify(uidp.token(key=keys["rsa2"], kid="rsa-2"))).agent_id == "agent-1"


def test_unusable_jwks_file_keeps_previous_keys(uidp):
    v = make_verifier(uidp)
    _set_min_refetch(v, 0)
    run(v.verify(uidp.token()))
    uidp.jwks_path.write_text("{not json")
    assert run(v.verify(uidp.token())).agent_id == "agent-1"


def test_missing_jwks_file_fails_closed(tmp_path, uidp):
    cfg = IssuerConfig(issuer=ISS, audience=AUD, jwks_file=tmp_path / "absent.json", algorithms=["RS256"])
    v = make_verifier(uidp, issuer_cfg=cfg)
    with pytest.raises(IdentityUnavailable):
        run(v.verify(uidp.token()))


# ------------------------------------------------------------------ key sources
def test_file_key_source_miss_reload_is_rate_limited(tmp_path, keys, monkeypatch):
    path = tmp_path / "j.json"
    path.write_text(json.dumps({"keys": [jwk_of(keys["rsa"], "a", "RS256")]}))
    src = FileKeySource(path, min_refetch_seconds=60)
    loads = []
    real = src._load
    monkeypatch.setattr(src, "_load", lambda: loads.append(1) or real())
    for i in range(50):
        with pytest.raises(AuthError):
            run(src.get_key(f"random-{i}"))
    assert len(loads) <= 1


def test_url_key_source_unreachable_fails_closed_and_is_rate_limited(monkeypatch):
    src = UrlKeySource("https://127.0.0.1:9/jwks.json", min_refetch_seconds=30, timeout_seconds=2)
    fetches = []
    real = src._fetch
    monkeypatch.setattr(src, "_fetch", lambda: fetches.append(1) or real())

    async def burst():
        for kid in ("a", "b", None, "c"):
            with pytest.raises(IdentityUnavailable):
                await src.get_key(kid)

    run(burst())
    assert len(fetches) == 1


def test_parse_jwks_skips_encryption_keys_and_rejects_empty(keys):
    enc = jwk_of(keys["rsa"], "enc-1", "RS256") | {"use": "enc"}
    sig = jwk_of(keys["ec"], "ec-1", "ES256")
    parsed = parse_jwks(json.dumps({"keys": [enc, sig, {"kty": "bogus", "kid": "x"}]}))
    assert list(parsed) == ["ec-1"]
    for bad in ('{"keys": []}', json.dumps({"keys": [enc]}), "[]", '{"nokeys": 1}'):
        with pytest.raises(ValueError):
            parse_jwks(bad)


def test_encryption_key_cannot_verify(tmp_path, keys):
    """A key published for encryption (`use: enc`) must not verify signatures."""
    path = tmp_path / "j.json"
    path.write_text(json.dumps({"keys": [jwk_of(keys["rsa"], "enc-1", "RS256") | {"use": "enc"},
                                         jwk_of(keys["ec"], "ec-1", "ES256")]}))
    idp = Idp(path, keys["rsa"], keys["ec"], issuer=ISS, audience=AUD)
    assert "kid" in refused(make_verifier(idp), idp.token(kid="enc-1"))


# ------------------------------------------------------------------ credentials
def basic(user_pass: bytes) -> str:
    return "Basic " + base64.b64encode(user_pass).decode()


@pytest.mark.parametrize(
    "headers,reverse,fragment",
    [
        ({}, False, "no agent credential"),
        ({}, True, "no agent credential"),
        ({"authorization": "Bearer abc.def.ghi"}, False, "no agent credential"),  # forward mode needs Proxy-Authorization
        ({"proxy-authorization": basic(b"agent-1:")}, False, "<agent-id>:<jwt>"),
        ({"proxy-authorization": basic(b"agent-1")}, False, "<agent-id>:<jwt>"),
        ({"proxy-authorization": "Basic %%%"}, False, "not valid base64"),
        ({"proxy-authorization": "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode()}, False, "not valid base64"),
        ({"proxy-authorization": "Bearer"}, False, "no credentials"),
        ({"proxy-authorization": "Bearer   "}, False, "no credentials"),
        ({"proxy-authorization": "Negotiate abc"}, False, "unsupported scheme"),
        ({"authorization": basic(b"agent-1:secret-token-value")}, True, "unsupported scheme"),
        ({"authorization": "Bearer"}, True, "no credentials"),
    ],
)
def test_extract_credential_refusals(headers, reverse, fragment):
    with pytest.raises(AuthError) as ei:
        extract_credential(headers, reverse_mode=reverse)
    assert fragment in str(ei.value)
    assert "secret-token-value" not in str(ei.value)


def test_extract_credential_forms():
    c = extract_credential({"proxy-authorization": basic(b"agent-1:tok.en.x")}, reverse_mode=False)
    assert (c.token, c.username, c.header) == ("tok.en.x", "agent-1", "Proxy-Authorization")
    c = extract_credential({"proxy-authorization": "bearer  tok.en.y "}, reverse_mode=False)
    assert (c.token, c.username) == ("tok.en.y", None)
    c = extract_credential({"authorization": "Bearer tok.en.z"}, reverse_mode=True)
    assert (c.token, c.header.lower()) == ("tok.en.z", "authorization")
    # Proxy-Authorization wins over Authorization in gateway mode
    c = extract_credential({"authorization": "Bearer a.b.c", "proxy-authorization": "Bearer d.e.f"}, reverse_mode=True)
    assert c.token == "d.e.f"


# ------------------------------------------------------------------ messages never carry the token
def test_no_auth_error_message_contains_the_token(uidp, keys):
    """Sweep every attack plus credential parsing with a recognisable token: no message echoes it."""
    v = make_verifier(uidp)
    messages = []
    for make, _ in ATTACKS.values():
        tok = make(uidp, keys["attacker"])
        with pytest.raises((AuthError, IdentityUnavailable)) as ei:
            run(v.verify(tok))
        messages.append((tok, str(ei.value)))
    marker = "SECRET-MARKER-" + uuid.uuid4().hex
    for hdr in (f"Bearer {marker}", basic(f"agent:{marker}".encode()), basic(marker.encode()), f"Weird {marker}"):
        try:
            cred = extract_credential({"proxy-authorization": hdr}, reverse_mode=False)
            with pytest.raises(AuthError) as ei:
                run(v.verify(cred.token))
            messages.append((marker, str(ei.value)))
        except AuthError as e:
            messages.append((marker, str(e)))
    for tok, msg in messages:
        assert_no_leak(tok, msg)
        assert len(msg) < 200


# ------------------------------------------------------------------ dev issuer
def test_dev_issuer_tokens_verify_and_are_bounded(tmp_path):
    cfg = DevIssuerConfig(max_ttl="2h")
    dev = DevIssuer(tmp_path / "dev", cfg)
    tok = dev.issue("dev-bot", {"team": "ops"}, ttl="1h")
    issuer = IssuerConfig(issuer=cfg.issuer, audience=cfg.audience, jwks_file=dev.jwks_path, algorithms=["ES256"])
    v = TokenVerifier([issuer], IdentityConfig(issuers=[]))
    ident = run(v.verify(tok))
    assert ident.agent_id == "dev-bot" and ident.claims["team"] == "ops"
    assert ident.expires_at == pytest.approx(time.time() + 3600, abs=10)
    with pytest.raises(ValueError):
        dev.issue("dev-bot", ttl="3h")
    # the private key is private
    assert (dev.key_path.stat().st_mode & 0o077) == 0
    # a token from another dev issuer instance (another key) is refused
    other = DevIssuer(tmp_path / "other", cfg).issue("dev-bot")
    with pytest.raises(AuthError):
        run(v.verify(other))
