"""`proctor policy suggest`, fast: hand-made decision lines against the test policy set
(tests/data/policies). What is learned from, grouping, bounds, identifiers, ids, the proof,
escaping of attacker-controlled text, empty input. Real traffic through a real proxy is
in tests/test_policy_suggest.py."""

from __future__ import annotations

import gzip
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import cedarpy
import pytest
import yaml
from click.testing import CliRunner

from proxy.cli import main as proctor_cli
from proxy.policy.engine import PolicySource, PolicyStore
from proxy.policy.replay import evaluate
from proxy.policy.suggest import (
    SKIP_ERRORS,
    SKIP_NO_INPUTS,
    SKIP_NOT_FORWARDED,
    SKIP_NOT_IN_SCHEMA,
    SKIP_PROCTOR_5XX,
    SKIP_REFUSED,
    SKIP_REFUSED_LATER,
    Filters,
    NothingToLearn,
    Options,
    SuggestInputError,
    cedar_string,
    comment_text,
    decimal_literal,
    decision_files,
    policy_id,
    suggest,
    summary,
)
from proxy.record.model import parse_record

DATA = Path(__file__).resolve().parent / "data"

EVIL = [
    'a"b',
    "line\nbreak",
    "*/ permit(principal, action, resource); /*",
    '"; permit(principal, action, resource); //',
    "back\\slash\\",
    "nul\0tab\tcr\r",
    "unicode \u2028 sep \u0085 nel é 🎉",
    '\n@id("evil")\npermit (principal, action, resource);\n//',
]


# ------------------------------------------------------------------ helpers
def policy_source(tmp_path: Path, extra: str | None = None, schema_patch: tuple[str, str] | None = None) -> PolicySource:
    d = tmp_path / "policies"
    if not d.exists():
        shutil.copytree(DATA / "policies", d)
        if extra:
            (d / "extra.cedar").write_text(extra)
        if schema_patch:
            schema = d / "schema.cedarschema"
            text = schema.read_text()
            assert schema_patch[0] in text
            schema.write_text(text.replace(*schema_patch))
    return PolicySource(d / "schema.cedarschema", d, None)


_SEQ = iter(range(10**6))


