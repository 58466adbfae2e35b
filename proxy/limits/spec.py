"""Rate-limit declarations: the `rate_limits:` section of proctor.yaml, a route's
`rate_limit:` in a connector manifest, and the `counters:` backend (docs/limits.md).

    rate_limits:
      - name: per-agent-writes          # unique; the RateLimit header and metric label
        match: {connectors: [ticketing], methods: [POST, PATCH, DELETE]}
        key: [agent]                    # one counter per agent (default)
        limit: 100                      # requests ...
        period: 1m                      # ... per minute (seconds, or 500ms / 30s / 5m / 1h / 1d)
        burst: 20                       # at most 20 at once (default: the limit)
        shadow: false                   # true: count and record, never refuse
        on_unavailable: closed          # counters unreachable: 503 (closed) or let through (open)

Key dimensions: `agent`, `group` (each of the agent's groups: the members of a
group share its counter), `connector`, `action`, `resource`, `workflow` (the
workflow instance the call is a step of), `param:<name>`, `query:<name>`,
`field:<name>` (the route's typed values) and `claim:<name>` (a claim of the
agent's token). Kept apart from the config and manifest modules so both share
one definition without importing each other (as coordination/concurrency_spec.py).
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from .rate import Gcra

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DIMENSIONS = ("agent", "group", "connector", "action", "resource", "workflow")
VALUE_DIMENSIONS = ("param", "query", "field", "claim")  # `<kind>:<name>`
_VALUE_NAME = re.compile(r"^[A-Za-z0-9_$.@-]{1,128}$")
_PERIOD = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
MAX_PERIOD_SECONDS = 366 * 86400
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})


def parse_period(value: Any) -> float:
    """Seconds from a number of seconds or a string `500ms`, `30s`, `5m`, `1h`, `1d` (ValueError otherwise)."""
    if isinstance(value, bool):
        raise ValueError("a period is a number of seconds or a duration such as 30s, 5m, 1h, 1d")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _PERIOD.match(value)
        if m is None:
            raise ValueError(f"period {value!r}: a number of seconds or a duration such as 500ms, 30s, 5m, 1h, 1d")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ValueError("a period is a number of seconds or a duration such as 30s, 5m, 1h, 1d")
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_PERIOD_SECONDS:
        raise ValueError(f"a period is more than 0 and at most 366 days, not {value!r}")
    return round(seconds, 3)


def check_dimension(dim: str) -> str:
    """A key dimension, as written (ValueError naming the choices otherwise)."""
    if not isinstance(dim, str):
        raise ValueError("a key dimension is a string")
    if dim in DIMENSIONS:
        return dim
    kind, sep, name = dim.partition(":")
    if sep and kind in VALUE_DIMENSIONS and _VALUE_NAME.match(name):
        return dim
    raise ValueError(f"unknown key dimension {dim!r}: use {', '.join(DIMENSIONS)}, or "
                     f"{', '.join(k + ':<name>' for k in VALUE_DIMENSIONS)}")


def check_key_dimensions(v: list[str]) -> list[str]:
    """A limit's or budget's `key`: known dimensions, each once, at most 8."""
    for dim in v:
        check_dimension(dim)
    dupes = sorted({d for d in v if v.count(d) > 1})
    if dupes:
        raise ValueError(f"key names {dupes} more than once")
    if len(v) > 8:
        raise ValueError("a key has at most 8 dimensions")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RateLimitSpec(_Strict):
    """One rate limit (a route's, or a config limit without its `match`)."""

    name: str
    key: list[str] = Field(default_factory=lambda: ["agent"])
    limit: StrictInt
    period: float
    burst: StrictInt | None = None
    shadow: StrictBool = False
    on_unavailable: Literal["closed", "open"] = "closed"

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(f"rate-limit name {v!r}: 1 to 64 letters, digits and _ . - (starting with a letter "
                             "or digit)")
        return v

    @field_validator("key")
    @classmethod
    def _key(cls, v: list[str]) -> list[str]:
        return check_key_dimensions(v)

    @field_validator("period", mode="before")
    @classmethod
    def _period(cls, v: Any) -> float:
        return parse_period(v)

    @model_validator(mode="after")
    def _rate(self) -> "RateLimitSpec":
        Gcra.of(self.limit, self.period, self.burst)  # ValueError says what is out of range
        return self

    @property
    def gcra(self) -> Gcra:
        return Gcra.of(self.limit, self.period, self.burst)

    def same_as(self, other: "RateLimitSpec") -> bool:
        return (self.key, self.limit, self.period, self.burst, self.shadow, self.on_unavailable) == \
            (other.key, other.limit, other.period, other.burst, other.shadow, other.on_unavailable)


class RateLimitMatch(_Strict):
    """Which requests a config limit applies to; an empty list matches everything."""

    connectors: list[str] = Field(default_factory=list)
    # exact action ids, or a prefix ending in `*` (`erp.purchase_order.*`)
    actions: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = [m.upper() for m in v]
        bad = [m for m in out if m not in HTTP_METHODS]
        if bad:
            raise ValueError(f"unknown HTTP methods {bad}")
        return out

    @field_validator("actions")
    @classmethod
    def _actions(cls, v: list[str]) -> list[str]:
        for a in v:
            if not a or "*" in a[:-1]:
                raise ValueError(f"action {a!r}: an action id, or a prefix ending in * (erp.purchase_order.*)")
        return v

    def action_matches(self, action: str) -> bool:
        return not self.actions or any(action.startswith(a[:-1]) if a.endswith("*") else action == a
                                       for a in self.actions)

    def matches(self, connector: str, action: str, method: str) -> bool:
        return ((not self.connectors or connector in self.connectors) and self.action_matches(action)
                and (not self.methods or method in self.methods))


class ConfigRateLimit(RateLimitSpec):
    """A `rate_limits:` entry of proctor.yaml."""

    match: RateLimitMatch = Field(default_factory=RateLimitMatch)


def unique_names(v: list[ConfigRateLimit]) -> list[ConfigRateLimit]:
    names = [lim.name for lim in v]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"rate limit names must be unique: {dupes} declared more than once")
    return v


