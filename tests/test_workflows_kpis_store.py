"""Workflow KPIs read from the store (kpis.read_kpis, Store.count_workflow_instances) on SQLite and
PostgreSQL (PROCTOR_TEST_POSTGRES_DSN, as tests/test_store.py): the scripted timeline of
tests/test_workflows_kpis_unit.py recorded as the request path records it, then read back page by
page gives exactly the document computed by hand; the limits say when they cut.
"""

from __future__ import annotations

import asyncio

from proxy.store import Store
from proxy.workflows.kpis import make_window, read_kpis
from test_store import MakeStore, make_store, run  # noqa: F401 - the fixture is used by name
from test_workflows_kpis_unit import EVENTS, HOUR, NOW, ORDERS, QUIET, T0, kpis

REQUIRED = ORDERS.required_steps


async def record_timeline(s: Store) -> None:
    for e in sorted(EVENTS, key=lambda e: e.time):
        got = await s.record_workflow_event(e, required=REQUIRED, links=[], create=e.outcome != "refused")
        assert got is not None
    b = await s.workflow_instance("B")
    assert b is not None
    assert await s.update_workflow_attrs("B", {"items": [{"id": "wfe_1", "step": "order", "group": "ops", "state": "resolved"}]},
                                         expect_version=b.version)


WINDOW = make_window(NOW, T0, T0 + 4 * HOUR, HOUR)


def test_read_from_the_store_page_by_page_is_the_document_by_hand(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        await record_timeline(s)
        expected = kpis()
        for page in (1, 3, 2000):  # every page size gives the same numbers
            assert await read_kpis(s, [ORDERS], WINDOW, NOW, page=page) == expected
        # several workflows at once (one event stream for all)
        both = await read_kpis(s, [ORDERS, QUIET], WINDOW, NOW, page=4)
        assert both == kpis(specs=(ORDERS, QUIET))
        # a past window: work in progress at its end
        past = make_window(NOW, T0, T0 + 1000, HOUR)
        assert await read_kpis(s, [ORDERS], past, NOW, page=5) == kpis(until=T0 + 1000)

    run(make_store, body)


def test_limits_are_said(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        await record_timeline(s)
        cut = await read_kpis(s, [ORDERS], WINDOW, NOW, page=3, max_events=6)
        assert cut["truncated"] is True
        # exactly as many events as there are: not cut
        scanned = len([e for e in EVENTS if e.time >= T0 - 7200])  # from C's start (the earliest mover)
        whole = await read_kpis(s, [ORDERS], WINDOW, NOW, page=scanned, max_events=scanned)
        assert whole["truncated"] is False and whole == kpis()
        few = await read_kpis(s, [ORDERS], WINDOW, NOW, max_instances=2)
        assert few["truncated"] is True and few["workflows"][0]["instances"]["completed"] < 3

    run(make_store, body)


def test_instances_counted_by_workflow_and_state(make_store: MakeStore) -> None:
    async def body(s: Store) -> None:
        assert await s.count_workflow_instances() == {}
        await record_timeline(s)
        # G, C, A, B completed; F, D, E running
        assert await s.count_workflow_instances() == {("orders", "completed"): 4, ("orders", "running"): 3}

    run(make_store, body)


def test_reading_kpis_while_steps_are_recorded(make_store: MakeStore) -> None:
    """Paging by sequence while agents record steps: every read is a consistent-enough view (no
    error, counts only grow), and the last one sees everything."""

    async def body(s: Store) -> None:
        from test_workflows_kpis_unit import ev

        async def writer() -> None:
            for n in range(40):
                await s.record_workflow_event(ev(f"W{n}", 100 + n, "request"), required=REQUIRED, links=[],
                                              create=True)

        async def reader() -> list[int]:
            seen = []
            for _ in range(10):
                doc = await read_kpis(s, [ORDERS], WINDOW, NOW, page=7)
                seen.append(doc["workflows"][0]["instances"]["started"])
                await asyncio.sleep(0)
            return seen

        _, seen = await asyncio.gather(writer(), reader())
        assert seen == sorted(seen)
        final = await read_kpis(s, [ORDERS], WINDOW, NOW, page=7)
        assert final["workflows"][0]["instances"]["started"] == 40
        assert {x["name"]: x["completions"] for x in final["workflows"][0]["steps"]}["request"] == 40

    run(make_store, body)