def line(
    agent: str = "writer-bot",
    groups: tuple[str, ...] = ("writers",),
    action: str = "test.order.create",
    rtype: str = "Order",
    rid: str = "new",
    decision: str = "allow",
    policy_decision: str | None = None,
    status: int | None = 200,
    upstream_status: int | None = 200,
    fields: dict[str, Any] | None = None,
    query_params: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
    rattrs: dict[str, Any] | None = None,
    refusal: dict[str, Any] | None = None,
    time: str = "2026-12-01T10:00:00.000Z",
    connector: str = "testsvc",
    errors: list[str] | None = None,
    cedar: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    n = next(_SEQ)
    if params is None:
        params = {"tenant": 7} if action == "test.order.create" else {"id": rid} if rtype == "Item" else {}
    context: dict[str, Any] = {
        "method": "POST", "path": "/x", "query": "", "host": "127.0.0.1", "port": 8000, "headers": {},
        "connector": connector, "risk": "low",
        "time": {"now": {"__extn": {"fn": "datetime", "arg": "2026-12-01T10:00:00Z"}}, "epoch": 1796119200,
                 "hour": 10, "weekday": 2},
        "source_ip": {"__extn": {"fn": "ip", "arg": "127.0.0.1"}}, "mode": "forward",
    }
    if params:
        context["params"] = params
    if fields is not None:
        context["fields"] = fields
    if query_params is not None:
        context["query_params"] = query_params
    out: dict[str, Any] = {
        "decision_id": f"d-{n:06d}", "time": time, "agent": agent, "issuer": "https://idp.test", "action": action,
        "resource": f'{rtype}::"{rid}"', "connector": connector, "risk": "low", "decision": decision,
        "reasons": [], "policy_revision": "r1", "status": status, "upstream_status": upstream_status,
        "latency_ms": 1.0, "decision_ms": 0.1, "method": "POST", "host": "127.0.0.1", "port": 8000, "path": "/x",
        "mode": "forward", "client_ip": "127.0.0.1",
        "policy_decision": policy_decision or ("allow" if decision == "allow" else decision),
    }
    if refusal is not None:
        out["refusal"] = refusal
    if errors:
        out["errors"] = errors
    if cedar:
        out["cedar"] = {
            "principal": {"uid": {"type": "Agent", "id": agent}, "attrs": {},
                          "parents": [{"type": "AgentGroup", "id": g} for g in groups]},
            "resource": {"uid": {"type": rtype, "id": rid}, "attrs": rattrs or {}, "parents": []},
            "context": context,
        }
    out.update(extra)
    return out


def dec(text: str) -> dict[str, Any]:
    return {"__extn": {"fn": "decimal", "arg": text}}


def write(tmp_path: Path, lines: list[dict[str, Any]], name: str = "decisions.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


def run(tmp_path: Path, lines: list[dict[str, Any]], source: PolicySource | None = None, **opts: Any):
    path = write(tmp_path, lines)
    return suggest([path], source or policy_source(tmp_path), Options(**opts))


def est(text: str) -> dict[str, dict[str, Any]]:
    """The policies of a Cedar text, keyed by @id."""
    doc = json.loads(cedarpy.policies_to_json_str(text))
    return {p["annotations"]["id"]: p for p in doc["staticPolicies"].values()}


def when(text: str, pid: str) -> str:
    """The text of one policy (from its @id line to its end)."""
    start = text.index(f'@id("{pid}")')
    return text[start:text.index(";\n", start) + 1]


def order(total: str | None, agent: str = "writer-bot", groups: tuple[str, ...] = ("writers",), **kw: Any) -> dict[str, Any]:
    fields = {"total": dec(total), "skus": ["A"]} if total is not None else {"skus": ["A"]}
    return line(agent=agent, groups=groups, fields=fields, **kw)


# ------------------------------------------------------------------ escaping
@pytest.mark.parametrize("value", EVIL + ["", "plain"])
def test_cedar_string_round_trips_through_cedar(value: str) -> None:
    lit = cedar_string(value)
    assert "\n" not in lit and "\r" not in lit and all(0x20 <= ord(c) < 0x7F for c in lit)
    text = f'@id({lit}) permit (principal == Agent::{lit}, action, resource) when {{ context.method == {lit} }};'
    pol = est(text)[value]
    assert pol["principal"]["entity"]["id"] == value
    assert pol["conditions"][0]["body"]["=="]["right"]["Value"] == value
    assert len(est(cedarpy.format_policies(text, 80, 2))) == 1


def test_cedar_string_random_fuzz() -> None:
    rng = random.Random(1609)
    alphabet = ['"', "\\", "\n", "\r", "\t", "\0", "*", "/", "(", ")", ";", "@", "a", " ", "é", "\u2028", "🎉", "\x7f",
                "\x01", "{", "}", "u"]
    for _ in range(300):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        lit = cedar_string(value)
        got = est(f"@id({lit}) permit (principal, action, resource);")
        assert list(got) == [value]


@pytest.mark.parametrize("value", EVIL)
def test_comment_text_is_one_harmless_line(value: str) -> None:
    text = comment_text(value)
    assert "\n" not in text and "\r" not in text and all(0x20 <= ord(c) < 0x7F for c in text)
    assert json.loads(text) == value  # JSON-escaped when not plain
    assert comment_text("writer-bot") == "writer-bot"


def test_decimal_literals() -> None:
    from decimal import Decimal

    assert decimal_literal(Decimal("950.25")) == "950.25"
    assert decimal_literal(Decimal("1000")) == "1000.0"
    assert decimal_literal(Decimal("-3.5000")) == "-3.5"
    assert decimal_literal(Decimal("1E+3")) == "1000.0"
    assert decimal_literal(Decimal("0.12345")) is None  # more than four places: no bound
    assert decimal_literal(Decimal("1E+20")) is None  # out of Cedar's range


def test_policy_ids_are_stable_distinct_and_plain() -> None:
    assert policy_id("group", "writers", "test.order.create", None) == "suggested-writers-test.order.create"
    assert policy_id("agent", "bot", "test.item.read", "Item") == "suggested-agent:bot-test.item.read-Item"
    # lossy names keep a digest of the real name: distinct names never share an id
    a, b = policy_id("group", "a b", "x", None), policy_id("group", "a/b", "x", None)
    assert a != b and a.startswith("suggested-a_b~")
    assert policy_id("group", "a b", "x", None) == a  # stable
    # a group can never take an agent's id
    assert policy_id("group", "agent:bot", "x", None) != policy_id("agent", "bot", "x", None)


# ------------------------------------------------------------------ what is learned from
def test_learns_only_forwarded_traffic_and_says_why_not(tmp_path: Path) -> None:
    lines = [
        order("10.0"),
        order("20.0"),
        order("999.0", decision="deny", status=403, upstream_status=None,
              refusal={"kind": "policy", "title": "Denied by policy", "detail": "x"}),
        order("30.0", decision="hold", status=202, upstream_status=None,
              refusal={"kind": "approval-pending", "title": "Held", "detail": "x"}),
        order("40.0", status=429, upstream_status=None,  # allowed by policy, refused by a rate limit
              refusal={"kind": "rate-limit", "title": "Too many", "detail": "x"}),
        order("50.0", status=503, upstream_status=None),
        order("60.0", status=None, upstream_status=None),
        order("70.0", decision="deny", status=403, upstream_status=None, errors=["policy @x: overflow"]),
        order("80.0", cedar=False),
        line(action="test.nope", rtype="Order"),  # an action the schema no longer has
        {"type": "approval", "event": "requested"},  # an event line: not a decision
    ]
    result = run(tmp_path, lines)
    assert result.learned == 2
    assert dict(result.skipped) == {
        SKIP_REFUSED: 2, SKIP_REFUSED_LATER: 1, SKIP_PROCTOR_5XX: 1, SKIP_NOT_FORWARDED: 1, SKIP_ERRORS: 1,
        SKIP_NO_INPUTS: 1, SKIP_NOT_IN_SCHEMA: 1,
    }
    (permit,) = result.permits
    assert permit.observed.count == 2
    assert [b.hi for b in permit.bounds if b.path[-1] == "total"] == ["20.0"]  # never learned 999 or 80
    assert "Not learned from: " in result.text and SKIP_REFUSED in result.text


def test_monitored_traffic_is_learned_when_forwarded(tmp_path: Path) -> None:
    would_deny = {"decision": "deny", "status": 403, "kind": "policy", "title": "Denied by policy", "detail": "x",
                  "reasons": [], "forwarded": True}
    lines = [
        # an agent no permit covers, monitored: the would-be deny was forwarded
        line(agent="new-bot", groups=("newcomers",), action="test.item.read", rtype="Item", rid="1",
             decision="deny", monitor=True, monitored=would_deny),
        line(agent="new-bot", groups=("newcomers",), action="test.item.read", rtype="Item", rid="2",
             decision="deny", monitor=True, monitored=would_deny),
        # monitored, but refused afterwards by something monitor mode does not cover
        line(agent="new-bot", groups=("newcomers",), action="test.item.delete", rtype="Item", rid="3",
             decision="deny", monitor=True, monitored={**would_deny, "forwarded": False}, status=429,
             upstream_status=None, refusal={"kind": "rate-limit", "title": "Too many", "detail": "x"}),
        # a line with only the `monitor: true` flag and a forwarded would-be deny
        line(agent="new-bot", groups=("newcomers",), action="test.item.read", rtype="Item", rid="4",
             decision="deny", monitor=True),
        # in a monitored scope and allowed: learned like any allow
        line(agent="new-bot", groups=("newcomers",), action="test.item.read", rtype="Item", rid="5", monitor=True),
    ]
    result = run(tmp_path, lines)
    assert result.learned == 4
    (permit,) = result.permits
    assert permit.policy_id == "suggested-newcomers-test.item.read"
    assert dict(permit.observed.verdicts) == {"monitored:deny": 3, "allow": 1}
    assert "verdicts: allow 1, monitored, would have been deny 3" in result.text
    assert "refused by forbid policies" not in result.text  # (default denials: no permit then)
    # the permit ALLOWS what the active policies denied by default: flagged, not silently granted
    assert permit.observed.denied_unpermitted == 3
    assert permit.as_dict()["review"] is True and permit.as_dict()["monitored_denied_without_permit"] == 3
    text = result.text
    assert text.count("REVIEW: 3 of these requests were DENIED by the active policies") == 1
    assert text.index("REVIEW: 3 of these") < text.index('@id("suggested-newcomers-test.item.read")')
    assert "REVIEW: 1 permit (marked REVIEW below) allows requests the active policies DENIED" in text
    assert "REVIEW suggested-newcomers-test.item.read: allows 3 monitored request(s)" in summary(result)
    proof = result.proof
    assert proof is not None and proof.ok and proof.covered == 4
    # under enforcement with the suggestion, the monitored requests would now be allowed
    assert dict(proof.monitored_outcome) == {"allow": 3}


def test_monitored_denials_by_forbids_are_named(tmp_path: Path) -> None:
    would = {"decision": "deny", "status": 403, "kind": "policy", "title": "Denied by policy", "detail": "x",
             "reasons": ["no-item-deletes"], "forwarded": True}
    lines = [line(action="test.item.delete", rtype="Item", rid=str(i), decision="deny", reasons=["no-item-deletes"],
                  monitor=True, monitored=would) for i in range(2)]
    result = run(tmp_path, lines)
    assert "// monitored requests refused by forbid policies, which still apply: no-item-deletes (2)" in result.text
    assert result.proof is not None and dict(result.proof.monitored_outcome) == {"deny": 2}
    # still denied by the forbid with the permit: nothing newly allowed, nothing to flag
    assert "REVIEW" not in result.text and not result.permits[0].as_dict()["review"]


def test_filters_and_rotated_files(tmp_path: Path) -> None:
    lines = [
        order("10.0", time="2026-12-01T10:00:00.000Z"),
        order("20.0", agent="writer-2", time="2026-12-02T10:00:00.000Z"),
        line(agent="reader", groups=("readers",), action="test.item.read", rtype="Item", rid="9",
             time="2026-12-03T10:00:00.000Z", connector="other"),
    ]
    main = write(tmp_path, lines[:1])
    rotated = tmp_path / "decisions.jsonl.1.gz"
    with gzip.open(rotated, "wt") as f:
        f.write(json.dumps(lines[1]) + "\n" + json.dumps(lines[2]) + "\n")
    (tmp_path / "decisions.jsonl.lock").write_text("")  # not a rotated record
    paths = decision_files(main)
    assert paths == [main, rotated]
    src = policy_source(tmp_path)
    from proxy.policy.replay import parse_time

    result = suggest(paths, src, Options())
    assert result.learned == 3 and len(result.permits) == 2  # (both writers: one permit)
    only = suggest(paths, src, Options(Filters(agents=frozenset({"writer-2"}))))
    assert [p.observed.agents for p in only.permits] == [{"writer-2"}] and only.filtered_out == 2
    since = suggest(paths, src, Options(Filters(since=parse_time("2026-12-02T00:00:00Z"))))
    assert since.learned == 2
    conn = suggest(paths, src, Options(Filters(connectors=frozenset({"other"}))))
    assert [p.action for p in conn.permits] == ["test.item.read"]
    assert "agents writer-2" in only.text  # the filters are in the header


# ------------------------------------------------------------------ grouping
def test_grouping_by_group_agent_and_multi_group_agents(tmp_path: Path) -> None:
    lines = [
        # two writers create orders; one of them is also an auditor
        order("10.0", agent="w1", groups=("writers",)),
        order("12.0", agent="w2", groups=("auditors", "writers")),
        # an auditor reads items
        line(agent="w2", groups=("auditors", "writers"), action="test.item.read", rtype="Item", rid="1"),
        line(agent="a1", groups=("auditors",), action="test.item.read", rtype="Item", rid="1"),
        # an agent in no group
        line(agent="loner", groups=(), action="test.item.read", rtype="Item", rid="2"),
    ]
    result = run(tmp_path, lines)
    by_id = {p.policy_id: p for p in result.permits}
    assert set(by_id) == {"suggested-writers-test.order.create", "suggested-auditors-test.item.read",
                          "suggested-agent:loner-test.item.read"}
    assert by_id["suggested-writers-test.order.create"].observed.agents == {"w1", "w2"}
    policies = est(result.text)
    assert policies["suggested-agent:loner-test.item.read"]["principal"] == {
        "op": "==", "entity": {"type": "Agent", "id": "loner"}}
    assert policies["suggested-auditors-test.item.read"]["principal"] == {
        "op": "in", "entity": {"type": "AgentGroup", "id": "auditors"}}
    assert policies["suggested-auditors-test.item.read"]["resource"] == {"op": "is", "entity_type": "Item"}
    # the comment says who else the group grants (members seen doing other things)
    assert "also grants members seen doing other things: w1" not in result.text
    assert "group writers: agents w1, w2" in result.text

    per_agent = run(tmp_path, lines, group_by="agent")
    assert {p.policy_id for p in per_agent.permits} == {
        "suggested-agent:w1-test.order.create", "suggested-agent:w2-test.order.create",
        "suggested-agent:w2-test.item.read", "suggested-agent:a1-test.item.read",
        "suggested-agent:loner-test.item.read"}


def test_group_comment_names_members_it_also_grants(tmp_path: Path) -> None:
    lines = [order("10.0", agent="w1"), order("10.0", agent="w1"),
             line(agent="w2", action="test.item.read", rtype="Item", rid="1")]
    result = run(tmp_path, lines)
    assert "also grants members seen doing other things: w2" in when_block(result.text, "suggested-writers-test.order.create")


def when_block(text: str, pid: str) -> str:
    """The comment and the policy of one @id."""
    end = text.index(f'@id("{pid}")')
    start = text.rfind(";\n", 0, end)
    return text[start + 2 if start >= 0 else 0:text.index(";\n", end) + 1]


def test_min_count_and_no_bounds(tmp_path: Path) -> None:
    lines = [order("10.0"), order("12.0"), line(agent="r", groups=("readers",), action="test.item.read", rtype="Item")]
    result = run(tmp_path, lines, min_count=2)
    assert [p.policy_id for p in result.permits] == ["suggested-writers-test.order.create"]
    assert result.left_out == [{"id": "suggested-readers-test.item.read", "requests": 1}]
    assert "Left out (seen fewer than 2 times): suggested-readers-test.item.read (1)" in result.text
    assert result.proof is not None and result.proof.covered == 2
    bare = run(tmp_path, lines, bounds=False)
    assert all(not p.bounds for p in bare.permits) and "when" not in bare.text
    with pytest.raises(NothingToLearn, match="permits under --min-count"):
        run(tmp_path, lines, min_count=5)


def test_ids_unique_and_output_deterministic(tmp_path: Path) -> None:
    lines = [order("10.0"), order("12.0", agent="a b", groups=("a b",)), order("13.0", agent="x", groups=("a/b",)),
             line(agent="r", groups=("readers",), action="test.item.read", rtype="Item")]
    first = run(tmp_path, lines)
    second = run(tmp_path, list(reversed(lines)))
    assert first.text == second.text
    ids = [p.policy_id for p in first.permits]
    assert len(ids) == len(set(ids)) == 4
    assert set(est(first.text)) == set(ids)


# ------------------------------------------------------------------ bounds
def test_numeric_bounds_required_and_optional(tmp_path: Path) -> None:
    lines = [
        order("12.5", query_params={"dry_run": False}),
        order("950.25", query_params={"dry_run": False}),
        order("300.0", query_params={"dry_run": False}),
        order("40.0", query_params={"dry_run": False}),
    ]
    result = run(tmp_path, lines)
    pid = "suggested-writers-test.order.create"
    text = when(result.text, pid)
    assert 'context.fields.total.lessThanOrEqual(decimal("950.25"))' in text
    assert 'context.fields.total.greaterThanOrEqual(decimal("0.0"))' in text  # never negative
    assert "context.query_params.dry_run == false" in text
    assert "context has fields" in text and "context.fields has total" in text  # safe access
    assert "tenant" not in text  # path parameters name resources: never bounded
    assert "skus" not in text  # sets are not bounded
    assert "// context.fields.total: 12.5 .. 950.25; bounded 0.0 .. 950.25" in result.text
    assert "// context.fields.skus: seen; not bounded (a set)" in result.text

    # the value is absent from some requests: bounded only when present
    some = run(tmp_path, lines + [order(None), order("-5.5")])
    text = when(some.text, pid)
    assert re.search(r"if\s+context has fields &&\s+context.fields has total\s+then", text)
    assert 'greaterThanOrEqual(decimal("-5.5"))' in text  # a negative value seen: the lowest is the floor
    assert "(in 5 of 6 requests)" in some.text


def test_replayed_bounds_allow_what_was_seen_and_nothing_above(tmp_path: Path) -> None:
    lines = [order("12.5"), order("950.25"), order("300.0")]
    result = run(tmp_path, lines)
    d = tmp_path / "check"
    d.mkdir()
    shutil.copy(tmp_path / "policies" / "schema.cedarschema", d)
    (d / "suggested.cedar").write_text(result.text)
    store = PolicyStore(PolicySource(d / "schema.cedarschema", d, None))

    def verdict(total: str, agent: str = "writer-bot", groups: tuple[str, ...] = ("writers",), **kw: Any) -> str:
        rec = parse_record(order(total, agent=agent, groups=groups, **kw))
        return evaluate(store, rec)[0]  # type: ignore[arg-type]

    assert verdict("950.25") == "allow" and verdict("0.0") == "allow"
    assert verdict("950.26") == "deny"  # above the largest seen
    assert verdict("-1.0") == "deny"  # negative: never seen
    assert verdict("10.0", agent="outsider", groups=("others",)) == "deny"  # another group
    rec = parse_record(line(action="test.item.delete", rtype="Item", rid="1"))
    assert evaluate(store, rec)[0] == "deny"  # an action never seen


def test_long_bounds_and_enumerations(tmp_path: Path) -> None:
    lines = [line(action="test.mcp.create_ticket", rtype="McpTool", rid="create_ticket", fields={"priority": p},
                  rattrs={"kind": k})
             for p, k in ((1, "widget"), (3, "gadget"), (2, "widget"), (3, "gadget"))]
    # the test schema has no `kind` on McpTool: a value it does not declare is not bounded
    result = run(tmp_path, lines)
    text = when(result.text, "suggested-writers-test.mcp.create_ticket")
    assert "context.fields.priority >= 0" in text and "context.fields.priority <= 3" in text
    assert "kind" not in text
    assert "// resource.kind: \"gadget\", \"widget\"; not bounded (the schema does not declare it as string)" in result.text

    items = [line(action="test.item.read", rtype="Item", rid=str(i), rattrs={"kind": k})
             for i, k in enumerate(["widget", "gadget", "widget", "gadget"])]
    result = run(tmp_path, items)
    assert '["gadget", "widget"].contains(resource.kind)' in result.text
    assert "resource has kind" in result.text


def test_enumerations_need_repetition_and_few_values(tmp_path: Path) -> None:
    def items(kinds: list[str]) -> str:
        lines = [line(action="test.item.read", rtype="Item", rid=f"r{i}", rattrs={"kind": k}) for i, k in enumerate(kinds)]
        return run(tmp_path, lines).text

    assert "not bounded (too few requests to tell an enumeration from free text)" in items(["a", "b", "c"])
    assert "more than 5 distinct values" in items(["a", "b", "c", "d", "e", "f"] * 3)
    # identifier-shaped values, or the resource's own id, are never listed
    assert "values look like identifiers" in items(["S-100", "S-100", "S-200", "S-200"])
    lines = [line(action="test.item.read", rtype="Item", rid="blue", rattrs={"kind": "blue"})] * 4
    assert "values look like identifiers" in run(tmp_path, lines).text
    assert "not bounded (redacted in the record)" in items(["[redacted]"] * 4)


def test_hand_written_schema_types_win(tmp_path: Path) -> None:
    # the schema declares `total` as a Long (not what the record carries): no decimal bound
    src = policy_source(tmp_path, schema_patch=("fields?: { total?: decimal", "fields?: { total?: Long"))
    shutil.rmtree(src.policy_dir / "orders.cedar", ignore_errors=True)
    (src.policy_dir / "orders.cedar").unlink()
    result = run(tmp_path, [order("10.0"), order("20.0")], source=src)
    assert "lessThanOrEqual" not in result.text
    assert "not bounded (the schema does not declare it as decimal)" in result.text


# ------------------------------------------------------------------ the proof
def test_approved_holds_stay_holds_with_the_forbids(tmp_path: Path) -> None:
    hold_policy = """@id("big-orders-need-approval")
@approval("managers")
forbid (principal, action == Action::"test.order.create", resource is Order)
when { context has fields && context.fields has total && context.fields.total.greaterThan(decimal("100.0")) }
unless { context has approval };
"""
    src = policy_source(tmp_path, extra=hold_policy,
                        schema_patch=("fields?: { total?: decimal, skus?: Set<String> },",
                                      "fields?: { total?: decimal, skus?: Set<String> }, approval?: { id: String },"))
    # released after approval: decision allow, the policy's own verdict hold (docs/approvals.md)
    lines = [order("50.0"), order("500.0", policy_decision="hold", approval_id="ap-1")]
    result = run(tmp_path, lines, source=src)
    proof = result.proof
    assert proof is not None and proof.ok and proof.unchanged
    assert proof.covered == 2 and proof.kept == 2
    assert "big-orders-need-approval" in proof.forbids
    assert "approval holds (@approval) of the policy" in result.text


def test_a_forbid_added_since_is_reported_not_hidden(tmp_path: Path) -> None:
    src = policy_source(tmp_path, extra='@id("no-orders-now")\nforbid (principal, action == Action::"test.order.create", resource);\n')
    result = run(tmp_path, [order("10.0")], source=src)
    proof = result.proof
    assert proof is not None and proof.ok and not proof.unchanged
    assert [(c["was"], c["now"], c["now_reasons"]) for c in proof.changed] == [("allow", "deny", ["no-orders-now"])]


def test_others_changed_when_a_group_permit_broadens(tmp_path: Path) -> None:
    # writer-2 was denied (no permit for it then); the group permit learned from writer-bot covers it
    lines = [order("10.0"), line(agent="writer-2", action="test.item.read", rtype="Item"),
             order("10.0", agent="writer-2", decision="deny", status=403, upstream_status=None,
                   refusal={"kind": "policy", "title": "Denied", "detail": "x"})]
    result = run(tmp_path, lines)
    proof = result.proof
    assert proof is not None and proof.ok
    assert [(c["agent"], c["was"], c["now"]) for c in proof.others_changed] == [("writer-2", "deny", "allow")]


# ------------------------------------------------------------------ attacker-controlled text
def test_injection_through_ids_groups_and_values(tmp_path: Path) -> None:
    lines = []
    for i, evil in enumerate(EVIL):
        for j in range(2):
            lines.append(line(agent=f"agent {evil}", groups=(f"group {evil}",), action="test.item.read", rtype="Item",
                              rid=f"r{i}{j}", rattrs={"kind": evil}, fields={evil: evil}))
    lines.append(line(agent=EVIL[-1], groups=(), action="test.item.read", rtype="Item", rid="x"))
    result = run(tmp_path, lines, group_by="group")
    policies = est(result.text)
    assert len(policies) == len(EVIL) + 1  # exactly the permits meant: nothing injected
    assert all(p["effect"] == "permit" for p in policies.values())
    principals = {p["principal"]["entity"]["id"] for p in policies.values()}
    assert principals == {f"group {e}" for e in EVIL} | {EVIL[-1]}
    # the kinds went into Cedar as the exact strings (more than five: no enumeration across
    # groups, but each group's permit lists its one value)
    kinds = set()
    for pol in policies.values():
        for cond in pol["conditions"]:
            kinds |= set(re.findall(r'"Value": ("(?:[^"\\]|\\.)*")', json.dumps(cond)))
    assert {json.loads(k) for k in kinds} >= set(EVIL)
    # every line is a comment or Cedar the formatter wrote; no comment spans lines
    for text_line in result.text.splitlines():
        assert all(0x20 <= ord(c) < 0x7F for c in text_line), text_line
    # the validator agrees (the CLI refuses otherwise) and a re-format changes nothing
    assert cedarpy.format_policies(result.text, 80, 2) == result.text
    assert result.proof is not None and result.proof.ok and result.proof.covered == len(lines)


def test_injection_through_the_record_time(tmp_path: Path) -> None:
    evil = '2026-12-01T10:00:00Z\n@id("evil")\npermit (principal, action, resource);\n//'
    result = run(tmp_path, [order("1.0", time=evil), order("2.0", time=evil)])
    assert list(est(result.text)) == ["suggested-writers-test.order.create"]
    assert '// 2 requests, "2026-12-01T10:00:00Z\\n@id(\\"evil\\")' in result.text  # escaped, on the comment's line


def test_an_unusable_principal_is_skipped(tmp_path: Path) -> None:
    bad = line()
    bad["cedar"]["principal"]["uid"]["type"] = 'Agent") permit(principal,action,resource);//'
    lone = line(agent="\ud800")  # a lone surrogate is no Cedar string
    result = run(tmp_path, [bad, lone, order("1.0")])
    assert result.learned == 1 and result.skipped["principal or resource unusable in Cedar source"] == 2


# ------------------------------------------------------------------ empty input, the CLI's exit codes
def test_nothing_to_learn(tmp_path: Path) -> None:
    with pytest.raises(NothingToLearn, match="nothing to learn from: 0 decisions read"):
        run(tmp_path, [])
    denied = order("5.0", decision="deny", status=403, upstream_status=None,
                   refusal={"kind": "policy", "title": "Denied", "detail": "x"})
    with pytest.raises(NothingToLearn, match=f"1 {SKIP_REFUSED}"):
        run(tmp_path, [denied, {"not": "a record"}])
    with pytest.raises(SuggestInputError, match="no decision record"):
        suggest([], policy_source(tmp_path), Options())
    # every line filtered out: the message names the filters that did it
    with pytest.raises(NothingToLearn, match=re.escape("2 outside the filters (--agent invoice-bot, --connector crm)")):
        run(tmp_path, [order("1.0"), order("2.0")],
            filters=Filters(agents=frozenset({"invoice-bot"}), connectors=frozenset({"crm"})))


def cli_config(tmp_path: Path) -> Path:
    src = policy_source(tmp_path)
    (tmp_path / "connectors").mkdir(exist_ok=True)
    cfg = tmp_path / "proctor.yaml"
    cfg.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "connectors_dir": str(tmp_path / "connectors"),
        "policies": {"dir": str(src.policy_dir), "schema_from_connectors": False},
    }))
    return cfg


