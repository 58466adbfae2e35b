"""Unmodified Python agents for the client matrix (tests/test_client_matrix.py).

    python matrix_clients.py CLIENT '[["GET", "https://..."], ["DELETE", "http://..."]]'

Each client is used the way its documentation shows, with nothing but its defaults:
proxy and CA come only from the environment the test sets (docs/agents.md). Prints
one JSON list: per call the status, X-Proctor-Decision-Id, Content-Type and body,
or the error.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


def _result(status: int, headers: Any, body: str) -> dict:
    return {
        "status": status,
        "decision_id": headers.get("x-proctor-decision-id"),
        "content_type": headers.get("content-type"),
        "body": body,
    }


def with_requests(calls: list[list[str]]) -> list[dict]:
    import requests

    out = []
    for method, url in calls:
        r = requests.request(method, url, timeout=30)
        out.append(_result(r.status_code, r.headers, r.text))
    return out


def with_httpx(calls: list[list[str]]) -> list[dict]:
    import httpx

    with httpx.Client(timeout=30) as client:  # trust_env=True is the default
        return [_result((r := client.request(m, u)).status_code, r.headers, r.text) for m, u in calls]


async def _httpx_async(calls: list[list[str]]) -> list[dict]:
    import httpx

    async with httpx.AsyncClient(timeout=30) as client:
        out = []
        for method, url in calls:
            r = await client.request(method, url)
            out.append(_result(r.status_code, r.headers, r.text))
        return out


async def _aiohttp(calls: list[list[str]], trust_env: bool) -> list[dict]:
    import aiohttp

    out = []
    async with aiohttp.ClientSession(trust_env=trust_env, timeout=aiohttp.ClientTimeout(total=30)) as session:
        for method, url in calls:
            try:
                async with session.request(method, url) as r:
                    out.append(_result(r.status, r.headers, await r.text()))
            except aiohttp.ClientError as e:  # e.g. a bypass to an upstream the agent cannot verify
                out.append({"error": f"{type(e).__name__}: {e}"})
    return out


def with_urllib(calls: list[list[str]]) -> list[dict]:
    import urllib.error
    import urllib.request

    out = []
    for method, url in calls:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as r:
                out.append(_result(r.status, r.headers, r.read().decode()))
        except urllib.error.HTTPError as e:  # urllib raises for 4xx/5xx; the answer is on the error
            out.append(_result(e.code, e.headers, e.read().decode()))
    return out


def main() -> None:
    client, calls = sys.argv[1], json.loads(sys.argv[2])
    run = {
        "requests": lambda: with_requests(calls),
        "httpx": lambda: with_httpx(calls),
        "httpx-async": lambda: asyncio.run(_httpx_async(calls)),
        "aiohttp-trust-env": lambda: asyncio.run(_aiohttp(calls, trust_env=True)),
        "aiohttp-default": lambda: asyncio.run(_aiohttp(calls, trust_env=False)),
        "urllib": lambda: with_urllib(calls),
    }[client]
    print(json.dumps(run()))


if __name__ == "__main__":
    main()
