"""Calendar windows (proxy/limits/windows.py): exact across DST changes, month and year ends,
skipped days and midnights that do not exist or happen twice; rollover at the exact boundary."""

from __future__ import annotations

import math
from datetime import datetime, timezone

import pytest

from proxy.limits.windows import PERIODS, fixed_window, next_window, window_for

BERLIN, NY = "Europe/Berlin", "America/New_York"


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def hours(w) -> float:  # type: ignore[no-untyped-def]
    return (w.end - w.start) / 3600


def test_berlin_day_across_spring_forward_is_23_hours() -> None:
    # 2026-03-29: 02:00 CET -> 03:00 CEST (01:00Z)
    w = window_for(utc(2026, 3, 29, 12), "day", BERLIN)
    assert w.id == "day:2026-03-29@Europe/Berlin"
    assert (w.start, w.end) == (utc(2026, 3, 28, 23), utc(2026, 3, 29, 22))
    assert hours(w) == 23


def test_berlin_day_across_fall_back_is_25_hours() -> None:
    # 2026-10-25: 03:00 CEST -> 02:00 CET (01:00Z)
    w = window_for(utc(2026, 10, 25, 12), "day", BERLIN)
    assert (w.start, w.end) == (utc(2026, 10, 24, 22), utc(2026, 10, 25, 23))
    assert hours(w) == 25


def test_berlin_hours_around_the_changes() -> None:
    # spring: the wall hour 02 does not exist; 01:00Z is 03:00 CEST
    before = window_for(utc(2026, 3, 29, 0, 59, 59), "hour", BERLIN)
    after = window_for(utc(2026, 3, 29, 1), "hour", BERLIN)
    assert before.id == "hour:2026-03-29T01@Europe/Berlin" and before.end == utc(2026, 3, 29, 1)
    assert after.id == "hour:2026-03-29T03@Europe/Berlin" and after.start == utc(2026, 3, 29, 1)
    # autumn: the wall hour 02 happens twice; its window holds both (from its first instant
    # to the first instant of 03)
    twice = window_for(utc(2026, 10, 25, 0, 30), "hour", BERLIN)
    assert twice.id == "hour:2026-10-25T02@Europe/Berlin"
    assert (twice.start, twice.end) == (utc(2026, 10, 25, 0), utc(2026, 10, 25, 2))
    assert window_for(utc(2026, 10, 25, 1, 30), "hour", BERLIN) == twice  # the second 02:30


def test_new_york_days_around_the_changes() -> None:
    spring = window_for(utc(2026, 3, 8, 15), "day", NY)  # 02:00 EST -> 03:00 EDT
    assert spring.id == "day:2026-03-08@America/New_York"
    assert (spring.start, spring.end) == (utc(2026, 3, 8, 5), utc(2026, 3, 9, 4)) and hours(spring) == 23
    autumn = window_for(utc(2026, 11, 1, 15), "day", NY)  # 02:00 EDT -> 01:00 EST
    assert (autumn.start, autumn.end) == (utc(2026, 11, 1, 4), utc(2026, 11, 2, 5)) and hours(autumn) == 25


def test_iso_weeks_start_monday_across_dst_and_year_end() -> None:
    w = window_for(utc(2026, 3, 29, 12), "week", BERLIN)  # Sunday of the spring change
    assert w.id == "week:2026-W13@Europe/Berlin"
    assert (w.start, w.end) == (utc(2026, 3, 22, 23), utc(2026, 3, 29, 22))  # Mon 00:00 CET .. Mon 00:00 CEST
    assert hours(w) == 7 * 24 - 1
    # 2025-12-31 is a Wednesday of ISO week 2026-W01, which starts Monday 2025-12-29
    y = window_for(utc(2025, 12, 31, 12), "week", NY)
    assert y.id == "week:2026-W01@America/New_York"
    assert (y.start, y.end) == (utc(2025, 12, 29, 5), utc(2026, 1, 5, 5))
    assert datetime.fromtimestamp(y.start, timezone.utc).weekday() == 0


def test_months_and_year_ends() -> None:
    march = window_for(utc(2026, 3, 15), "month", BERLIN)
    assert march.id == "month:2026-03@Europe/Berlin"
    assert (march.start, march.end) == (utc(2026, 2, 28, 23), utc(2026, 3, 31, 22)) and hours(march) == 31 * 24 - 1
    feb = window_for(utc(2028, 2, 29, 12), "month", NY)  # leap year
    assert feb.id == "month:2028-02@America/New_York" and hours(feb) == 29 * 24
    # New Year's Eve in New York: 23:59:59 EST is still December, midnight is January
    dec = window_for(utc(2027, 1, 1, 4, 59, 59), "month", NY)
    jan = window_for(utc(2027, 1, 1, 5), "month", NY)
    assert dec.id == "month:2026-12@America/New_York" and jan.id == "month:2027-01@America/New_York"
    assert dec.end == jan.start == utc(2027, 1, 1, 5)
    year = window_for(utc(2027, 1, 1, 4, 59, 59), "year", NY)
    assert year.id == "year:2026@America/New_York" and year.end == utc(2027, 1, 1, 5)
    # the same instant is already January in Berlin
    assert window_for(utc(2027, 1, 1, 4, 59, 59), "month", BERLIN).id == "month:2027-01@Europe/Berlin"


