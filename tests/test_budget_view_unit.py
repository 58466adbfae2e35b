"""Unit tests of what operators see of budgets (proxy/limits/budget_view.py, the record reading of
proxy/control/budgets_api.py): windows by name and id, the projection, the burn-down series from
decision records, and the ledger listing narrowed by key values (memory ledger, injected clock)."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal as D
from pathlib import Path

import pytest

from proxy.control import budgets_api
from proxy.limits.budget_spec import BudgetSpec
from proxy.limits.budget_table import Budget, budget_key
from proxy.limits.budget_view import bookings, burn_down, ledgers, project, record_time, used_fraction, window_named
from proxy.limits.memory import memory_counters
from proxy.limits.stage import digest
from proxy.limits.windows import Window, window_for
from proxy.record.model import iso
from proxy.store.counters import BudgetUsage

NOW = 1796609367.5  # 2026-12-06T21:29:27.5Z


def budget(**kw) -> Budget:
    spec = {"name": "po", "limit": "100", "period": "month", "timezone": "Europe/Berlin", **kw}
    return Budget.of(BudgetSpec.model_validate(spec), "budgets[0] (po)")


# ---- windows ------------------------------------------------------------------------------------
@pytest.mark.parametrize("period,tz", [("minute", "UTC"), ("hour", "America/New_York"), ("day", "Europe/Berlin"),
                                       ("week", "UTC"), ("month", "Europe/Berlin"), ("year", "Asia/Kolkata")])
def test_windows_by_name_and_by_id(period: str, tz: str) -> None:
    b = budget(period=period, timezone=tz)
    current = window_named(b, "current", NOW)
    assert current == window_for(NOW, period, tz) == window_named(b, "", NOW)
    previous = window_named(b, "previous", NOW)
    assert previous is not None and previous.end == current.start  # type: ignore[union-attr]
    for w in (current, previous, window_for(NOW - 400 * 86400, period, tz)):
        assert window_named(b, w.id, NOW) == w  # type: ignore[union-attr]
    other_tz = "UTC" if tz != "UTC" else "Europe/Berlin"
    for bad in [current.id.replace(period, "day" if period != "day" else "hour", 1),  # type: ignore[union-attr]
                window_for(NOW, period, other_tz).id, "garbage", f"{period}:@{tz}", f"{period}:9999-99@{tz}",
                f"{period}:2026-12-06T99@{tz}", current.id + "x"]:  # type: ignore[union-attr]
        assert window_named(b, bad, NOW) is None, bad


def test_a_day_across_a_dst_change_by_id() -> None:
    b = budget(period="day", timezone="Europe/Berlin")
    w = window_named(b, "day:2026-03-29@Europe/Berlin", NOW)
    assert w is not None and w.seconds == 23 * 3600
    assert window_named(b, "day:2026-10-25@Europe/Berlin", NOW).seconds == 25 * 3600  # type: ignore[union-attr]


# ---- projection ---------------------------------------------------------------------------------
def test_the_projection_follows_the_rate_so_far() -> None:
    w = Window("day:x@UTC", 0.0, 86400.0)
    p = project(D("100"), BudgetUsage(D("25"), D("5")), w, 21600.0)  # 25 spent in 6 h, 5 reserved
    assert p is not None and p.rate_per_hour == D("4.1667") and not p.exhausted
    assert p.exhaustion_at == pytest.approx(21600 + 70 / (25 / 21600))  # 30 committed, 70 left at 25 per 6 h
    assert p.at_window_end == D("105.00")  # 30 + 25/6 h x 18 h
    slow = project(D("100"), BudgetUsage(D("6"), D(0)), w, 21600.0)
    assert slow is not None and slow.exhaustion_at is None and slow.at_window_end == D("24.00")  # not in this window
    idle = project(D("100"), BudgetUsage(D(0), D("3")), w, 21600.0)
    assert idle is not None and idle.rate_per_hour == 0 and idle.exhaustion_at is None and idle.at_window_end == D(3)
    over = project(D("100"), BudgetUsage(D("90"), D("10")), w, 21600.0)
    assert over is not None and over.exhausted and over.exhaustion_at is None
    assert project(D("100"), BudgetUsage(D("1"), D(0)), w, 86400.0) is None  # a window that is over
    cents = project(D("10.005"), BudgetUsage(D("0.001"), D(0)), w, 3600.0)
    assert cents is not None and cents.rate_per_hour == D("0.00100") and cents.at_window_end == D("0.024")
    assert used_fraction(D("3"), BudgetUsage(D("1"), D(0))) == D("0.3333")
    assert used_fraction(D("1"), BudgetUsage(D("1.5"), D("0.25"))) == D("1.7500")


# ---- burn-down ----------------------------------------------------------------------------------
def _record(t: float, *checks: dict, latency_ms: float = 250.0) -> dict:
    first, *others = checks
    part = dict(first)
    if others:
        part["others"] = list(others)
    return {"decision_id": f"d{t}", "time": iso(t), "latency_ms": latency_ms, "budget": part}


def _check(key: str, actual: str | None, window: str = "w1", name: str = "po", result: str = "settled") -> dict:
    c = {"name": name, "key": key, "outcome": "reserved", "window": window, "estimate": "1", "result": result}
    if actual is not None:
        c["actual"] = actual
    return c


def test_bookings_from_a_record() -> None:
    rec = _record(100.0, _check("k1", "2.5"), _check("k2", "1", name="other"), _check("k3", "4"),
                  _check("k4", "9", window="w0"), _check("k5", "7", result="released"), _check("k6", None),
                  _check("k7", "0"), _check("k8", "NaN"), _check("k9", "1e999999999"))
    assert bookings(rec, "po", "w1") == [("k1", D("2.5")), ("k3", D("4"))]
    assert bookings({"budget": "nonsense"}, "po", "w1") == [] and bookings({}, "po", "w1") == []
    assert record_time(rec) == pytest.approx(100.25)  # booked when the answer came
    assert record_time({"time": "not a time"}) is None and record_time({}) is None


def test_burn_down_series() -> None:
    w = Window("w1", 1000.0, 2000.0)
    assert burn_down([], w, 1500.0) == [(1000.0, D(0)), (1500.0, D(0))]
    series = burn_down([(1200.0, D("2")), (1100.0, D("1.5")), (990.0, D("1")), (2500.0, D("1"))], w, 3000.0)
    # clamped into the window, in time order, cumulative, to the window's end (it is over)
    assert series == [(1000.0, D(0)), (1000.0, D(1)), (1100.0, D("2.5")), (1200.0, D("4.5")), (2000.0, D("5.5"))]
    many = burn_down([(1000.0 + i, D(1)) for i in range(1000)], w, 2000.0, max_points=10)
    assert len(many) <= 12 and many[0] == (1000.0, D(0)) and many[-1][1] == D(1000)
    assert [v for _, v in many] == sorted(v for _, v in many)


def test_records_are_read_back_from_the_end_to_the_window(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = budget(reservation_ttl_seconds=60)
    w = Window("w1", 10_000.0, 20_000.0)
    lines = [_record(9_000.0, _check("k1", "100", window="w0")),  # before the window (and its margin): the scan stops
             _record(9_990.0, _check("k1", "3")),  # decided before the start by its own clock, booked in w1
             {"type": "approval", "time": iso(10_500.0), "budget": {"name": "po"}},  # an event line
             _record(11_000.0, _check("k1", "1.5"), _check("k2", "2")),
             _record(12_000.0, _check("k3", "5")),  # not a listed ledger
             _record(13_000.0, _check("k1", "1", window="w2"))]
    path = tmp_path / "decisions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"time":"' + iso(14_000.0) + '","budget":{')
    found, complete, since = budgets_api.read_bookings(path, b, w, {"k1", "k2"})
    assert complete and since == w.start
    assert found == {"k1": [(pytest.approx(11_000.25), D("1.5")), (pytest.approx(9_990.25), D("3"))],
                     "k2": [(pytest.approx(11_000.25), D("2"))]}
    # a scan that runs out of bytes first says how far back it got (it reads 64 KiB blocks)
    filler = [{"decision_id": f"f{i}", "time": iso(11_500.0 + i / 10), "decision": "allow"} for i in range(4000)]
    path.write_text("".join(json.dumps(r) + "\n" for r in [*lines[:4], *filler, *lines[4:]]))
    monkeypatch.setattr(budgets_api, "RECORD_SCAN_BYTES", 64 * 1024)
    found, complete, since = budgets_api.read_bookings(path, b, w, {"k1", "k2"})
    assert not complete and since is not None and 11_500.0 < since < 11_900.0 and found == {}
    assert budgets_api.read_bookings(tmp_path / "missing.jsonl", b, w, {"k1"}) == ({}, False, None)


# ---- listing, narrowed --------------------------------------------------------------------------
def test_ledgers_narrowed_by_key_values() -> None:
    b = budget(key=["agent", "field:customer", "group"])
    w = window_for(NOW, b.period, b.timezone)
    c = memory_counters()
    k = lambda a, g, cust="c": budget_key("po", b.key, (a, cust, g))  # noqa: E731

    async def main() -> None:
        for agent, group, amount in [("a", "ops", "5"), ("a", "dev", "1"), ("b", "ops", "7"), ("b", None, "2")]:
            await c.charge(k(agent, group), w.id, D(amount), NOW)
        await c.charge(k("a", "ops", "x" * 600), w.id, D("3"), NOW)  # shortened: its group is cut
        views, more = await ledgers(c, b, w, {}, 100, NOW)
        assert not more and [(v.shown.get("agent"), v.shown.get("group"), v.usage.spent) for v in views] == [
            ("b", "ops", D(7)), ("a", "ops", D(5)), ("a", None, D(3)), ("b", None, D(2)), ("a", "dev", D(1))]
        assert views[0].shown["field:customer"] == "sha256:" + digest("c", 12) and views[0].digest == digest(k("b", "ops"))
        assert views[2].shortened and "group" not in views[2].shown
        only_a = await ledgers(c, b, w, {"agent": "a"}, 100, NOW)
        assert [v.usage.spent for v in only_a[0]] == [D(5), D(3), D(1)]
        ops = await ledgers(c, b, w, {"group": "ops"}, 100, NOW)  # not a leading dimension: filtered after
        assert [v.usage.spent for v in ops[0]] == [D(7), D(5)]  # (the shortened key cannot be shown to match)
        assert [v.usage.spent for v in (await ledgers(c, b, w, {"agent": "a", "group": "dev"}, 100, NOW))[0]] == [D(1)]
        assert (await ledgers(c, b, w, {"workflow": "wfi_1"}, 100, NOW))[0] != []  # not keyed on it: whole
        assert (await ledgers(c, b, w, {"agent": "nobody"}, 100, NOW)) == ([], False)
        cut, more = await ledgers(c, b, w, {}, 2, NOW)
        assert more and len(cut) == 2
        shared = budget(name="po", key=[])
        await c.charge(budget_key("po", (), ()), w.id, D("9"), NOW)
        one, _ = await ledgers(c, shared, w, {"agent": "a"}, 100, NOW)
        assert [(v.shown, v.usage.spent) for v in one] == [({}, D(9))]

    asyncio.run(main())
