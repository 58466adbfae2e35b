"""Handoff declarations (manifest validation, errors naming the route) and target resolution."""

from __future__ import annotations

import pytest

from proxy.connectors.manifest import RouteSpec
from proxy.coordination.handoff import handoff_target
from proxy.coordination.handoff_spec import HandoffSpec


def route(**extra) -> dict:
    return {"method": "PATCH", "path": "/incidents/{id}", "action": "t.incident.update",
            "resource": {"type": "Incident", "id": "{id}"}, "claim": {"ttl_seconds": 60},
            "body": {"assigned_to": {"path": "assigned_to"}, "assignment_group": {"path": "group"}}, **extra}


def test_valid_handoff_declaration() -> None:
    spec = RouteSpec.model_validate(route(handoff={"to": {"agent": "assigned_to", "group": "assignment_group"},
                                                   "human_groups": ["desk"], "ttl_seconds": 30,
                                                   "human_ttl_seconds": 86400}))
    assert spec.handoff is not None and spec.handoff.is_human("desk") and not spec.handoff.is_human("bots")
    assert spec.handoff.ttl_seconds == 30 and spec.handoff.human_ttl_seconds == 86400


@pytest.mark.parametrize("handoff, message", [
    ({"to": {}}, "to needs agent or group"),
    ({"to": {"agent": "nope"}}, "to.agent names 'nope', which is neither a declared path parameter"),
    ({"to": {"group": "assignment_group"}, "extra": 1}, "Extra inputs are not permitted"),
    ({"to": {"agent": "assigned_to"}, "ttl_seconds": 0}, "greater than or equal to 1"),
    ({"to": {"agent": "assigned_to"}, "human_ttl_seconds": 31 * 24 * 3600}, "less than or equal to 2592000"),
])
def test_invalid_handoff_declarations_are_config_errors(handoff: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouteSpec.model_validate(route(handoff=handoff))


def test_handoff_needs_a_claim_and_a_write() -> None:
    no_claim = route(handoff={"to": {"agent": "assigned_to"}})
    del no_claim["claim"]
    with pytest.raises(ValueError, match="handoff on PATCH /incidents/{id}: the route needs a claim"):
        RouteSpec.model_validate(no_claim)
    with pytest.raises(ValueError, match="only writes hand off"):
        RouteSpec.model_validate({**route(handoff={"to": {"agent": "assigned_to"}}), "method": "GET", "body": {}})


def test_target_resolution() -> None:
    spec = HandoffSpec.model_validate({"to": {"agent": "a", "group": "g"}, "human_groups": ["desk"]})
    assert handoff_target(spec, {}, {"a": " bot-2 ", "g": "desk"}) == ("bot-2", False)  # the agent first
    assert handoff_target(spec, {}, {"g": "desk"}) == ("group:desk", True)  # people: their inbox
    assert handoff_target(spec, {}, {"g": "bots"}) == ("bots", False)  # another group: an agent id
    assert handoff_target(spec, {"a": "from-path"}, {}) == ("from-path", False)
    assert handoff_target(spec, {}, {"a": "", "g": 3}) is None  # names nobody
    # a value naming a pseudo-holder names nobody (it would skip human_groups)
    assert handoff_target(spec, {}, {"a": "group:desk"}) is None
    assert handoff_target(spec, {}, {"a": "human:dana"}) is None
    anyone = HandoffSpec.model_validate({"to": {"group": "g"}, "human_groups": ["*"]})
    assert handoff_target(anyone, {}, {"g": "ops"}) == ("group:ops", True)


def test_manifest_error_names_the_file_and_route(tmp_path) -> None:
    import yaml

    from proxy.connectors.manifest import ManifestError, load_manifest

    f = tmp_path / "tickets.yaml"
    f.write_text(yaml.safe_dump({"name": "tickets", "hosts": ["t.example"],
                                 "routes": [route(handoff={"to": {"group": "nope"}})]}))
    with pytest.raises(ManifestError, match=r"tickets\.yaml: invalid connector manifest:[\s\S]*"
                                            r"handoff on PATCH /incidents/\{id\}: to.group names 'nope'"):
        load_manifest(f)


@pytest.mark.parametrize("agent", ["group:desk", "human:dana"])
def test_agents_named_like_people_cannot_write_on_claim_routes(agent: str) -> None:
    """Claims handed to people are held by group:/human: pseudo-holders; an agent with such
    an id would pass for them, so its writes are refused before the store is asked."""
    import asyncio

    from proxy.coordination.claims import ClaimCheck
    from proxy.core.chain import Chain
    from test_claims_unit import _exchange

    class NoStore:
        async def claims_on(self, *a: object) -> list:
            raise AssertionError("not asked")

    from proxy.core.model import AgentIdentity

    ex = _exchange({"ttl_seconds": 60})
    ex.identity = AgentIdentity(agent, "https://idp", {}, None)
    asyncio.run(Chain([ClaimCheck(NoStore(), lambda i: [])]).request(ex))
    assert ex.refusal is not None and ex.refusal.status == 403 and ex.refusal.kind == "claim-reserved-holder"
    # reads are not writes: they pass
    read = _exchange({"ttl_seconds": 60}, method="GET")
    read.identity = AgentIdentity(agent, "https://idp", {}, None)

    class Empty:
        async def claims_on(self, *a: object) -> list:
            return []

    asyncio.run(Chain([ClaimCheck(Empty(), lambda i: [])]).request(read))
    assert read.refusal is None


def test_a_handoff_the_store_missed_is_retried_then_given_up_loudly(caplog) -> None:
    """The upstream already reassigned (2xx) when the store fails: the agent's answer is not
    held up; the move is retried in the background, and given up with an ERROR naming the fix."""
    import asyncio

    from proxy.connectors.manifest import ClaimSpec
    from proxy.coordination.claims import ClaimState
    from proxy.coordination.handoff import ClaimHandoff, _Handoff
    from proxy.store import StoreError
    from proxy.store.claims import Claim

    held = Claim("clm_a", "tickets", 'Incident::"1"', "bot-1", [], "exclusive", 0.0, 1e12, 1)

    class FlakyStore:
        def __init__(self, failures: int) -> None:
            self.failures = failures
            self.moves: list[str] = []

        async def claims_on(self, connector: str, resource: str, now: float) -> list[Claim]:
            if self.failures > 0:
                self.failures -= 1
                raise StoreError("connection refused")
            return [held]

        async def transfer_claim(self, claim_id: str, *, to: str, groups: list[str], now: float, ttl: float):
            self.moves.append(to)
            return held, Claim("clm_b", held.connector, held.resource, to, groups, "exclusive", now, now + ttl, 2)

    spec = HandoffSpec.model_validate({"to": {"agent": "a"}})
    state = ClaimState(ClaimSpec(ttl_seconds=60), "tickets", 'Incident::"1"', True, [], None)
    h = _Handoff("bot-1", "dec-1", spec, state, "bot-2", False)

    async def run(store: FlakyStore, delays: tuple[float, ...]) -> tuple[ClaimHandoff, list]:
        events: list = []
        stage = ClaimHandoff(store, events.append, retry_delays=delays)
        await stage._hand_off(h)  # returns at once: the retry runs in the background
        assert store.moves == []
        while stage._retries:
            await asyncio.sleep(0.01)
        return stage, events

    store = FlakyStore(failures=2)  # the first try and the first retry fail
    stage, events = asyncio.run(run(store, (0.01, 0.01, 0.01)))
    assert store.moves == ["bot-2"] and stage.failures == 0
    assert events[0].event == "handoff" and events[0].to == "bot-2" and events[0].decision_id == "dec-1"

    store = FlakyStore(failures=10)
    with caplog.at_level("ERROR", logger="proctor.coordination"):
        stage, events = asyncio.run(run(store, (0.01, 0.01)))
    assert store.moves == [] and events == [] and stage.failures == 1
    assert "proctor claims transfer CLAIM --to bot-2" in caplog.text and "dec-1" in caplog.text
