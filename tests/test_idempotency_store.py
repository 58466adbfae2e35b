"""The idempotency/dedupe table of the state store, on SQLite and PostgreSQL
(PROCTOR_TEST_POSTGRES_DSN, as in tests/test_store.py): insert-if-absent is the
arbiter, expired entries are replaced and swept, completion and release only by
the holder. Plus the dedupe manifest option and key parsing (no processes)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from proxy.config import IdempotencyConfig
from proxy.connectors.manifest import ManifestError, load_manifest
from proxy.coordination.idempotency import parse_key
from proxy.store import Store
from proxy.store.idempotency import COMPLETED, IdempotencyEntry
from test_store import make_store, run  # noqa: F401 - the parametrised (sqlite, postgres) fixture

NOW = 1_800_000_000.0


def entry(owner: str, key: str = "k1", fp: str = "fp1", ttl: float = 30, scope: str = "idem:a") -> IdempotencyEntry:
    return IdempotencyEntry(scope=scope, key=key, fingerprint=fp, owner=owner, agent_id="a",
                            created_at=NOW, expires_at=NOW + ttl)


def test_first_reservation_wins_the_rest_see_it(make_store):  # noqa: F811
    async def body(store: Store):
        assert await store.reserve_idempotency(entry("d1"), NOW) is None
        held = await store.reserve_idempotency(entry("d2", fp="other"), NOW + 1)
        assert held is not None and held.owner == "d1" and held.fingerprint == "fp1" and held.state == "in-progress"
        # another scope, another key: independent
        assert await store.reserve_idempotency(entry("d3", scope="idem:b"), NOW) is None
        assert await store.reserve_idempotency(entry("d4", key="k2"), NOW) is None

    run(make_store, body)


def test_concurrent_reservations_one_winner(make_store):  # noqa: F811
    async def body(store: Store):
        others = [make_store() for _ in range(3)]
        for s in others:
            await s.open()
        try:
            stores = [store, *others]
            results = await asyncio.gather(*(
                stores[i % len(stores)].reserve_idempotency(entry(f"d{i}"), NOW) for i in range(24)
            ))
        finally:
            for s in others:
                await s.close()
        assert sum(r is None for r in results) == 1
        owners = {r.owner for r in results if r is not None}
        assert len(owners) == 1

    run(make_store, body)


def test_complete_release_expiry_and_sweep(make_store):  # noqa: F811
    async def body(store: Store):
        assert await store.reserve_idempotency(entry("d1"), NOW) is None
        done = entry("d1", ttl=100)
        done.state, done.status, done.headers, done.body, done.body_stored = COMPLETED, 201, {"location": "/x"}, b"\x00ok", True
        assert not await store.complete_idempotency(entry("d2"))  # not the holder
        assert await store.complete_idempotency(done)
        got = await store.get_idempotency("idem:a", "k1", NOW + 50)
        assert got is not None and got.status == 201 and got.body == b"\x00ok" and got.headers == {"location": "/x"}
        assert got.body_stored
        assert not await store.release_idempotency("idem:a", "k1", "d1")  # completed: not released
        assert await store.get_idempotency("idem:a", "k1", NOW + 100) is None  # expired: gone for readers
        assert await store.reserve_idempotency(entry("d3"), NOW + 100) is None  # and replaced
        assert await store.release_idempotency("idem:a", "k1", "d3")
        assert await store.get_idempotency("idem:a", "k1", NOW + 100) is None
        assert await store.reserve_idempotency(entry("d4", key="k9"), NOW) is None
        assert await store.sweep_idempotency(NOW + 31) == 1
        assert await store.sweep_idempotency(NOW + 31) == 0

    run(make_store, body)


def test_key_syntax():
    assert parse_key("8e03978e-40d5-43e8-bc93-6894a57f9324", 255) == "8e03978e-40d5-43e8-bc93-6894a57f9324"
    assert parse_key('"abc"', 255) == "abc"
    for bad in ("", '""', "a b", "a,b", 'a"b', "x" * 256, "é"):
        assert parse_key(bad, 255) is None
    assert IdempotencyConfig().replay_seconds == 24 * 3600


def _manifest(tmp_path: Path, route: dict) -> Path:
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "hosts": ["m.example"], "routes": [{
        "path": "/t/{tenant}/orders", "action": "m.order.create", "resource": {"type": "Order", "id": "new"},
        "params": {"tenant": {"type": "long"}}, "body": {"sku": {"path": "sku", "type": "string"}}, **route}]}))
    return path


@pytest.mark.parametrize("route, says", [
    ({"method": "POST", "dedupe": {"key": ["nope"], "window_seconds": 60}}, "dedupe on POST /t/{tenant}/orders: key names 'nope'"),
    ({"method": "GET", "dedupe": {"key": ["sku"], "window_seconds": 60}}, "only writes are deduplicated"),
    ({"method": "POST", "dedupe": {"key": ["sku"], "window_seconds": 0}}, "window_seconds"),
    ({"method": "POST", "dedupe": {"key": ["sku"], "window_seconds": 5, "answer": "maybe"}}, "answer"),
])
def test_bad_dedupe_declarations_name_manifest_and_route(tmp_path, route, says):
    path = _manifest(tmp_path, route)
    with pytest.raises(ManifestError) as e:
        load_manifest(path)
    assert str(path) in str(e.value) and says in str(e.value) and "routes.0" in str(e.value)


def test_good_dedupe_declaration(tmp_path):
    m = load_manifest(_manifest(tmp_path, {"method": "POST", "dedupe": {"key": ["tenant", "sku"], "window_seconds": 600}}))
    spec = m.routes[0].dedupe
    assert spec is not None and spec.answer == "conflict" and spec.window_seconds == 600
