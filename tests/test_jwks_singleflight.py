"""JWKS fetches are single-flight: concurrent verifications that need keys cost one request to the IdP.

A slow HTTPS JWKS endpoint (certificate from the test CA) counts requests.
Covered: a cold cache hit by a burst; a key rotation (unknown `kid`) seen by a
burst while the IdP is slower than `jwks_min_refetch_seconds` (the old lock let
each waiter refetch in turn); the agents' and the control API's verifiers
sharing one fetch; a waiter that gives up not cancelling the fetch for the
others; and the same through a real proxy process.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from proxy.config import IdentityConfig, IssuerConfig
from proxy.identity.jwks import UrlKeySource, shared_url_source
from proxy.identity.verifier import TokenVerifier
from support.jwks_server import JwksServer


@pytest.fixture
def slow_jwks(pki, idp):
    srv = JwksServer(pki, json.loads(idp.jwks_path.read_text()), delay=0.5)
    yield srv
    srv.stop()


def _source(srv: JwksServer, pki, **kw) -> UrlKeySource:
    return UrlKeySource(srv.url, ca_file=pki.ca_pem, **kw)


def test_cold_burst_is_one_fetch(slow_jwks, pki):
    src = _source(slow_jwks, pki)

    async def burst():
        return await asyncio.gather(*(src.get_key(kid) for kid in ["rsa-1", "ec-1"] * 25))

    keys = asyncio.run(burst())
    assert slow_jwks.count() == 1
    assert src.fetches == 1
    assert {k.key_id for k in keys} == {"rsa-1", "ec-1"}


def test_rotation_burst_with_an_idp_slower_than_the_refetch_limit_is_one_fetch(slow_jwks, pki):
    """The IdP takes 1.5 s, refetches are allowed every 1 s: a burst of tokens signed
    with a new key must still cause one fetch, not one per waiter."""
    src = _source(slow_jwks, pki, min_refetch_seconds=1)
    asyncio.run(src.get_key("rsa-1"))
    assert slow_jwks.count() == 1
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(new_key.public_key())) | {"kid": "rsa-2", "use": "sig", "alg": "RS256"}
    slow_jwks.doc = {"keys": slow_jwks.doc["keys"] + [jwk]}
    slow_jwks.delay = 1.5
    time.sleep(1.1)  # past the refetch limit

    async def burst():
        return await asyncio.gather(*(src.get_key("rsa-2") for _ in range(30)))

    keys = asyncio.run(burst())
    assert slow_jwks.count() == 2  # the first load and one refetch
    assert all(k.key_id == "rsa-2" for k in keys)


def test_agent_and_control_verifiers_share_one_fetch(slow_jwks, pki, idp):
    """The pipeline and the control API each build a verifier for the same issuer
    (different audiences): one key source, one fetch."""
    base = dict(issuer=idp.issuer, jwks_url=slow_jwks.url, jwks_ca_file=pki.ca_pem, algorithms=["RS256", "ES256"])
    agents = TokenVerifier([IssuerConfig(audience=idp.audience, **base)], IdentityConfig(issuers=[]))
    people = TokenVerifier([IssuerConfig(audience="proctor-approvers", **base)], IdentityConfig(issuers=[]))
    agent_tokens = [idp.token(f"agent-{i}") for i in range(10)]
    approver_tokens = [idp.token(f"person-{i}", aud="proctor-approvers") for i in range(10)]

    async def burst():
        return await asyncio.gather(
            *(agents.verify(t) for t in agent_tokens), *(people.verify(t) for t in approver_tokens)
        )

    identities = asyncio.run(burst())
    assert slow_jwks.count() == 1
    assert sorted(i.agent_id for i in identities) == sorted(
        [f"agent-{i}" for i in range(10)] + [f"person-{i}" for i in range(10)]
    )
    assert shared_url_source(slow_jwks.url, 300, 30, pki.ca_pem) is agents._issuers[idp.issuer].keys


def test_a_waiter_that_gives_up_does_not_cancel_the_fetch_for_others(slow_jwks, pki):
    src = _source(slow_jwks, pki)

    async def scenario():
        impatient = asyncio.create_task(src.get_key("rsa-1"))
        patient = asyncio.create_task(src.get_key("ec-1"))
        await asyncio.sleep(0.1)
        impatient.cancel()  # e.g. the agent hung up
        key = await patient
        assert impatient.cancelled()
        return key

    key = asyncio.run(scenario())
    assert key.key_id == "ec-1"
    assert slow_jwks.count() == 1


@pytest.mark.integration
def test_a_burst_through_the_proxy_fetches_once(proctor_factory, slow_jwks, pki, idp, upstream):
    issuer = {"issuer": idp.issuer, "audience": idp.audience, "jwks_url": slow_jwks.url,
              "jwks_ca_file": str(pki.ca_pem), "algorithms": ["RS256", "ES256"]}
    p = proctor_factory({"identity": {"issuers": [issuer]}})
    assert slow_jwks.count() == 0
    tokens = [idp.token(f"bot-{i}", groups=["readers"]) for i in range(20)]

    def call(i: int) -> int:
        proxies = {"http": p.proxy_url_with(f"bot-{i}", tokens[i])}
        return requests.get(f"http://127.0.0.1:{upstream.port}/items/{i}", proxies=proxies, timeout=20).status_code

    with ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(call, range(20)))
    assert statuses == [200] * 20
    assert slow_jwks.count() == 1
