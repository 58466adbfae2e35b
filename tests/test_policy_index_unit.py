"""Action partitioning and context pruning never change a decision.

Compares, for many random requests against the benchmark's 500-policy set,
Proctor's evaluation (action part + pruned context + cached entities) with
plain Cedar over the whole set and the whole context.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import cedarpy
import pytest

from proxy.policy.engine import PolicySource, PolicyStore
from proxy.policy.index import context_keys_used

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import policygen  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> PolicyStore:
    d = tmp_path_factory.mktemp("gen")
    policygen.generate(d, count=500)
    return PolicyStore(PolicySource(d / "schema.cedarschema", d, d / "entities.json"))


def _request(rng: random.Random):
    action = rng.choice(policygen.actions() + ["bench.item.read", "bench.item.delete", "unknown.action"])
    agent = {
        "uid": {"type": "Agent", "id": rng.choice([f"agent-{i:04d}" for i in range(0, 500, 7)] + ["bench-agent"])},
        "attrs": {k: v for k, v in (("team", f"team-{rng.randrange(23)}"), ("level", rng.randrange(6))) if rng.random() < 0.7},
        "parents": [{"type": "AgentGroup", "id": f"group-{rng.randrange(37)}"} for _ in range(rng.randrange(3))],
    }
    resource = {
        "uid": {"type": rng.choice(["Record", "Item"]), "id": str(rng.randrange(5))},
        "attrs": {k: v for k, v in (("kind", rng.choice(policygen.KINDS)), ("owner", f"team-{rng.randrange(23)}")) if rng.random() < 0.7},
        "parents": [],
    }
    svc = action.split(".")[0]
    hour = rng.randrange(24)
    headers = {"user-agent": f"agent-sdk/{rng.randrange(9)}"} if rng.random() < 0.5 else {}
    if rng.random() < 0.5:
        headers["x-request-id"] = "r"
    context = {
        "method": rng.choice(["GET", "POST", "DELETE", "PATCH"]),
        "path": rng.choice([f"/{svc}/admin/x", "/items/1", f"/{svc}/records/2"]),
        "query": "",
        "host": "h",
        "headers": headers,
        "connector": rng.choice([svc, "other"]),
        "risk": rng.choice(policygen.RISKS),
        "time": {
            "now": {"__extn": {"fn": "datetime", "arg": f"20{rng.choice([26, 30, 33])}-01-01T{hour:02d}:00:00Z"}},
            "epoch": rng.choice([1_600_000_000, 1_800_000_000]),
            "hour": hour,
            "weekday": rng.randrange(1, 8),
        },
        "source_ip": {"__extn": {"fn": "ip", "arg": rng.choice(["127.0.0.1", "10.3.1.1", "192.168.1.1"])}},
        "mode": rng.choice(["forward", "reverse"]),
    }
    if rng.random() < 0.25:  # the benchmark's allowed request, so both outcomes are well represented
        agent["uid"]["id"], action, resource["uid"]["type"] = "bench-agent", "bench.item.read", "Item"
        context.update(method="GET", risk="low")
    return agent, action, resource, context


def test_partitioned_evaluation_equals_full_evaluation(store):
    rng = random.Random(7)
    b = store.bundle
    allowed = denied = 0
    for _ in range(1500):
        agent, action, resource, context = _request(rng)
        got = store.authorize(agent, action, resource, context, [agent, resource])
        full = cedarpy.is_authorized(
            {"principal": agent["uid"], "action": {"type": "Action", "id": action}, "resource": resource["uid"], "context": context},
            b.policy_set,
            b.entities.with_added_json_str(__import__("json").dumps([agent, resource])),
        )
        want_allowed = full.decision == cedarpy.Decision.Allow and not full.diagnostics.errors
        assert got.allowed == want_allowed, (action, got, full.diagnostics.reasons)
        assert sorted(got.reasons) == sorted(full.diagnostics.reasons)
        assert bool(got.errors) == bool(full.diagnostics.errors)
        allowed += got.allowed
        denied += not got.allowed
    assert allowed > 50 and denied > 50, (allowed, denied)  # the sample exercises both outcomes


def test_parts_are_smaller_than_the_whole(store):
    b = store.bundle
    assert b.policy_count == 500
    assert len(b.index.cached_actions) >= 100  # warmed at load for every action the policies name
    assert max(len(b.part_for(a).policy_ids) for a in b.index.cached_actions) < 200
    assert len(b.part_for("no.such.action").policy_ids) < 200


def test_context_keys_used():
    import json

    def keys(cond: str):
        text = f'@id("x") permit (principal, action, resource) when {{ {cond} }};'
        est = json.loads(cedarpy.policies_to_json_str(text))
        return context_keys_used(next(iter(est["staticPolicies"].values()))["conditions"])

    assert keys('context.time.hour > 3 && context has body') == {"time", "body"}
    assert keys('context["risk"] == "low"') == {"risk"}
    assert keys("principal == resource") == set()
    assert keys("context == {}") is None  # the whole record: no pruning


GROUP_POLICIES = """
@id("permit-all-deletes")
permit (principal, action == Action::"ticketing.incident.delete", resource);

