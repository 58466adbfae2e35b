"""JWKS key sources: a file on disk, or an HTTPS URL of the IdP.

Both cache the parsed key set. On an unknown `kid` they reload, at most once per
`min_refetch` seconds, so a stream of tokens with random key ids cannot make us
hammer the IdP. An HTTPS source that cannot be fetched keeps serving the keys it
last fetched; with none at all, verification fails closed (IdentityUnavailable).

Fetches are single-flight: verifications that need keys while a fetch is under
way wait for that fetch and use its result, however long it takes, and one URL
source serves every verifier in the process (`shared_url_source`), so N
concurrent tokens cost one request to the IdP.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import weakref
from pathlib import Path
from typing import Protocol

import jwt
from jwt import PyJWK

from .errors import AuthError, IdentityUnavailable

log = logging.getLogger("proctor.identity")

MAX_JWKS_BYTES = 512 * 1024


def parse_jwks(data: bytes | str) -> dict[str | None, PyJWK]:
    """Parse a JWKS document into {kid: key}, skipping keys not meant for signatures."""
    doc = json.loads(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("JWKS must be an object with a 'keys' array")
    keys: dict[str | None, PyJWK] = {}
    for raw in doc["keys"]:
        if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
            continue
        try:
            key = PyJWK.from_dict(raw)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as e:
            log.warning("skipping unusable JWKS key kid=%r: %s", raw.get("kid"), e)
            continue
        keys[raw.get("kid")] = key
    if not keys:
        raise ValueError("JWKS contains no usable signing keys")
    return keys


class KeySource(Protocol):
    async def get_key(self, kid: str | None) -> PyJWK: ...


def _select(keys: dict[str | None, PyJWK], kid: str | None) -> PyJWK | None:
    if kid is not None:
        return keys.get(kid)
    # A token without `kid` is acceptable only when the choice is unambiguous.
    if len(keys) == 1:
        return next(iter(keys.values()))
    return None


class FileKeySource:
    """Keys from a JWKS file, re-read when the file changes.

    The file is re-read (a few kB, parsed only if its content changed) at most
    once per `min_refetch` seconds on any lookup, so removing a key from the
    file (revocation) takes effect without a restart; an unknown `kid`
    (rotation) also triggers a re-read, at most once per `min_refetch`.
    """

    def __init__(self, path: Path, min_refetch_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.min_refetch = min_refetch_seconds
        self._keys: dict[str | None, PyJWK] = {}
        # The bytes the current keys were parsed from, and the last unusable
        # content seen (compared by content, not mtime: a same-size rewrite
        # within one timestamp tick must still be noticed).
        self._raw: bytes | None = None
        self._bad: bytes | None = None
        self._missing = False
        self._last_check = time.monotonic()
        self._last_miss_check = float("-inf")
        self._load()

    def _load(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            if not self._missing:
                log.error("JWKS file %s does not exist%s", self.path, ", keeping previous keys" if self._keys else "")
            self._missing = True
            return
        except OSError as e:
            log.error("JWKS file %s unreadable, keeping previous keys: %s", self.path, e)
            return
        self._missing = False
        if data == self._raw or data == self._bad:
            return
        try:
            self._keys = parse_jwks(data)
            self._raw, self._bad = data, None
            log.info("loaded JWKS file %s (%d keys)", self.path, len(self._keys))
        except (ValueError, RecursionError) as e:  # includes JSON errors
            self._bad = data
            log.error("JWKS file %s unusable, keeping previous keys: %s", self.path, e)

    async def get_key(self, kid: str | None) -> PyJWK:
        now = time.monotonic()
        checked = False
        if now - self._last_check >= self.min_refetch:
            self._last_check = now
            self._load()
            checked = True
        key = _select(self._keys, kid)
        if key is None and now - self._last_miss_check >= self.min_refetch:
            self._last_miss_check = now
            if not checked:
                self._last_check = now
                self._load()
                key = _select(self._keys, kid)
        if key is None:
            if not self._keys:
                raise IdentityUnavailable("no signing keys available for this issuer")
            raise AuthError("token key id (kid) is not known to this issuer")
        return key


class UrlKeySource:
    """Keys from the IdP's JWKS URL (HTTPS), cached for `cache_seconds`; fetches are single-flight."""

    def __init__(
        self,
        url: str,
        cache_seconds: float = 300,
        min_refetch_seconds: float = 30,
        ca_file: Path | None = None,
        timeout_seconds: float = 5.0,
    ) -> None:
        self.url = url
        self.cache_seconds = cache_seconds
        self.min_refetch = min_refetch_seconds
        self.timeout = timeout_seconds
        self._ssl: ssl.SSLContext | bool = True
        if url.startswith("https://"):
            self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._keys: dict[str | None, PyJWK] = {}
        self._fetched_at = float("-inf")
        self._attempted_at = float("-inf")
        # The fetch under way, shared by everyone who needs keys meanwhile.
        self._inflight: asyncio.Task | None = None
        self.fetches = 0  # attempts made (observability and tests)

    async def _fetch(self) -> None:
        import aiohttp

        self._attempted_at = time.monotonic()
        self.fetches += 1
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.get(self.url, ssl=self._ssl, allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise ValueError(f"HTTP {resp.status}")
                    if (resp.content_length or 0) > MAX_JWKS_BYTES:
                        raise ValueError("JWKS document too large")
                    # Read to the end, bounded: `content.read(n)` returns whatever
                    # is buffered (up to n), which truncates multi-chunk documents.
                    buf = bytearray()
                    async for chunk in resp.content.iter_chunked(64 * 1024):
                        buf += chunk
                        if len(buf) > MAX_JWKS_BYTES:
                            raise ValueError("JWKS document too large")
                    data = bytes(buf)
            self._keys = parse_jwks(data)
            self._fetched_at = time.monotonic()
            log.info("fetched JWKS from %s (%d keys)", self.url, len(self._keys))
        except Exception as e:  # network, TLS, JSON: keep what we had
            log.warning("JWKS fetch from %s failed: %s", self.url, e)

    async def _refresh(self, force: bool) -> None:
        loop = asyncio.get_running_loop()
        fetch = self._inflight
        if fetch is None or fetch.done() or fetch.get_loop() is not loop:
            now = time.monotonic()
            stale = now - self._fetched_at >= self.cache_seconds
            may_retry = now - self._attempted_at >= self.min_refetch
            if not ((stale or force) and may_retry):
                return
            # One task per fetch: a waiter that gives up (its client hung up) is
            # cancelled alone, the fetch goes on for the others (shield).
            fetch = self._inflight = loop.create_task(self._fetch(), name=f"JWKS fetch {self.url}")
        await asyncio.shield(fetch)

    async def get_key(self, kid: str | None) -> PyJWK:
        if time.monotonic() - self._fetched_at >= self.cache_seconds:
            await self._refresh(force=False)
        key = _select(self._keys, kid)
        if key is None and self._keys:
            await self._refresh(force=True)
            key = _select(self._keys, kid)
        if key is None:
            if not self._keys:
                raise IdentityUnavailable("identity provider keys are unavailable (JWKS unreachable)")
            raise AuthError("token key id (kid) is not known to this issuer")
        return key


_SHARED_URL_SOURCES: "weakref.WeakValueDictionary[tuple, UrlKeySource]" = weakref.WeakValueDictionary()


def shared_url_source(
    url: str,
    cache_seconds: float = 300,
    min_refetch_seconds: float = 30,
    ca_file: Path | None = None,
) -> UrlKeySource:
    """The process's one source for this JWKS URL (and trust), so that every verifier
    (agents, approvers, operators) shares one cache and one fetch in flight."""
    key = (url, cache_seconds, min_refetch_seconds, str(ca_file) if ca_file else None)
    source = _SHARED_URL_SOURCES.get(key)
    if source is None:
        source = UrlKeySource(url, cache_seconds, min_refetch_seconds, ca_file)
        _SHARED_URL_SOURCES[key] = source
    return source
