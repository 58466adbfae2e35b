"""Rate limits without processes (docs/limits.md): declarations and their errors, the limit
table, the generated schema's context.usage, and the rate-limit stage on hand-made exchanges
with in-memory counters and an injected clock (GCRA refill at the millisecond boundary)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import cedarpy
import pytest
import yaml

from proxy.config import ConfigError, load_config
from proxy.connectors.manifest import ConnectorManifest, ManifestError, load_manifest
from proxy.connectors.schema_gen import declared_in, generate_schema
from proxy.core.chain import Chain
from proxy.core.exchange import Exchange
from proxy.core.model import AgentIdentity, AgentRequest, Classification
from proxy.core.problem import openai_error_response, problem_response
from proxy.limits.memory import MemoryCounterStore
from proxy.limits.spec import ConfigRateLimit, CountersConfig, parse_period
from proxy.limits.stage import RateLimit, counter_key, value_text
from proxy.limits.store_backend import StoreCounters
from proxy.limits.table import LimitConfigError, build_table, usage_actions
from proxy.policy.stage import CONTEXT_EXTRA
from proxy.record.model import RATE_LIMIT_RECORD, DecisionRecord, parse_line

ROOT = Path(__file__).resolve().parent.parent

MANIFEST = {
    "name": "svc", "hosts": ["svc.example.com"],
    "routes": [
        {"method": "POST", "path": "/orders", "action": "svc.order.create", "resource": {"type": "Order", "id": "new"},
         "body": {"customer": {"path": "customer", "type": "string"}, "total": {"path": "total", "type": "decimal"}}},
        {"method": "GET", "path": "/orders/{id}", "action": "svc.order.read", "resource": {"type": "Order", "id": "{id}"},
         "rate_limit": {"name": "order-reads", "key": ["agent", "param:id"], "limit": 2, "period": "1m"}},
        {"method": "*", "path": "/any/{*}", "action": "svc.any", "resource": {"type": "Order", "id": "any"}},
    ],
}


def manifest(**route_extra: Any) -> ConnectorManifest:
    m = json.loads(json.dumps(MANIFEST))
    m["routes"][0].update(route_extra)
    return ConnectorManifest.model_validate(m)


def limit(**kw: Any) -> ConfigRateLimit:
    base = {"name": "per-agent", "limit": 3, "period": 60}
    base.update(kw)
    return ConfigRateLimit.model_validate(base)


# ------------------------------------------------------------------ declarations
@pytest.mark.parametrize("given, seconds", [(10, 10.0), (0.5, 0.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0),
                                            ("1h", 3600.0), ("1d", 86400.0), (" 2h ", 7200.0), ("1.5s", 1.5)])
def test_periods(given: Any, seconds: float) -> None:
    assert parse_period(given) == seconds


@pytest.mark.parametrize("bad", ["", "1w", "m", "-1s", "1 hour", True, None, 0, -5, "400d", float("nan")])
def test_bad_periods(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_period(bad)


@pytest.mark.parametrize("kw, message", [
    ({"name": "has space"}, "rate-limit name"),
    ({"name": "x" * 65}, "rate-limit name"),
    ({"key": ["agent", "agent"]}, "more than once"),
    ({"key": ["tenant"]}, "unknown key dimension 'tenant'"),
    ({"key": ["field:"]}, "unknown key dimension"),
    ({"key": ["header:x"]}, "unknown key dimension"),
    ({"limit": 0}, "a rate limit is 1 to"),
    ({"limit": True}, "limit"),
    ({"burst": 0}, "a burst is 1 to"),
    ({"period": "0.0001s"}, "period"),
    ({"period": "1w"}, "period"),
    ({"shadow": "yes"}, "shadow"),
    ({"on_unavailable": "maybe"}, "on_unavailable"),
    ({"match": {"methods": ["FETCH"]}}, "unknown HTTP methods"),
    ({"match": {"actions": ["svc.*.create"]}}, "a prefix ending in *"),
    ({"match": {"tenants": ["x"]}}, "tenants"),
    ({"surprise": 1}, "surprise"),
])
def test_invalid_declarations_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        limit(**kw)


def _write_config(tmp_path: Path, **extra: Any) -> Path:
    p = tmp_path / "proctor.yaml"
    p.write_text(yaml.safe_dump(extra))
    return p


def test_config_errors_name_where(tmp_path: Path) -> None:
    cfg = load_config(_write_config(tmp_path, rate_limits=[{"name": "a", "limit": 5, "period": "1m"}],
                                    counters={"backend": "store"}))
    assert cfg.rate_limits[0].key == ["agent"] and cfg.rate_limits[0].period == 60.0
    assert cfg.rate_limits[0].on_unavailable == "closed" and not cfg.rate_limits[0].shadow
    with pytest.raises(ConfigError, match=r"rate_limits\.1\.period"):
        load_config(_write_config(tmp_path, rate_limits=[{"name": "a", "limit": 5, "period": "1m"},
                                                         {"name": "b", "limit": 5, "period": "fortnight"}]))
    with pytest.raises(ConfigError, match=r"rate_limits: .*unique: \['a'\]"):
        load_config(_write_config(tmp_path, rate_limits=[{"name": "a", "limit": 5, "period": 1},
                                                         {"name": "a", "limit": 6, "period": 1}]))
    with pytest.raises(ConfigError, match="carries a password"):
        load_config(_write_config(tmp_path, counters={"backend": "redis", "redis_url": "redis://u:pw@h:6379/0"}))
    with pytest.raises(ConfigError, match="needs redis_url"):
        load_config(_write_config(tmp_path, counters={"backend": "redis"}))
    with pytest.raises(ConfigError, match="counters.backndd|backndd"):
        load_config(_write_config(tmp_path, counters={"backndd": "redis"}))
    # the password never reaches the message
    try:
        load_config(_write_config(tmp_path, counters={"backend": "redis", "redis_url": "redis://u:s3cr3t@h/0"}))
    except ConfigError as e:
        assert "s3cr3t" not in str(e)
    assert CountersConfig(backend="redis", redis_url_env="X").redis_url is None


def test_manifest_errors_name_the_manifest_and_route(tmp_path: Path) -> None:
    def write(rate_limit: Any) -> Path:
        m = json.loads(json.dumps(MANIFEST))
        m["routes"][0]["rate_limit"] = rate_limit
        p = tmp_path / "svc.yaml"
        p.write_text(yaml.safe_dump(m))
        return p

    with pytest.raises(ManifestError, match=r"(?s)svc\.yaml.*route POST /orders: invalid rate_limit: .*period"):
        load_manifest(write({"name": "w", "limit": 1, "period": "soon"}))
    with pytest.raises(ManifestError, match=r"route POST /orders: invalid rate_limit\[1\]"):
        load_manifest(write([{"name": "w", "limit": 1, "period": 1}, {"name": "v", "limit": 1}]))
    with pytest.raises(ManifestError, match=r"route POST /orders: rate_limit names \['w'\] more than once"):
        load_manifest(write([{"name": "w", "limit": 1, "period": 1}, {"name": "w", "limit": 2, "period": 1}]))
    with pytest.raises(ManifestError, match=r"route POST /orders: rate_limit 'w' keys on param:id, which the route "
                                            r"does not declare"):
        load_manifest(write({"name": "w", "limit": 1, "period": 1, "key": ["param:id"]}))
    with pytest.raises(ManifestError, match=r"(?s)keys on field:amount.*\['customer', 'total'\]"):
        load_manifest(write({"name": "w", "limit": 1, "period": 1, "key": ["field:amount"]}))
    ok = load_manifest(write([{"name": "w", "limit": 1, "period": 1, "key": ["field:customer"]},
                              {"name": "v", "limit": 9, "period": "1h", "shadow": True}]))
    assert [s.name for s in ok.routes[0].rate_limits] == ["w", "v"]


# ------------------------------------------------------------------ the table
def test_table_checks_against_the_connectors() -> None:
    m = manifest()
    problems = [
        (limit(match={"connectors": ["nope"]}), "match.connectors names 'nope'"),
        (limit(match={"actions": ["svc.order.delete"]}), "match.actions names 'svc.order.delete'"),
        (limit(match={"actions": ["crm.*"]}), "match.actions names 'crm.*'"),
        (limit(match={"connectors": ["svc"], "actions": ["http.request"]}), "match selects no route"),
        (limit(key=["field:amount"], match={"connectors": ["svc"]}), "key field:amount: none of the routes"),
        (limit(key=["workflow"], match={"connectors": ["svc"]}), "key workflow: none of the actions"),
        (limit(name="order-reads"), "also a route limit's (connector svc, route GET /orders/{id})"),
    ]
    for lim, message in problems:
        with pytest.raises(LimitConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                           .replace("*", r"\*").replace("{", r"\{").replace("}", r"\}")):
            build_table([lim], [m])
    with pytest.raises(LimitConfigError) as e:  # every problem at once
        build_table([limit(match={"connectors": ["x"]}), limit(name="b", match={"actions": ["y"]})], [m])
    assert len(e.value.problems) == 2
    # the same name on two routes: one limit when declared alike, an error when not
    m2 = json.loads(json.dumps(MANIFEST))
    m2["routes"][0]["rate_limit"] = {"name": "order-reads", "key": ["agent"], "limit": 2, "period": "1m"}
    with pytest.raises(LimitConfigError, match="'order-reads' is declared differently"):
        build_table([], [ConnectorManifest.model_validate(m2)])
    m2["routes"][0]["rate_limit"] = {"name": "writes", "limit": 2, "period": 60}
    m2["routes"][2]["rate_limit"] = {"name": "writes", "limit": 2, "period": "1m"}
    t = build_table([], [ConnectorManifest.model_validate(m2)])
    shared = t.get("writes")
    assert shared is not None and shared.routes == ("svc POST /orders", "svc * /any/{*}")
    assert t.for_request("svc", "POST /orders", "svc.order.create", "POST") == (shared,)
    assert t.for_request("svc", "* /any/{*}", "svc.any", "DELETE") == (shared,)


def test_table_matching_and_order() -> None:
    t = build_table([
        limit(name="hourly", period="1h", match={"connectors": ["svc"]}),
        limit(name="writes", period="1s", match={"methods": ["POST", "DELETE"]}),
        limit(name="reads", period="1s", match={"actions": ["svc.order.*"], "methods": ["GET"]}),
    ], [manifest()])
    names = lambda *a: [lim.name for lim in t.for_request(*a)]  # noqa: E731
    assert names("svc", "POST /orders", "svc.order.create", "POST") == ["writes", "hourly"]
    assert names("svc", "GET /orders/{id}", "svc.order.read", "GET") == ["reads", "order-reads", "hourly"]
    assert names("svc", "* /any/{*}", "svc.any", "GET") == ["hourly"]
    assert names("svc", "* /any/{*}", "svc.any", "DELETE") == ["writes", "hourly"]
    assert names("generic-http", "*", "http.request", "DELETE") == ["writes"]
    assert names("generic-http", "*", "http.request", "GET") == []


def test_usage_actions_and_the_generated_schema() -> None:
    m = manifest()
    cfg = [limit(match={"methods": ["DELETE"]}), limit(name="c", match={"actions": ["svc.order.create"]})]
    usage = usage_actions(cfg, [m])
    # the route limit and a config limit always apply; a method filter on a `*` route only sometimes
    assert usage == {"svc.order.create": True, "svc.order.read": True, "svc.any": False}
    base = (ROOT / "proxy" / "defaults" / "policies" / "schema.cedarschema").read_text()
    text = generate_schema([m], declared_in(base), usage_actions=usage)
    assert "usage: { name: String, limit: Long, period: Long, remaining: Long" in text
    assert "usage?: { name: String" in text
    cedarpy.Schema.from_str(base + "\n" + text)  # valid Cedar
    policy = ('permit (principal, action == Action::"svc.order.create", resource) '
              'when { context.usage.remaining > 0 && !context.usage.throttled };')
    result = cedarpy.validate_policies(policy, base + "\n" + text)
    assert result.validation_passed, result.errors
    assert "usage" not in generate_schema([m], declared_in(base))


# ------------------------------------------------------------------ the stage
class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _ex(action: str = "svc.order.create", agent: str = "bot", method: str = "POST", route: str = "POST /orders",
        groups: list[str] | None = None, fields: dict | None = None, params: dict | None = None,
        claims: dict | None = None) -> Exchange:
    req = AgentRequest(method=method, scheme="http", host="svc.example.com", port=80, path="/orders", query="",
                       headers={}, body=b"", client_ip="127.0.0.1", mode="forward")
    ex = Exchange(req)
    ex.identity = AgentIdentity(agent, "https://idp", {"groups": groups or [], **(claims or {})}, None)
    ex.classification = Classification("svc", action, "Order", "new", route=route, fields=fields or {},
                                       params=params or {})
    return ex


def _stage(limits: list[ConfigRateLimit], clock: Clock, store: MemoryCounterStore | None = None,
           observer: Any = None) -> RateLimit:
    table = build_table(limits, [manifest()])
    store = store or MemoryCounterStore()
    return RateLimit(table, StoreCounters(store), lambda i: list(i.claims.get("groups", [])), observer, clock=clock)


def run(stage: RateLimit, ex: Exchange) -> Exchange:
    asyncio.run(Chain([stage]).request(ex))
    return ex


class Seen:
    def __init__(self) -> None:
        self.counted: list[tuple[str, str]] = []

    def count(self, limit: str, outcome: str) -> None:
        self.counted.append((limit, outcome))


def test_allowed_then_throttled_with_headers_context_and_record() -> None:
    clock, seen = Clock(), Seen()
    stage = _stage([limit(limit=2, period="1m", match={"connectors": ["svc"]})], clock, observer=seen)
    first = run(stage, _ex())
    assert first.allowed
    assert first.plan.response_headers == {"RateLimit-Policy": '"per-agent";q=2;w=60', "RateLimit": '"per-agent";r=1;t=30'}
    assert first.stage_data[CONTEXT_EXTRA]["usage"] == {"name": "per-agent", "limit": 2, "period": 60, "remaining": 1,
                                                        "reset_after": 30, "throttled": False, "shadow": False,
                                                        "known": True}
    rec = first.stage_data[RATE_LIMIT_RECORD]
    assert rec["name"] == "per-agent" and rec["outcome"] == "allowed" and rec["remaining"] == 1 and len(rec["key"]) == 16
    assert run(stage, _ex()).allowed
    third = run(stage, _ex())
    r = third.refusal
    assert r is not None and r.status == 429 and r.kind == "rate-limited" and r.headers == {"Retry-After": "30"}
    assert r.reasons == ["rate-limit:per-agent"]
    assert r.extra["rate_limit"] == {"name": "per-agent", "limit": 2, "period_seconds": 60.0, "burst": 2,
                                     "key": {"agent": "bot"}, "remaining": 0, "retry_after": 30}
    assert "Retry after 30 seconds" in r.detail and "'per-agent'" in r.detail
    assert third.plan.response_headers["RateLimit"] == '"per-agent";r=0;t=30'
    assert third.stage_data[RATE_LIMIT_RECORD]["outcome"] == "throttled"
    assert CONTEXT_EXTRA not in third.stage_data  # refused before Cedar
    # another agent has its own counter
    assert run(stage, _ex(agent="other")).allowed
    assert seen.counted == [("per-agent", "allowed")] * 2 + [("per-agent", "throttled"), ("per-agent", "allowed")]
    assert stage.counts["per-agent"] == {"allowed": 3, "throttled": 1}
    # the problem body and the OpenAI error object of the 429
    status, headers, body = problem_response(third)
    doc = json.loads(body)
    assert status == 429 and headers["Retry-After"] == "30" and doc["type"].endswith("/rate-limited")
    assert doc["rate_limit"]["retry_after"] == 30 and doc["reasons"] == ["rate-limit:per-agent"]
    status, headers, body = openai_error_response(third)
    err = json.loads(body)["error"]
    assert status == 429 and err["type"] == "rate_limit_error" and err["code"] == "rate-limited"
    assert headers["Retry-After"] == "30"


def test_refill_is_exact_at_the_millisecond() -> None:
    # 2 per minute: one comes back every 30 s after a burst of two
    clock = Clock(1_800_000_000.0)
    stage = _stage([limit(limit=2, period="1m")], clock)
    assert run(stage, _ex()).allowed and run(stage, _ex()).allowed
    clock.t += 29.999
    refused = run(stage, _ex())
    assert refused.refusal is not None and refused.refusal.headers == {"Retry-After": "1"}
    clock.t = 1_800_000_000.0 + 30.0
    assert run(stage, _ex()).allowed
    assert run(stage, _ex()).refusal is not None
    # a whole idle period later the full burst is back, and no more
    clock.t += 60.0
    assert [run(stage, _ex()).allowed for _ in range(3)] == [True, True, False]


def test_throttled_requests_do_not_push_the_wait_back() -> None:
    clock = Clock()
    stage = _stage([limit(limit=1, period=10)], clock)
    assert run(stage, _ex()).allowed
    for step in range(9):  # a loop hammering every second is refused, and the wait keeps shrinking
        clock.t += 1
        r = run(stage, _ex()).refusal
        assert r is not None and r.headers["Retry-After"] == str(9 - step)
    clock.t += 1
    assert run(stage, _ex()).allowed


def test_shadow_limits_count_and_record_but_never_refuse() -> None:
    clock = Clock()
    stage = _stage([limit(limit=1, period=60, shadow=True)], clock)
    assert run(stage, _ex()).allowed
    second = run(stage, _ex())
    assert second.allowed and second.stage_data[RATE_LIMIT_RECORD]["outcome"] == "shadow_throttled"
    assert second.stage_data[RATE_LIMIT_RECORD]["shadow"] is True
    assert second.plan.response_headers == {}  # headers advertise enforced limits only
    usage = second.stage_data[CONTEXT_EXTRA]["usage"]
    assert usage["throttled"] and usage["shadow"] and usage["remaining"] == 0
    assert stage.counts["per-agent"] == {"allowed": 1, "shadow_throttled": 1}


def test_several_limits_the_tightest_decides() -> None:
    clock = Clock()
    stage = _stage([limit(name="burst", limit=2, period=1), limit(name="hourly", limit=3, period="1h"),
                    limit(name="audit", limit=1, period="1d", shadow=True)], clock)
    ex = run(stage, _ex())
    assert ex.allowed
    # both enforced limits in the headers, tightest (fewest remaining) first; the shadow one left out
    assert ex.plan.response_headers["RateLimit-Policy"] == '"burst";q=2;w=1, "hourly";q=3;w=3600'
    assert ex.stage_data[CONTEXT_EXTRA]["usage"]["name"] == "burst"
    rec = ex.stage_data[RATE_LIMIT_RECORD]
    assert [rec["name"]] + [o["name"] for o in rec["others"]] == ["burst", "hourly", "audit"]
    run(stage, _ex())
    clock.t += 1
    ex = run(stage, _ex())  # the burst refilled; hourly now has 0 left and is the tightest
    assert ex.allowed and ex.stage_data[CONTEXT_EXTRA]["usage"]["name"] == "hourly"
    clock.t += 1
    ex = run(stage, _ex())
    assert ex.refusal is not None and ex.refusal.reasons == ["rate-limit:hourly"]
    assert ex.refusal.headers["Retry-After"] == "1198"  # one of 3 per hour comes back 1200 s after the first
    # the shadow limit (longest period) was not charged after the throttle
    assert stage.counts["audit"] == {"allowed": 1, "shadow_throttled": 2}


def test_keys_groups_values_and_escaping() -> None:
    clock = Clock()
    stage = _stage([limit(name="team", limit=1, period=60, key=["group"]),
                    limit(name="customer", limit=1, period=60, key=["field:customer"], match={"connectors": ["svc"]})],
                   clock)
    # members of one group share its counter
    assert run(stage, _ex(agent="a", groups=["ops"], fields={"customer": "c1"})).allowed
    r = run(stage, _ex(agent="b", groups=["ops", "zz"], fields={"customer": "c2"})).refusal
    assert r is not None and r.extra["rate_limit"]["key"] == {"group": "ops"}
    # an agent in no group counts under "no group"
    assert run(stage, _ex(agent="c", fields={"customer": "c3"})).allowed
    r = run(stage, _ex(agent="d", fields={"customer": "c4"})).refusal
    assert r is not None and r.extra["rate_limit"]["key"] == {"group": None} and "group (none)" in r.detail
    # request values are shown digested, never as sent
    r = run(stage, _ex(agent="e", groups=["x"], fields={"customer": "c1"})).refusal
    assert r is not None and r.extra["rate_limit"]["key"]["field:customer"].startswith("sha256:")
    assert "c1" not in json.dumps(r.extra) and "c1" not in r.detail
    # keys cannot be forged across dimensions or limits
    assert counter_key("l", ("agent", "action"), ("a:b", "c")) != counter_key("l", ("agent", "action"), ("a", "b:c"))
    assert counter_key("l", ("agent",), (None,)) != counter_key("l", ("agent",), ("-",))
    assert counter_key("l", ("agent",), ("",)) != counter_key("l", ("agent",), (None,))
    assert counter_key("a", (), ()) != counter_key("b", (), ())
    assert value_text({"__extn": {"fn": "decimal", "arg": "1.50"}}) == "1.50"
    assert value_text(["b", "a"]) == '["b","a"]' and value_text(True) == "true" and value_text(None) is None


def test_leaving_a_value_out_never_escapes_the_limit() -> None:
    stage = _stage([limit(name="customer", limit=1, period=60, key=["field:customer"], match={"connectors": ["svc"]})],
                   Clock())
    assert run(stage, _ex(agent="a")).allowed  # no customer: the "none" counter
    r = run(stage, _ex(agent="b")).refusal
    assert r is not None and r.extra["rate_limit"]["key"] == {"field:customer": None}
    assert run(stage, _ex(agent="c", fields={"customer": "c1"})).allowed  # a value has its own counter


def test_a_token_with_many_groups_costs_a_bounded_number_of_counters() -> None:
    class Counting(StoreCounters):
        hits = 0

        async def hit(self, *a: Any, **kw: Any) -> Any:
            Counting.hits += 1
            return await super().hit(*a, **kw)

    table = build_table([limit(name="team", key=["group"], limit=5, period=60)], [manifest()])
    stage = RateLimit(table, Counting(MemoryCounterStore()), lambda i: list(i.claims.get("groups", [])), clock=Clock())
    groups = [f"g{i:04d}" for i in range(1000)]
    ex = run(stage, _ex(groups=groups))  # more than MAX_GROUP_KEYS: refused before any counter is touched
    assert ex.refusal is not None and ex.refusal.status == 403 and Counting.hits == 0
    ex = run(stage, _ex(groups=groups[:40]))  # every group counted: none escapes its counter
    assert ex.allowed and Counting.hits == 40
    assert run(stage, _ex(agent="x", groups=["g0039"])).stage_data[RATE_LIMIT_RECORD]["remaining"] == 3


def test_counters_down_fail_closed_or_open() -> None:
    clock, store = Clock(), MemoryCounterStore()
    closed = _stage([limit(name="strict")], clock, store)
    opened = _stage([limit(name="lenient", on_unavailable="open")], clock, store)
    store.fail = True
    ex = run(closed, _ex())
    r = ex.refusal
    assert r is not None and r.status == 503 and r.kind == "fail-closed" and r.headers == {"Retry-After": "5"}
    assert r.reasons == ["rate-limit:strict"] and ex.errors and "memory" in r.detail
    assert ex.stage_data[RATE_LIMIT_RECORD] == {"name": "strict", "key": ex.stage_data[RATE_LIMIT_RECORD]["key"],
                                                "outcome": "unavailable", "limit": 3, "period_seconds": 60.0,
                                                "shadow": False}
    ok = run(opened, _ex())
    assert ok.allowed and ok.plan.response_headers == {}
    assert ok.stage_data[CONTEXT_EXTRA]["usage"] == {"name": "lenient", "limit": 3, "period": 60, "remaining": 3,
                                                     "reset_after": 0, "throttled": False, "shadow": False,
                                                     "known": False}
    assert closed.counts["strict"] == {"unavailable": 1} and opened.counts["lenient"] == {"unavailable": 1}
    store.fail = False
    assert run(closed, _ex()).allowed


def test_unlimited_requests_are_untouched() -> None:
    stage = _stage([limit(match={"actions": ["svc.any"]})], Clock())
    ex = run(stage, _ex())
    assert ex.allowed and ex.plan.response_headers == {} and RATE_LIMIT_RECORD not in ex.stage_data
    assert stage.counts["per-agent"] == {}
    assert CONTEXT_EXTRA not in ex.stage_data


def test_workflow_keyed_limits_count_steps_only() -> None:
    t = build_table([limit(key=["workflow"], match={"connectors": ["svc"]})], [manifest()],
                    workflow_actions=frozenset({"svc.order.create"}))
    stage = RateLimit(t, StoreCounters(MemoryCounterStore()), lambda i: [], clock=Clock())
    ex = _ex()
    ex.stage_data[CONTEXT_EXTRA] = {"workflow": {"instance": "wf_1"}}
    assert run(stage, ex).allowed and ex.stage_data[CONTEXT_EXTRA]["usage"]["name"] == "per-agent"
    other = _ex(action="svc.any", route="* /any/{*}")
    assert run(stage, other).allowed and RATE_LIMIT_RECORD not in other.stage_data


def test_the_record_line_carries_the_rate_limit_part() -> None:
    stage = _stage([limit(limit=1, period=60), limit(name="b", period=60, shadow=True)], Clock())
    run(stage, _ex())
    ex = run(stage, _ex())
    rec = DecisionRecord.from_exchange(ex)
    line = rec.line()
    d = json.loads(line)
    assert d["rate_limit"]["outcome"] == "throttled" and d["rate_limit"]["name"] == "per-agent"
    assert d["rate_limit"]["others"][0]["name"] == "b" and d["decision"] == "deny"
    back = parse_line(line)
    assert isinstance(back, DecisionRecord) and back.rate_limit == d["rate_limit"]
    from proxy.audit.ocsf import to_ocsf

    event = to_ocsf(back)
    assert event["unmapped"]["proctor"]["rate_limit"]["name"] == "per-agent"
    assert event["api"]["response"]["error"] == "rate-limited"


def test_an_agent_in_more_groups_than_counted_is_refused_not_partly_counted() -> None:
    from proxy.limits.stage import MAX_GROUP_KEYS

    clock = Clock()
    stage = _stage([limit(key=["group"], limit=100, match={"connectors": ["svc"]})], clock)
    many = [f"g{i:03d}" for i in range(MAX_GROUP_KEYS)]
    assert run(stage, _ex(groups=many)).allowed  # exactly the bound: counted against each
    over = run(stage, _ex(groups=many + ["zzz"]))
    assert over.refusal is not None and over.refusal.status == 403 and over.refusal.title == "Too many groups"
    assert str(MAX_GROUP_KEYS) in over.refusal.detail
