"""The duplicate-suppression stages with hand-made exchanges over a real SQLite store:
what a refusal after the reservation, an upstream error and a 2xx leave behind,
and that a request the approval stage handled is left alone. No processes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from proxy.config import IdempotencyConfig
from proxy.coordination.idempotency import IdempotencyCheck, IdempotencyReserve
from proxy.core.exchange import Exchange, ResponseSummary
from proxy.core.model import AgentIdentity, AgentRequest, Refusal
from proxy.store.sqlite import SQLiteStore

CONFIG = IdempotencyConfig(max_body_bytes=8)


def exchange(key: str = "k-1", body: bytes = b'{"a":1}', agent: str = "bot") -> Exchange:
    req = AgentRequest(method="POST", scheme="http", host="erp.internal", port=80, path="/orders", query="",
                       headers={"idempotency-key": key, "content-type": "application/json"}, body=body,
                       client_ip="127.0.0.1", mode="forward")
    ex = Exchange(req)
    ex.identity = AgentIdentity(agent, "iss", {}, None)
    return ex


def fingerprint(ex: Exchange) -> str:
    assert ex.request is not None
    return ex.request.body.hex()


async def passage(store: SQLiteStore, ex: Exchange, then) -> Exchange:
    """check -> reserve -> `then(ex)` (the engine's part) -> the reserve stage's on_response."""
    check, reserve = IdempotencyCheck(store, CONFIG, fingerprint), IdempotencyReserve(store, CONFIG)
    await check.on_request(ex)
    if ex.refusal is None and ex.local_reply is None:
        await reserve.on_request(ex)
    if ex.refusal is None and ex.local_reply is None:
        ex.decided = True
        then(ex)
    settled = reserve.on_response(ex)  # (a plain method: it returns an awaitable only when it has work)
    if settled is not None:
        await settled
    return ex


def with_store(tmp_path: Path, body) -> None:
    async def main() -> None:
        store = SQLiteStore(tmp_path / "s.db")
        await store.open()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


def answered(status: int, body: bytes | None = b"{}"):
    def then(ex: Exchange) -> None:
        ex.response = ResponseSummary(status, upstream_status=status, headers={"location": "/o/1", "set-cookie": "s=1"},
                                      body=body)
    return then


def test_refused_after_the_reservation_releases_the_key(tmp_path):
    async def body(store: SQLiteStore) -> None:
        ex = await passage(store, exchange(), lambda ex: ex.refuse(Refusal(403, "late", "a later stage refused")))
        assert ex.refusal is not None
        assert await store.get_idempotency("idem:bot", "k-1", time.time()) is None

    with_store(tmp_path, body)


def test_upstream_error_and_5xx_release_a_2xx_is_kept(tmp_path):
    async def body(store: SQLiteStore) -> None:
        await passage(store, exchange(), lambda ex: setattr(ex, "response", ResponseSummary(502, error="refused")))
        assert await store.get_idempotency("idem:bot", "k-1", time.time()) is None
        await passage(store, exchange(), answered(503))
        assert await store.get_idempotency("idem:bot", "k-1", time.time()) is None
        await passage(store, exchange(), answered(201, b'{"id":1}'))
        kept = await store.get_idempotency("idem:bot", "k-1", time.time())
        assert kept is not None and kept.status == 201 and kept.body == b'{"id":1}' and kept.body_stored
        assert kept.headers == {"location": "/o/1"}  # never the cookie
        replay = await passage(store, exchange(), answered(500))
        assert replay.local_reply is not None and replay.local_reply.status == 201
        assert replay.local_reply.headers["Idempotent-Replayed"] == "true"

    with_store(tmp_path, body)


def test_a_body_over_the_bound_is_not_kept(tmp_path):
    async def body(store: SQLiteStore) -> None:
        await passage(store, exchange(), answered(200, b"123456789"))  # 9 bytes > 8
        kept = await store.get_idempotency("idem:bot", "k-1", time.time())
        assert kept is not None and not kept.body_stored and kept.body is None
        again = await passage(store, exchange(), answered(200))
        assert again.refusal is not None and again.refusal.status == 409
        assert again.refusal.kind == "idempotency-not-replayable"
        assert again.refusal.headers["Location"] == "/o/1"

    with_store(tmp_path, body)


def test_a_request_the_approval_stage_handled_is_left_alone(tmp_path):
    async def body(store: SQLiteStore) -> None:
        ex = exchange()
        ex.approval_id = "apr_1"
        await passage(store, ex, answered(201))
        assert await store.get_idempotency("idem:bot", "k-1", time.time()) is None

    with_store(tmp_path, body)


def test_the_reservation_race_is_answered_like_a_retry(tmp_path):
    async def body(store: SQLiteStore) -> None:
        check, reserve = IdempotencyCheck(store, CONFIG, fingerprint), IdempotencyReserve(store, CONFIG)
        first, second = exchange(), exchange()
        await check.on_request(first)
        await check.on_request(second)  # both found the key free
        await reserve.on_request(first)
        await reserve.on_request(second)  # the store's insert-if-absent decides
        assert first.refusal is None
        assert second.refusal is not None and second.refusal.kind == "idempotency-in-progress"
        other = exchange(body=b'{"a":2}')
        await check.on_request(other)
        assert other.refusal is not None and other.refusal.status == 422

    with_store(tmp_path, body)
