"""Credential injection: Proctor adds the connector's upstream credential and removes the agent's."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from aiohttp import web

from conftest import _start_upstream, free_port, wait_for, port_open

pytestmark = pytest.mark.integration


@pytest.fixture
def crm(tmp_path):
    up = _start_upstream(tmp_path, None)
    yield up
    up.proc.terminate()
    up.proc.wait(5)


def crm_connector(port: int, auth: dict) -> dict:
    return {
        "name": "crm",
        "hosts": [f"127.0.0.1:{port}"],
        "routes": [{"method": "GET", "path": "/sobjects/{id}", "action": "test.item.read", "resource": {"type": "Item", "id": "{id}"}}],
        "auth": auth,
    }


def get(p, crm, token, **headers):
    return requests.get(
        f"http://127.0.0.1:{crm.port}/sobjects/1", headers=headers, proxies={"http": p.proxy_url_with("reader-bot", token)}, timeout=10
    )


def assert_no_secret_leaked(p, secret: str):
    text = p.log() + json.dumps(p.decisions())
    assert secret not in text


def test_bearer_from_env_replaces_the_agents_credentials(proctor_factory, crm, reader_token):
    secret = "s3cr3t-crm-token-value"
    p = proctor_factory(extra_connectors=[crm_connector(crm.port, {"type": "bearer", "token": {"env": "CRM_TOKEN"}})], env={"CRM_TOKEN": secret})
    r = get(p, crm, reader_token, Authorization="Bearer agent-own-key", Cookie="session=agent-cookie")
    assert r.status_code == 200, r.text
    h = crm.headers_of(crm.last())
    assert h["authorization"] == f"Bearer {secret}"
    assert "cookie" not in h and "proxy-authorization" not in h
    assert "agent-own-key" not in json.dumps(crm.last())
    assert_no_secret_leaked(p, secret)


def test_api_key_from_file_and_basic_from_env(proctor_factory, crm, reader_token, tmp_path):
    keyfile = tmp_path / "key"
    keyfile.write_text("file-api-key-123\n")
    p = proctor_factory(extra_connectors=[crm_connector(crm.port, {"type": "api_key", "header": "X-Api-Key", "value": {"file": str(keyfile)}})])
    assert get(p, crm, reader_token, **{"X-Api-Key": "agent-supplied"}).status_code == 200
    assert crm.headers_of(crm.last())["x-api-key"] == "file-api-key-123"
    p.stop()
    p2 = proctor_factory(
        extra_connectors=[crm_connector(crm.port, {"type": "basic", "username": {"env": "CRM_USER"}, "password": {"env": "CRM_PASS"}})],
        env={"CRM_USER": "svc", "CRM_PASS": "pa55word"},
    )
    assert get(p2, crm, reader_token).status_code == 200
    assert crm.headers_of(crm.last())["authorization"] == "Basic " + base64.b64encode(b"svc:pa55word").decode()
    assert_no_secret_leaked(p2, "pa55word")


def test_missing_secret_fails_closed(proctor_factory, crm, reader_token):
    p = proctor_factory(extra_connectors=[crm_connector(crm.port, {"type": "bearer", "token": {"env": "CRM_TOKEN_NOT_SET"}})])
    crm.clear()
    r = get(p, crm, reader_token)
    assert r.status_code == 503
    body = r.json()
    assert body["reasons"] == ["upstream-credential-unavailable"] and "CRM_TOKEN_NOT_SET" in body["detail"]
    assert crm.received() == []
    assert p.decision(body["decision_id"])["status"] == 503


def test_manifest_refuses_inline_secrets(proctor_factory, crm):
    bad = crm_connector(crm.port, {"type": "bearer", "token": "inline-secret"})
    with pytest.raises(RuntimeError, match="never written inline|token"):
        proctor_factory(extra_connectors=[bad])


class TokenEndpoint:
    """A real OAuth2 token endpoint on loopback (client credentials, HTTP basic)."""

    def __init__(self, expires_in: int) -> None:
        self.port = free_port()
        self.expires_in = expires_in
        self.hits = 0
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, daemon=True).start()
        wait_for(lambda: port_open(self.port), what="token endpoint")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def token(request: web.Request) -> web.Response:
            form = await request.post()
            if request.headers.get("Authorization") != "Basic " + base64.b64encode(b"client-1:client-secret-xyz").decode():
                return web.json_response({"error": "invalid_client"}, status=401)
            assert form["grant_type"] == "client_credentials" and form["scope"] == "api"
            self.hits += 1
            await asyncio.sleep(0.05)
            return web.json_response({"access_token": f"tok-{self.hits}", "token_type": "Bearer", "expires_in": self.expires_in})

        app = web.Application()
        app.router.add_post("/token", token)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.loop.run_forever()


def test_oauth2_client_credentials_cached_shared_and_refreshed(proctor_factory, crm, reader_token):
    idp = TokenEndpoint(expires_in=3)
    auth = {
        "type": "oauth2_client_credentials",
        "token_url": f"http://127.0.0.1:{idp.port}/token",
        "client_id": {"env": "CRM_CLIENT_ID"},
        "client_secret": {"env": "CRM_CLIENT_SECRET"},
        "scope": "api",
        "refresh_before_seconds": 1,
    }
    p = proctor_factory(extra_connectors=[crm_connector(crm.port, auth)], env={"CRM_CLIENT_ID": "client-1", "CRM_CLIENT_SECRET": "client-secret-xyz"})
    with ThreadPoolExecutor(max_workers=8) as pool:  # concurrent first requests share one fetch
        statuses = list(pool.map(lambda _: get(p, crm, reader_token).status_code, range(8)))
    assert statuses == [200] * 8
    assert idp.hits == 1
    assert crm.headers_of(crm.last())["authorization"] == "Bearer tok-1"
    time.sleep(2.2)  # within refresh_before_seconds of expiry: refreshed before it lapses
    assert get(p, crm, reader_token).status_code == 200
    assert idp.hits == 2 and crm.headers_of(crm.last())["authorization"] == "Bearer tok-2"
    assert_no_secret_leaked(p, "client-secret-xyz")
    assert_no_secret_leaked(p, "tok-1")
