"""Upstream credential injection: Proctor holds the enterprise systems' secrets, agents never do.

A connector's `auth:` section names the credential. Secrets are referenced,
never written in the manifest: `{env: NAME}` or `{file: /run/secrets/x}`. For an
allowed request Proctor removes every credential the agent sent (Authorization,
Proxy-Authorization, Cookie and the connector's API-key header) and adds the
connector's own. If the credential cannot be obtained, the request is refused
(503) rather than forwarded without it.

OAuth2 client credentials tokens are cached and refreshed `refresh_before_seconds`
before they expire; concurrent requests share one token fetch.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("proctor.credentials")

AGENT_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization", "cookie")


class CredentialUnavailable(Exception):
    """The upstream credential cannot be produced; the message never contains a secret."""


class SecretRef(BaseModel):
    """Where a secret lives: an environment variable or a file (never the value itself)."""

    model_config = ConfigDict(extra="forbid")
    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _one(self) -> "SecretRef":
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret reference is {env: NAME} or {file: PATH} (secrets are never written inline)")
        return self

    def describe(self) -> str:
        return f"environment variable {self.env}" if self.env else f"file {self.file}"

    def read(self) -> str:
        if self.env is not None:
            value = os.environ.get(self.env)
        else:
            try:
                value = Path(self.file).read_text().strip()  # type: ignore[arg-type]
            except OSError:
                value = None
        if not value:
            raise CredentialUnavailable(f"the upstream credential in {self.describe()} is missing or empty")
        return value


class UpstreamAuth(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["bearer", "basic", "api_key", "oauth2_client_credentials"]
    token: SecretRef | None = None  # bearer
    username: SecretRef | None = None  # basic
    password: SecretRef | None = None  # basic
    header: str = "X-API-Key"  # api_key
    value: SecretRef | None = None  # api_key
    token_url: str | None = None  # oauth2
    client_id: SecretRef | None = None
    client_secret: SecretRef | None = None
    scope: str | None = None
    audience: str | None = None
    refresh_before_seconds: int = Field(60, ge=0)
    token_url_ca_file: Path | None = None

    @model_validator(mode="after")
    def _complete(self) -> "UpstreamAuth":
        need = {
            "bearer": ("token",),
            "basic": ("username", "password"),
            "api_key": ("value",),
            "oauth2_client_credentials": ("token_url", "client_id", "client_secret"),
        }[self.type]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"auth type {self.type} needs {', '.join(missing)}")
        if self.token_url is not None and not self.token_url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
            raise ValueError("token_url must be https:// (plain http only to localhost, for tests)")
        return self

    def headers_to_remove(self) -> tuple[str, ...]:
        extra = (self.header.lower(),) if self.type == "api_key" else ()
        return AGENT_CREDENTIAL_HEADERS + extra


class _OAuthToken:
    def __init__(self) -> None:
        self.value: str | None = None
        self.expires_at = 0.0
        self.lock = asyncio.Lock()


class CredentialInjector:
    """Produces the headers to add for a connector's allowed requests."""

    def __init__(self, auths: dict[str, UpstreamAuth]) -> None:
        self.auths = auths
        self._oauth: dict[str, _OAuthToken] = {name: _OAuthToken() for name, a in auths.items() if a.type == "oauth2_client_credentials"}
        self.token_fetches = 0

    def configured(self, connector: str) -> UpstreamAuth | None:
        return self.auths.get(connector)

    async def headers_for(self, connector: str) -> dict[str, str]:
        auth = self.auths[connector]
        if auth.type == "bearer":
            return {"Authorization": f"Bearer {auth.token.read()}"}  # type: ignore[union-attr]
        if auth.type == "basic":
            pair = f"{auth.username.read()}:{auth.password.read()}".encode()  # type: ignore[union-attr]
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        if auth.type == "api_key":
            return {auth.header: auth.value.read()}  # type: ignore[union-attr]
        return {"Authorization": f"Bearer {await self._oauth_token(connector, auth)}"}

    async def _oauth_token(self, connector: str, auth: UpstreamAuth) -> str:
        state = self._oauth[connector]
        if state.value and time.time() < state.expires_at - auth.refresh_before_seconds:
            return state.value
        async with state.lock:  # one fetch for all waiting requests
            if state.value and time.time() < state.expires_at - auth.refresh_before_seconds:
                return state.value
            state.value, state.expires_at = await self._fetch(connector, auth)
            return state.value

    async def _fetch(self, connector: str, auth: UpstreamAuth) -> tuple[str, float]:
        import ssl

        import aiohttp

        form = {"grant_type": "client_credentials"}
        if auth.scope:
            form["scope"] = auth.scope
        if auth.audience:
            form["audience"] = auth.audience
        basic = aiohttp.BasicAuth(auth.client_id.read(), auth.client_secret.read())  # type: ignore[union-attr]
        ssl_ctx: ssl.SSLContext | bool = True
        if auth.token_url_ca_file:
            ssl_ctx = ssl.create_default_context(cafile=str(auth.token_url_ca_file))
        self.token_fetches += 1
        try:
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(auth.token_url, data=form, auth=basic, ssl=ssl_ctx, allow_redirects=False) as r:  # type: ignore[arg-type]
                    if r.status != 200:
                        raise CredentialUnavailable(f"the token endpoint for connector {connector} answered HTTP {r.status}")
                    doc = await r.json(content_type=None)
        except CredentialUnavailable:
            raise
        except Exception as e:  # network, TLS, JSON: say what kind, never what secret
            raise CredentialUnavailable(
                f"the token endpoint for connector {connector} is unreachable ({type(e).__name__})"
            ) from None
        token = doc.get("access_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or not token:
            raise CredentialUnavailable(f"the token endpoint for connector {connector} returned no access_token")
        expires_in = doc.get("expires_in", 300)
        try:
            expires_in = float(expires_in)
        except (TypeError, ValueError):
            expires_in = 300.0
        log.info("fetched an OAuth2 token for connector %s (expires in %ds)", connector, int(expires_in))
        return token, time.time() + expires_in