class CountersConfig(_Strict):
    """Where rate-limit counters live: the state store (default) or Redis."""

    backend: Literal["store", "redis"] = "store"
    redis_url: str | None = None  # redis://host:6379/0 (no password here: use redis_url_env)
    redis_url_env: str | None = None
    prefix: str = Field("proctor:", max_length=64)
    timeout_seconds: float = Field(1.0, gt=0, le=30)
    # how often a replica deletes expired counter rows (store backend; Redis keys expire by themselves)
    sweep_interval_seconds: float = Field(60.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _redis(self) -> "CountersConfig":
        if self.redis_url and self.redis_url_env:
            raise ValueError("counters: give redis_url or redis_url_env, not both")
        if self.backend == "redis" and not (self.redis_url or self.redis_url_env):
            raise ValueError("counters.backend redis needs redis_url or redis_url_env")
        if self.backend != "redis" and (self.redis_url or self.redis_url_env):
            raise ValueError("counters.redis_url(_env) is for backend: redis")
        if self.redis_url:
            if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
                raise ValueError("counters.redis_url: a redis://, rediss:// or unix:// URL")
            userinfo = self.redis_url.split("//", 1)[-1].split("/", 1)[0]
            if "@" in userinfo and ":" in userinfo.split("@", 1)[0]:
                raise ValueError("counters.redis_url carries a password; put the URL in an environment variable "
                                 "and use redis_url_env")
        if any(not 0x21 <= ord(c) <= 0x7E for c in self.prefix):
            raise ValueError("counters.prefix: printable ASCII without spaces")
        return self


def route_rate_limits_error(data: Any) -> Any:
    """A route's `rate_limit` (one limit or a list) validated up front, so an error names the route."""
    if not isinstance(data, dict) or data.get("rate_limit") is None:
        return data
    raw = data["rate_limit"]
    where = f"route {data.get('method', '?')} {data.get('path', '?')}"
    items = raw if isinstance(raw, list) else [raw]
    specs = []
    for i, item in enumerate(items):
        try:
            specs.append(RateLimitSpec.model_validate(item))
        except Exception as e:  # pydantic ValidationError: keep its text, add where
            which = f"rate_limit[{i}]" if isinstance(raw, list) else "rate_limit"
            raise ValueError(f"{where}: invalid {which}: {e}") from None
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: rate_limit names {dupes} more than once")
    return data


def check_route_rate_limits(specs: list[RateLimitSpec], method: str, path: str, params: set[str],
                            query: set[str], fields: set[str]) -> None:
    """Raise ValueError naming the route when a key names a value the route does not declare."""
    where = f"route {method} {path}"
    declared = {"param": params, "query": query, "field": fields}
    for s in specs:
        for dim in s.key:
            kind, _, name = dim.partition(":")
            if kind in declared and name not in declared[kind]:
                have = sorted(declared[kind])
                raise ValueError(f"{where}: rate_limit {s.name!r} keys on {dim}, which the route does not declare "
                                 f"(its {kind} values: {have or 'none'})")