@pytest.mark.parametrize("period", ["day", "week", "month", "hour"])
@pytest.mark.parametrize("tz", [BERLIN, NY])
def test_rollover_is_exact_at_the_boundary(period: str, tz: str) -> None:
    for t in (utc(2026, 3, 8, 12), utc(2026, 3, 29, 12), utc(2026, 10, 25, 12), utc(2026, 11, 1, 12),
              utc(2026, 12, 31, 23)):
        w = window_for(t, period, tz)
        assert w.contains(t)
        for just_before in (math.nextafter(w.end, -math.inf), w.end - 1e-6, w.end - 0.5):
            assert window_for(just_before, period, tz) == w
        nxt = window_for(w.end, period, tz)
        assert nxt != w and nxt.start == w.end and nxt.id > w.id
        assert next_window(w, period, tz) == nxt


@pytest.mark.parametrize("tz", [BERLIN, NY, "UTC", "Australia/Lord_Howe", "America/Sao_Paulo", "Pacific/Apia"])
@pytest.mark.parametrize("period", ["hour", "day", "week", "month"])
def test_windows_tile_the_time_line(period: str, tz: str) -> None:
    """Walking window to window over two years: contiguous, each id once, every instant inside its own."""
    t, stop = utc(2011, 1, 1), utc(2013, 1, 1) if tz == "Pacific/Apia" else utc(2019, 12, 31)
    if period == "hour":
        stop = t + 400 * 86400
        if tz == "America/Sao_Paulo":
            t, stop = utc(2018, 10, 1), utc(2019, 3, 1)
    seen: set[str] = set()
    w = window_for(t, period, tz)
    while w.start < stop:
        assert w.end > w.start and w.id not in seen
        seen.add(w.id)
        mid = w.start + (w.end - w.start) / 2
        assert window_for(mid, period, tz) == w
        nxt = window_for(w.end, period, tz)
        assert nxt.start == w.end
        w = nxt


def test_midnight_that_does_not_exist_starts_the_day_at_the_jump() -> None:
    # America/Sao_Paulo, 2018-11-04: 00:00 -03 -> 01:00 -02 (03:00Z): the day begins at 01:00
    w = window_for(utc(2018, 11, 4, 12), "day", "America/Sao_Paulo")
    assert w.id == "day:2018-11-04@America/Sao_Paulo"
    assert w.start == utc(2018, 11, 4, 3) and hours(w) == 23
    assert window_for(utc(2018, 11, 4, 2, 59, 59), "day", "America/Sao_Paulo").id == "day:2018-11-03@America/Sao_Paulo"


def test_midnight_that_happens_twice_keeps_the_day_until_the_second() -> None:
    # America/Sao_Paulo, 2019-02-17: 00:00 -02 -> 23:00 -03 on the 16th: 23:xx happens twice
    w = window_for(utc(2019, 2, 17, 2, 30), "day", "America/Sao_Paulo")  # the second 23:30
    assert w.id == "day:2019-02-16@America/Sao_Paulo"
    assert (w.start, w.end) == (utc(2019, 2, 16, 2), utc(2019, 2, 17, 3)) and hours(w) == 25


def test_a_skipped_day_has_no_window() -> None:
    # Pacific/Apia skipped 2011-12-30 entirely (UTC-10 -> UTC+14)
    last = window_for(utc(2011, 12, 30, 9, 59, 59), "day", "Pacific/Apia")
    first = window_for(utc(2011, 12, 30, 10), "day", "Pacific/Apia")
    assert last.id == "day:2011-12-29@Pacific/Apia" and first.id == "day:2011-12-31@Pacific/Apia"
    assert last.end == first.start


def test_every_period_and_fixed_windows() -> None:
    t = utc(2026, 6, 15, 10, 42, 17) + 0.25
    ids = {p: window_for(t, p, "UTC").id for p in PERIODS}
    assert ids == {"minute": "minute:2026-06-15T10:42@UTC", "hour": "hour:2026-06-15T10@UTC",
                   "day": "day:2026-06-15@UTC", "week": "week:2026-W25@UTC", "month": "month:2026-06@UTC",
                   "year": "year:2026@UTC"}
    f = fixed_window(t, 60)
    assert (f.start, f.end) == (utc(2026, 6, 15, 10, 42), utc(2026, 6, 15, 10, 43)) and f.contains(t)
    assert fixed_window(f.end, 60).start == f.end
    assert fixed_window(math.nextafter(f.end, 0), 60) == f


@pytest.mark.parametrize("args", [
    (0.0, "fortnight", "UTC"), (0.0, "day", "Mars/Olympus"), (0.0, "day", "../etc/passwd"), (0.0, "day", ""),
    (float("nan"), "day", "UTC"), (float("inf"), "day", "UTC"), (1e20, "day", "UTC"), (True, "day", "UTC"),
])
def test_bad_arguments_are_value_errors(args: tuple) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        window_for(*args)


@pytest.mark.parametrize("seconds", [0, -5, 1.5, 10**9])
def test_bad_fixed_windows(seconds: object) -> None:
    with pytest.raises(ValueError):
        fixed_window(0.0, seconds)  # type: ignore[arg-type]