def test_cli_exit_codes_and_output(tmp_path: Path) -> None:
    cfg = cli_config(tmp_path)
    runner = CliRunner()
    empty = write(tmp_path, [], "empty.jsonl")
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg), "--records", str(empty)])
    assert r.exit_code == 2 and "nothing to learn from" in r.stderr and r.stdout == ""
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg)])  # the configured record does not exist
    assert r.exit_code == 2 and "no decision record" in r.stderr
    recs = write(tmp_path, [order("10.0"), order("20.0")], "d.jsonl")
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg), "--records", str(recs), "--since", "yesterday"])
    assert r.exit_code == 2 and "not a time" in r.stderr
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg), "--records", str(recs)])
    assert r.exit_code == 0, r.stderr
    assert '@id("suggested-writers-test.order.create")' in r.stdout
    assert "1 permit suggested from 2 forwarded requests" in r.stderr
    out = tmp_path / "out" / "suggested.cedar"
    out.parent.mkdir()
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg), "--records", str(recs), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["cedar"] == out.read_text()
    assert doc["policies"][0]["id"] == "suggested-writers-test.order.create"
    assert doc["policies"][0]["requests"] == 2 and doc["proof"]["ok"] is True
    assert [b["max"] for b in doc["policies"][0]["bounds"] if b["path"] == "context.fields.total"] == ["20.0"]
    # --check: exit 1 when the replay decides a recorded request otherwise
    broad = write(tmp_path, [order("10.0"), line(agent="writer-2", action="test.item.read", rtype="Item"),
                             order("10.0", agent="writer-2", decision="deny", status=403, upstream_status=None,
                                   refusal={"kind": "policy", "title": "Denied", "detail": "x"})], "b.jsonl")
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg), "--records", str(broad)])
    assert r.exit_code == 0 and "1 would change" in r.stderr
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg), "--records", str(broad), "--check"])
    assert r.exit_code == 1 and "deny -> allow" in r.stderr


