"""Workflow instances in the store (store/workflows.py + both backends): creation, objects
naming instances, step events, completion, and atomicity when agents on several
connections (replicas) record steps of one instance at once.

PostgreSQL runs when PROCTOR_TEST_POSTGRES_DSN is set (as tests/test_store.py does).
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from proxy.store import Store
from proxy.store.workflows import StepEvent, new_instance_id
from test_store import MakeStore, make_store, run  # noqa: F401 - the fixture is used by name

WF = "p2p"
REQUIRED = ["requisition", "quote", "order"]


def ev(instance: str, step: str, outcome: str = "completed", t: float = 1000.0, **kw: Any) -> StepEvent:
    return StepEvent(instance_id=instance, workflow=WF, step=step, action=f"erp.{step}.create", agent="bot",
                     decision_id=f"d-{step}-{t}", outcome=outcome, status=201 if outcome == "completed" else 422,
                     time=t, duration_ms=12.5, **kw)


def test_instances_objects_events_and_completion(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        i = new_instance_id()
        # a step on an instance that does not exist, without create: nothing
        assert await s.record_workflow_event(ev(i, "quote"), required=REQUIRED, links=[], create=False) is None
        assert await s.workflow_instance(i) is None
        inst = await s.record_workflow_event(ev(i, "requisition", cost=Decimal("0.10"),
                                                objects=(("Requisition", "R1"),)),
                                             required=REQUIRED, links=[("Requisition", "R1")], create=True)
        assert inst is not None and (inst.state, inst.completed, inst.started_at) == ("running", ["requisition"], 1000.0)
        found = await s.workflow_instance_for(WF, [("Quote", "nope"), ("Requisition", "R1")])
        assert found is not None and found.id == i and found.cost == Decimal("0.10")
        assert await s.workflow_instance_for("other", [("Requisition", "R1")]) is None
        # a failure, then the step done; a refusal counted apart
        await s.record_workflow_event(ev(i, "quote", "failed", 1010.0), required=REQUIRED, links=[], create=False)
        await s.record_workflow_event(ev(i, "order", "refused", 1011.0), required=REQUIRED, links=[], create=False)
        inst = await s.record_workflow_event(ev(i, "quote", t=1020.0), required=REQUIRED,
                                             links=[("Quote", "Q1")], create=False)
        assert inst is not None and inst.completed == ["requisition", "quote"]
        q = inst.step_tally("quote")
        assert (q.attempts, q.failures, q.completions) == (2, 1, 1)
        assert inst.step_tally("order").refusals == 1 and inst.last_step == "quote"
        # an object already naming this instance stays; one naming another instance stays there
        other = new_instance_id()
        await s.record_workflow_event(ev(other, "requisition", t=1030.0), required=REQUIRED,
                                      links=[("Requisition", "R2")], create=True)
        await s.record_workflow_event(ev(i, "order", t=1040.0), required=REQUIRED,
                                      links=[("Order", "O1"), ("Requisition", "R2")], create=False)
        assert (await s.workflow_instance_for(WF, [("Requisition", "R2")])).id == other  # type: ignore[union-attr]
        done = await s.workflow_instance(i)
        assert done is not None and done.state == "completed" and done.completed_at == 1040.0
        events = await s.workflow_events(instance_id=i)
        assert [(e.step, e.outcome) for e in events] == [
            ("requisition", "completed"), ("quote", "failed"), ("order", "refused"), ("quote", "completed"),
            ("order", "completed")]
        assert events[0].objects == (("Requisition", "R1"),) and events[0].cost == Decimal("0.10")
        assert [e.seq for e in events] == sorted(e.seq for e in events)  # type: ignore[type-var]
        assert len(await s.workflow_events(instance_id=i, after_seq=events[2].seq or 0)) == 2
        objs = await s.workflow_objects(instance_id=i)
        assert [(o.object_type, o.object_id, o.step) for o in objs] == [
            ("Requisition", "R1", "requisition"), ("Quote", "Q1", "quote"), ("Order", "O1", "order")]
        listed = await s.list_workflow_instances(workflow=WF)
        assert [x.id for x in listed] == [i, other]  # most recently moved first
        assert [x.id for x in await s.list_workflow_instances(state="completed")] == [i]
        # attrs with optimistic versioning (exceptions keep their state there)
        assert await s.update_workflow_attrs(i, {"escalated": True}, expect_version=done.version)
        assert not await s.update_workflow_attrs(i, {"escalated": False}, expect_version=done.version)
        assert (await s.workflow_instance(i)).attrs == {"escalated": True}  # type: ignore[union-attr]

    run(make_store, body)


def test_agents_recording_steps_of_one_instance_at_once_lose_nothing(make_store: MakeStore) -> None:
    """Many connections (stores: replicas) record steps of one instance concurrently: every
    event is counted, every step completed, exactly one completion time."""
    steps = [f"s{n}" for n in range(8)]

    async def main() -> None:
        stores = [make_store() for _ in range(4)]
        for s in stores:
            await s.open()
        try:
            i = new_instance_id()
            await stores[0].record_workflow_event(ev(i, "start"), required=steps, links=[], create=True)
            jobs = [stores[n % 4].record_workflow_event(ev(i, steps[n % 8], t=1000.0 + n), required=steps,
                                                        links=[("Thing", f"T{n}")], create=False)
                    for n in range(32)]
            await asyncio.gather(*jobs)
            inst = await stores[1].workflow_instance(i)
            assert inst is not None and sorted(inst.completed) == sorted(["start", *steps])
            assert sum(inst.step_tally(st).completions for st in steps) == 32
            assert inst.state == "completed" and inst.version == 33
            assert len(await stores[2].workflow_events(instance_id=i)) == 33
            assert len(await stores[3].workflow_objects(instance_id=i)) == 32
        finally:
            for s in stores:
                await s.close()

    asyncio.run(main())


def test_sqlite_transactions_run_in_one_thread_hop_or_fall_back(tmp_path, monkeypatch) -> None:
    """SQLiteStore._transaction runs a whole write transaction in aiosqlite's worker thread
    through its private `_execute`/`_connection`; an aiosqlite without them must not break
    anything: the fallback gives the same result (only slower)."""
    import aiosqlite

    from proxy.store import open_store

    assert hasattr(aiosqlite.Connection, "_execute"), "aiosqlite changed: SQLiteStore._transaction falls back"
    assert "_connection" in aiosqlite.Connection.__init__.__code__.co_names

    async def scenario(s: Store) -> tuple[list[str], int]:
        i = new_instance_id()
        await s.record_workflow_event(ev(i, "requisition"), required=REQUIRED, links=[("Requisition", "R1")],
                                      create=True)
        inst = await s.record_workflow_event(ev(i, "quote", t=1001.0), required=REQUIRED,
                                             links=[("Quote", "Q1"), ("Requisition", "R1")], create=False)
        assert inst is not None
        # a failing transaction rolls back whole: nothing of it stays
        try:
            await s.record_workflow_event(ev(i, "order", "bogus"), required=REQUIRED, links=[], create=False)
        except ValueError:
            pass
        return inst.completed, len(await s.workflow_objects(instance_id=i))

    async def run_with(path) -> tuple[list[str], int]:
        s = open_store(f"sqlite://{path}")
        await s.open()
        try:
            return await scenario(s)
        finally:
            await s.close()

    fast = asyncio.run(run_with(tmp_path / "a.db"))
    import proxy.store.sqlite

    monkeypatch.setattr(proxy.store.sqlite, "ONE_HOP_TRANSACTIONS", False)
    slow = asyncio.run(run_with(tmp_path / "b.db"))
    assert fast == slow == (["requisition", "quote"], 2)