@id("forbid-destructive")
forbid (principal, action in Action::"destructive", resource);

@id("forbid-listed")
forbid (principal, action in [Action::"read", Action::"destructive"], resource) when { context.risk == "high" };
"""

HUMAN_SCHEMA = """
entity Agent; entity R;
action "destructive";
@doc("see https://docs.example.com/delete") action "ticketing.incident.delete" in [Action::"destructive"] appliesTo { principal: Agent, resource: R, context: {risk: String} };
action "read" appliesTo { principal: Agent, resource: R, context: {risk: String} };
"""

JSON_SCHEMA = {
    "": {
        "entityTypes": {"Agent": {}, "R": {}},
        "actions": {
            "destructive": {},
            "ticketing.incident.delete": {
                "member\u004ff": [{"id": "destructive"}],
                "appliesTo": {"principalTypes": ["Agent"], "resourceTypes": ["R"],
                              "context": {"type": "Record", "attributes": {"risk": {"type": "String"}}}},
            },
            "read": {"appliesTo": {"principalTypes": ["Agent"], "resourceTypes": ["R"],
                                   "context": {"type": "Record", "attributes": {"risk": {"type": "String"}}}}},
        },
    }
}


@pytest.mark.parametrize("schema_kind", ["human-with-url-annotation", "json-with-escaped-key"])
def test_action_groups_are_resolved_by_cedar_not_by_text(tmp_path, schema_kind):
    """A forbid on an action group applies to its members, however the schema spells the group."""
    import json

    if schema_kind.startswith("human"):
        schema = tmp_path / "schema.cedarschema"
        schema.write_text(HUMAN_SCHEMA)
    else:
        schema = tmp_path / "schema.json"
        text = json.dumps(JSON_SCHEMA).replace('"memberOf"', '"member\\u004ff"')
        assert "memberOf" not in text  # the key is spelled with a JSON escape in the file
        schema.write_text(text)
    (tmp_path / "p.cedar").write_text(GROUP_POLICIES)
    store = PolicyStore(PolicySource(schema, tmp_path, tmp_path / "entities.json"))
    agent = {"uid": {"type": "Agent", "id": "a"}, "attrs": {}, "parents": []}
    res = {"uid": {"type": "R", "id": "r"}, "attrs": {}, "parents": []}
    d = store.authorize(agent, "ticketing.incident.delete", res, {"risk": "low"}, [agent, res])
    assert not d.allowed and d.reasons == ["forbid-destructive"]
    d = store.authorize(agent, "ticketing.incident.delete", res, {"risk": "high"}, [agent, res])
    assert sorted(d.reasons) == ["forbid-destructive", "forbid-listed"]


def test_nested_context_pruning():
    import json

    from proxy.policy.index import context_paths_used, prune

    def need(cond: str):
        text = f'@id("x") permit (principal, action, resource) when {{ {cond} }};'
        est = json.loads(cedarpy.policies_to_json_str(text))
        return context_paths_used(next(iter(est["staticPolicies"].values()))["conditions"])

    ctx = {
        "time": {"now": {"__extn": {"fn": "datetime", "arg": "2026-01-01T00:00:00Z"}}, "epoch": 5, "hour": 3},
        "headers": {"user-agent": "x", "x-request-id": "r"},
        "risk": "low",
    }
    assert prune(ctx, need("context.time.hour > 1 && context.risk == \"low\"")) == {"time": {"hour": 3}, "risk": "low"}
    assert prune(ctx, need('context.headers has "x-request-id"')) == {"headers": {"x-request-id": "r"}}
    # a record used as a whole keeps everything below it, whatever else is read
    assert prune(ctx, need("context.time.hour > 1 && context.time == context.time")) == {"time": ctx["time"]}
    assert need("context == {}") is None