def test_cli_output_starts_the_candidate_directory_and_names_missing_records(tmp_path: Path) -> None:
    """The rollout path's `-o candidate/suggested.cedar` (docs/policies.md) works in a fresh
    directory; an unwritable output and a missing configured record are errors that say which file."""
    cfg = cli_config(tmp_path)
    runner = CliRunner()
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg)])
    assert r.exit_code == 2 and f"no decision record at {tmp_path / 'state' / 'decisions.jsonl'}" in r.stderr
    recs = write(tmp_path, [order("10.0"), order("20.0")], "d.jsonl")
    out = tmp_path / "candidate" / "suggested.cedar"
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg), "--records", str(recs), "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    assert '@id("suggested-writers-test.order.create")' in out.read_text() and r.stdout == ""
    assert [p.name for p in out.parent.iterdir()] == ["suggested.cedar"]  # no temporary file left
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    r = runner.invoke(proctor_cli, ["policy", "suggest", "-c", str(cfg), "--records", str(recs),
                                    "-o", str(blocked / "suggested.cedar")])
    assert r.exit_code == 2 and f"cannot write {blocked / 'suggested.cedar'}" in r.stderr
    assert "Traceback" not in r.output

def test_has_tests_written_once_per_permit() -> None:
    from proxy.policy.suggest import FieldStats, _bound_for, conjunction

    stats = []
    for name, values in (("amount", [dec("5.0"), dec("9.5")]), ("currency", ["EUR", "EUR"]), ("note", ["a", "a"])):
        fs = FieldStats(("context", "fields", name))
        for v in values:
            fs.add(v, set())
        stats.append(fs)
    stats[2].present = 2
    bounds = [b for b in (_bound_for(fs, 2)[0] for fs in stats) if b is not None]
    text = conjunction(bounds)
    assert text.count("context has fields") == 1 and text.count("context.fields has amount") == 1
    assert text.index("context.fields has currency") < text.index('context.fields.currency == "EUR"')
    # an optional value keeps its own guard inside its `if`
    optional = FieldStats(("context", "fields", "ref"))
    optional.add("x", set())
    optional.add("x", set())
    (b, _) = _bound_for(optional, 3)
    assert b is not None and not b.required
    assert conjunction([b]) == 'if context has fields && context.fields has ref then context.fields.ref == "x" else true'.join(["(", ")"])


