"""The store's side of one policy set for the fleet (proxy/policy/fleet.py): the active revision
read in one query, a kept revision activated for every replica (rollback), and replica heartbeats
(the `/v1/policies` fleet view), on SQLite and on PostgreSQL."""

from __future__ import annotations

from proxy.store import PolicyRevision, ReplicaBeat, Store

from test_store import make_store, run  # noqa: F401  (the fixture: SQLite and PostgreSQL)


def beat(rid: str, revision: str, seen: float, following: str | None = None) -> ReplicaBeat:
    return ReplicaBeat(replica_id=rid, hostname=f"host-{rid}", policy_source="store" if following else "directory",
                       revision=revision, following=following, reload_ok=True, started_at=1.0, last_seen=seen)


def test_active_revision_activate_and_heartbeats(make_store) -> None:  # noqa: F811
    async def body(s: Store) -> None:
        assert await s.active_revision() is None
        await s.save_revision(PolicyRevision("r1", 10.0, {"a.cedar": "permit(principal, action, resource);"}))
        await s.save_revision(PolicyRevision("r2", 20.0, {"a.cedar": "forbid(principal, action, resource);"}))
        assert await s.active_revision() == "r2"
        assert await s.activate_revision("r1") is True
        assert await s.active_revision() == "r1"
        assert [r.revision for r in await s.list_revisions() if r.active] == ["r1"]
        assert await s.activate_revision("nope") is False and await s.active_revision() == "r1"
        await s.heartbeat_replica(beat("b", "r1", 100.0, following="r1"))
        await s.heartbeat_replica(beat("a", "r0", 50.0))
        await s.heartbeat_replica(beat("a", "r1", 101.0))  # (an upsert)
        got = await s.list_replicas(seen_since=90.0)
        assert [(r.replica_id, r.revision, r.following, r.last_seen) for r in got] == [
            ("a", "r1", None, 101.0), ("b", "r1", "r1", 100.0)]
        assert [r.replica_id for r in await s.list_replicas(seen_since=100.5)] == ["a"]  # b was forgotten
        assert [r.replica_id for r in await s.list_replicas(seen_since=0.0)] == ["a"]

    run(make_store, body)
