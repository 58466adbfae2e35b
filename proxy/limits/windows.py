"""Calendar windows for budgets, and fixed windows of seconds (pure; docs/limits.md, "Counters").

`window_for(now, period, tz)` is the calendar window (minute, hour, day, ISO week
starting Monday, month, year) of the wall clock in time zone `tz` that contains
the instant `now` (epoch seconds): `[start, end)`, both epoch seconds.

Exact at every boundary, whatever the time zone does:

- A window starts at the first instant whose wall-clock time (in `tz`) is at or
  after the period's first wall-clock time: the first of two midnights when the
  clock falls back over midnight, the moment the clock jumps when midnight does
  not exist (a spring-forward gap over midnight), and a skipped day (Pacific/Apia
  on 2011-12-30) has an empty window that no instant falls in.
- Windows tile the time line: the end of one is the start of the next, an
  instant at `end - epsilon` is in the old window and one at `end` in the new.
  Every boundary is a whole second (time zone offsets are whole seconds), so
  the window of a fractional `now` is the window of `floor(now)`; no rounding
  of `now` (datetime keeps only microseconds) can move it across a boundary.
- A day across a DST change is 23 or 25 hours long; a month is its calendar
  month in that zone.

Window ids name the period, the wall-clock label and the zone
(`day:2026-03-29@Europe/Berlin`, `week:2026-W13@UTC`, `month:2026-03@...`):
stable across processes and replicas, distinct for different periods and zones,
so a ledger row keyed by (budget, window id) belongs to exactly one window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Literal, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Period = Literal["minute", "hour", "day", "week", "month", "year"]
PERIODS: tuple[str, ...] = get_args(Period)

# A window is searched for at most this many steps from the wall-clock guess (a
# zone change moves an instant at most one window away; the bound only stops a loop).
_MAX_STEPS = 4


@dataclass(frozen=True)
class Window:
    id: str  # "<period>:<label>@<tz>" or "fixed<seconds>s:<start>"
    start: float  # epoch seconds, inclusive
    end: float  # epoch seconds, exclusive

    def contains(self, now: float) -> bool:
        return self.start <= now < self.end

    @property
    def seconds(self) -> float:
        return self.end - self.start


@lru_cache(maxsize=256)
def zone(tz: str) -> ZoneInfo:
    """The time zone named `tz` (an IANA name such as Europe/Berlin, or UTC); ValueError when unknown."""
    if not isinstance(tz, str) or not tz or len(tz) > 64 or tz != tz.strip():
        raise ValueError(f"time zone must be an IANA name such as Europe/Berlin, not {tz!r}")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as e:
        raise ValueError(f"unknown time zone {tz!r} (expected an IANA name such as Europe/Berlin or UTC)") from e


def check_period(period: str) -> Period:
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, not {period!r}")
    return period  # type: ignore[return-value]


def _check_now(now: float) -> int:
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
        raise ValueError(f"time must be finite epoch seconds, not {now!r}")
    return math.floor(now)


def _wall(t: int, tz: ZoneInfo) -> datetime:
    """The naive wall-clock time in `tz` at the whole second `t`."""
    try:
        return datetime.fromtimestamp(t, tz).replace(tzinfo=None)
    except (OverflowError, OSError, ValueError) as e:
        raise ValueError(f"time {t} is out of the supported range") from e


def _floor(w: datetime, period: Period) -> datetime:
    """The first wall-clock time of the period that contains wall time `w`."""
    if period == "minute":
        return w.replace(second=0, microsecond=0)
    if period == "hour":
        return w.replace(minute=0, second=0, microsecond=0)
    day = w.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())  # ISO: weeks start on Monday
    if period == "month":
        return day.replace(day=1)
    return day.replace(month=1, day=1)


def _step(w: datetime, period: Period, n: int) -> datetime:
    """The period start `n` periods after (n < 0: before) the period start `w`."""
    if period == "minute":
        return w + timedelta(minutes=n)
    if period == "hour":
        return w + timedelta(hours=n)
    if period == "day":
        return w + timedelta(days=n)
    if period == "week":
        return w + timedelta(weeks=n)
    if period == "month":
        months = w.year * 12 + (w.month - 1) + n
        return w.replace(year=months // 12, month=months % 12 + 1)
    return w.replace(year=w.year + n)


def _label(w: datetime, period: Period) -> str:
    if period == "minute":
        return w.strftime("%Y-%m-%dT%H:%M")
    if period == "hour":
        return w.strftime("%Y-%m-%dT%H")
    if period == "day":
        return w.strftime("%Y-%m-%d")
    if period == "week":
        year, week, _ = w.isocalendar()
        return f"{year:04d}-W{week:02d}"
    if period == "month":
        return w.strftime("%Y-%m")
    return f"{w.year:04d}"


def _first_instant(w: datetime, tz: ZoneInfo) -> int:
    """The first whole second whose wall-clock time in `tz` is at or after the wall time `w`.

    An existing wall time: its first occurrence (fold=0; the earlier of two when the clock
    falls back). A wall time in a spring-forward gap: the moment the clock jumps, found by
    bisection between the two readings of `w` (before the jump's offset and after it)."""
    first = int(w.replace(tzinfo=tz, fold=0).timestamp())
    if _wall(first, tz) == w:
        return first
    # In a gap: fold=0 reads w with the offset before the jump (an instant after it), fold=1
    # with the offset after it (an instant before it). The jump lies in (lo, hi].
    lo = int(w.replace(tzinfo=tz, fold=1).timestamp())
    hi = first
    if lo > hi:
        lo, hi = hi, lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _wall(mid, tz) >= w:
            hi = mid
        else:
            lo = mid
    return hi


def window_for(now: float, period: str, tz: str = "UTC") -> Window:
    """The calendar window of `period` in time zone `tz` that contains the instant `now`."""
    p = check_period(period)
    zi = zone(tz)
    t = _check_now(now)
    start_wall = _floor(_wall(t, zi), p)
    for _ in range(_MAX_STEPS):
        start = _first_instant(start_wall, zi)
        end_wall = _step(start_wall, p, 1)
        end = _first_instant(end_wall, zi)
        if t < start:  # (a clock fallen back over the boundary: still the window before)
            start_wall = _step(start_wall, p, -1)
        elif t >= end:  # (a repeated hour past the next period's first instant)
            start_wall = end_wall
        else:
            return Window(id=f"{p}:{_label(start_wall, p)}@{tz}", start=float(start), end=float(end))
    raise ValueError(f"no {p} window in {tz} contains {now!r}")  # (unreachable with real zone data)


def next_window(w: Window, period: str, tz: str = "UTC") -> Window:
    """The calendar window after `w` (skipping an empty one)."""
    nxt = window_for(w.end, period, tz)
    return nxt


def fixed_window(now: float, seconds: int) -> Window:
    """The fixed window of `seconds` (aligned to the epoch, so every replica agrees) containing `now`."""
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= 366 * 86400:
        raise ValueError(f"a fixed window is 1 s to 366 days (whole seconds), not {seconds!r}")
    t = _check_now(now)
    start = t - t % seconds
    return Window(id=f"fixed{seconds}s:{start}", start=float(start), end=float(start + seconds))


def utc_iso(t: float) -> str:
    """Epoch seconds as an RFC 3339 UTC timestamp (for messages and the console)."""
    return datetime.fromtimestamp(math.floor(t), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