# ------------------------------------------------------------------ generic egress: the host is what is granted
def egress(host: str, **kw: Any) -> dict[str, Any]:
    """A generic egress request (action http.request, resource HttpHost::"<host>"): the host is the agent's."""
    rec = line(action="http.request", rtype="HttpHost", rid=host, params={}, connector="generic", host=host, **kw)
    rec["cedar"]["context"]["host"] = host
    return rec


@pytest.mark.parametrize("hosts", [
    ["api.partner.test"],  # one request: too few to "tell an enumeration", yet it must not grant every host
    [f"h{i}.attacker.test" for i in range(7)] * 2,  # more distinct hosts than an enumeration holds
    ["10.0.0.1", "h1000.attacker.test"],  # values shaped like identifiers
])
@pytest.mark.parametrize("bounds", [True, False])
def test_generic_egress_permits_name_the_hosts_seen_never_every_host(tmp_path: Path, hosts: list[str],
                                                                     bounds: bool) -> None:
    """An agent chooses the hosts of its generic egress (monitored, or under a broad permit): the
    suggestion from that traffic grants those hosts, not `resource is HttpHost` (every host), whatever
    the number of hosts or requests, --no-bounds included."""
    result = run(tmp_path, [egress(h) for h in hosts], bounds=bounds)
    (permit,) = result.permits
    assert permit.action == "http.request"
    assert [b.values for b in permit.bounds if b.path == ("resource",)] == [sorted(set(hosts))]
    text = when(result.text, permit.policy_id)
    assert "resource" in text.split("resource is HttpHost", 1)[1]  # a condition on the resource follows the scope
    d = tmp_path / "check"
    d.mkdir()
    shutil.copy(tmp_path / "policies" / "schema.cedarschema", d)
    (d / "suggested.cedar").write_text(result.text)
    store = PolicyStore(PolicySource(d / "schema.cedarschema", d, None))
    for h in set(hosts):
        assert evaluate(store, parse_record(egress(h)))[0] == "allow"
    for other in ("exfil.attacker.test", "api.partner.test.attacker.test", "169.254.169.254"):
        if other not in hosts:
            assert evaluate(store, parse_record(egress(other)))[0] == "deny", other
    assert result.proof is not None and result.proof.ok


