"""The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers-11) and Retry-After.

Both fields are Structured Field Lists (RFC 9651) of Items whose value is the
policy name as an sf-string:

    RateLimit-Policy: "per-agent";q=100;w=60
    RateLimit: "per-agent";r=42;t=1

- `q`: the quota (the limit) per window; `w`: the window in whole seconds
  (rounded up); `qu` (the quota unit) only when it is not the default
  "requests"; `pk`: an optional partition key (sf-binary; never put a secret in
  it); `proctor-burst`: a vendor parameter, sent only when the burst differs
  from the quota.
- `r`: the quota available now (after this request); `t`: the effective window,
  the seconds within which no more than `r` can be used (GCRA: until the next
  unit comes back), rounded up; absent when the full burst is available.
- A throttled response's `Retry-After` (delay-seconds) is the longest wait of
  its refused limits, rounded up, never shorter than their `t` (the draft asks
  that Retry-After not point before the end of the effective window).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable

from .rate import RateDecision

MAX_POLICY_NAME = 64


def sf_string(value: str) -> str:
    """An RFC 9651 sf-string: printable ASCII, with `\\` and `"` escaped (ValueError otherwise)."""
    if not isinstance(value, str) or any(not 0x20 <= ord(c) <= 0x7E for c in value):
        raise ValueError(f"a structured-field string is printable ASCII, not {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _name(name: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_POLICY_NAME:
        raise ValueError(f"a rate-limit policy name is 1 to {MAX_POLICY_NAME} characters")
    return sf_string(name)


def _pk(partition: bytes | None) -> str:
    if partition is None:
        return ""
    if not isinstance(partition, bytes):
        raise ValueError("a partition key is bytes")
    return ";pk=:" + base64.b64encode(partition).decode("ascii") + ":"


def _whole_seconds_up(seconds: float) -> int:
    return max(0, math.ceil(seconds - 1e-9))


def policy_item(name: str, limit: int, period_seconds: float, *, burst: int | None = None,
                unit: str | None = None, partition: bytes | None = None) -> str:
    """One quota policy item: "name";q=LIMIT;w=SECONDS[;qu="unit"][;pk=:...:][;proctor-burst=B]."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError("q is an integer >= 0")
    if not math.isfinite(period_seconds) or period_seconds <= 0:
        raise ValueError("w is a positive number of seconds")
    item = f"{_name(name)};q={limit}"
    if unit is not None and unit != "requests":
        item += f";qu={sf_string(unit)}"
    item += f";w={max(1, _whole_seconds_up(period_seconds))}"
    item += _pk(partition)
    if burst is not None and burst != limit:
        item += f";proctor-burst={int(burst)}"
    return item


def service_item(name: str, remaining: int, effective_window: float | None, *,
                 partition: bytes | None = None) -> str:
    """One service limit item: "name";r=REMAINING[;t=SECONDS][;pk=:...:]."""
    if isinstance(remaining, bool) or not isinstance(remaining, int):
        raise ValueError("r is an integer")
    item = f"{_name(name)};r={max(0, remaining)}"
    if effective_window is not None and math.isfinite(effective_window) and effective_window > 0:
        item += f";t={_whole_seconds_up(effective_window)}"
    return item + _pk(partition)


def ratelimit_policy(policies: Iterable[tuple[str, RateDecision]], *, partition: bytes | None = None) -> str:
    """The RateLimit-Policy field value for (policy name, decision) pairs."""
    items = [policy_item(n, d.limit, d.period_seconds, burst=d.burst, partition=partition) for n, d in policies]
    if not items:
        raise ValueError("RateLimit-Policy needs at least one policy")
    return ", ".join(items)


def ratelimit(limits: Iterable[tuple[str, RateDecision]], *, partition: bytes | None = None) -> str:
    """The RateLimit field value for (policy name, decision) pairs."""
    items = [service_item(n, d.remaining, d.refill_after, partition=partition) for n, d in limits]
    if not items:
        raise ValueError("RateLimit needs at least one service limit")
    return ", ".join(items)


def retry_after(decisions: Iterable[RateDecision]) -> int | None:
    """Retry-After (delay-seconds) for a throttled response: the longest wait of the refused
    decisions (and at least their effective windows), rounded up; None when none was refused or
    one can never pass as asked (cost above the burst: say so instead of naming a time)."""
    waits: list[float] = []
    for d in decisions:
        if d.allowed:
            continue
        if math.isinf(d.retry_after):
            return None
        waits.append(max(d.retry_after, d.refill_after))
    if not waits:
        return None
    return max(1, _whole_seconds_up(max(waits)))


