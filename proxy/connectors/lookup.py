"""The HTTP client for resource lookups (manifest `lookup`): GET the resource on its
upstream with the connector's own credential, verified TLS, bounded size and time."""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp
import certifi

from ..config import UpstreamConfig
from .credentials import CredentialInjector

MAX_LOOKUP_BYTES = 1024 * 1024


class LookupClient:
    def __init__(self, upstream: UpstreamConfig, injector: CredentialInjector | None) -> None:
        self.injector = injector
        if upstream.insecure_skip_verify:
            self._ssl: ssl.SSLContext | bool = False
        else:
            self._ssl = ssl.create_default_context(cafile=str(upstream.ca_file) if upstream.ca_file else certifi.where())
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=100),
                # never inherit HTTP(S)_PROXY: the lookup goes straight to the upstream
                trust_env=False,
                auto_decompress=True,
            )
        return self._session

    async def fetch_json(self, connector: str, url: str, timeout: float) -> tuple[int, Any]:
        headers = {"Accept": "application/json", "User-Agent": "proctor-lookup"}
        if self.injector is not None and self.injector.configured(connector) is not None:
            headers.update(await self.injector.headers_for(connector))
        async with self._client().get(
            url, headers=headers, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            if resp.status == 404 or not 200 <= resp.status < 300:
                return resp.status, None
            raw = await resp.content.read(MAX_LOOKUP_BYTES + 1)
            if len(raw) > MAX_LOOKUP_BYTES:
                raise ValueError(f"the answer is larger than {MAX_LOOKUP_BYTES} bytes")
            try:
                return resp.status, json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise ValueError("the answer is not JSON") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