def test_a_catch_all_mcp_tool_permit_names_the_tools_seen(tmp_path: Path) -> None:
    """`tools/call` without `tool:` (docs/connectors.md: "any other tool"): the resource is
    McpTool::"<the tool the agent named>". Learned from calls to two tools, the permit grants
    those two, never `resource is McpTool` (every tool, a delete_repo never called included)."""
    from proxy.connectors.manifest import ConnectorManifest

    manifest = ConnectorManifest.model_validate({
        "name": "testsvc", "hosts": ["127.0.0.1:8000"],
        "routes": [{"method": "POST", "path": "/mcp", "jsonrpc": [
            {"method": "tools/call", "action": "test.mcp.call", "resource": {"type": "McpTool"}}]}],
    })
    source = policy_source(tmp_path, schema_patch=(
        'action "test.mcp.list"',
        'action "test.mcp.call" appliesTo { principal: Agent, resource: McpTool, context: McpContext };\n'
        'action "test.mcp.list"'))

    def call(tool: str) -> dict[str, Any]:
        return line(action="test.mcp.call", rtype="McpTool", rid=tool, params={})

    path = write(tmp_path, [call("search"), call("search"), call("read_file")])
    result = suggest([path], source, Options(), [manifest])
    (permit,) = result.permits
    assert [b.values for b in permit.bounds if b.path == ("resource",)] == [["read_file", "search"]]
    d = tmp_path / "check"
    d.mkdir()
    shutil.copy(tmp_path / "policies" / "schema.cedarschema", d)
    (d / "suggested.cedar").write_text(result.text)
    store = PolicyStore(PolicySource(d / "schema.cedarschema", d, None))
    assert evaluate(store, parse_record(call("search")))[0] == "allow"
    assert evaluate(store, parse_record(call("delete_repo")))[0] == "deny"
    # without the manifest (no way to know the id is the tool), ids are not listed, as for any resource
    bare = suggest([path], source, Options())
    assert [b for b in bare.permits[0].bounds if b.path == ("resource",)] == []
