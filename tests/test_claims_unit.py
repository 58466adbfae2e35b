"""Claims without processes: the manifest declaration, the generated schema, the
context the check stage builds, and fail-closed behaviour when the store is down."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.connectors.manifest import ClaimSpec, ConnectorManifest, ManifestError, load_manifest
from proxy.connectors.schema_gen import generate_schema
from proxy.coordination.claims import ClaimAcquire, ClaimCheck, claim_context, conflict_refusal
from proxy.core.chain import Chain
from proxy.core.exchange import Exchange
from proxy.core.model import AgentIdentity, AgentRequest, Classification
from proxy.policy.stage import CONTEXT_EXTRA
from proxy.store import StoreError
from proxy.store.claims import Claim
from proxy.store.refusal import store_unavailable


def manifest(claim: Any, method: str = "PATCH") -> dict:
    return {"name": "svc", "hosts": ["svc.example.com"], "routes": [
        {"method": method, "path": "/tickets/{id}", "action": "svc.ticket.update",
         "resource": {"type": "Ticket", "id": "{id}"}, "claim": claim},
        {"method": "GET", "path": "/other/{id}", "action": "svc.other.read", "resource": {"type": "Other", "id": "{id}"}},
    ]}


@pytest.mark.parametrize("claim, message", [
    ({"mode": "exclusiv", "ttl_seconds": 60}, "mode"),
    ({"ttl_seconds": 0}, "ttl_seconds"),
    ({"mode": "shared"}, "ttl_seconds"),
    ({"ttl_seconds": 60, "acquire": "later"}, "acquire"),
    ({"ttl_seconds": 60, "color": "red"}, "color"),
])
def test_invalid_claim_is_a_config_error_naming_manifest_and_route(tmp_path: Path, claim: dict, message: str) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text(yaml.safe_dump(manifest(claim)))
    with pytest.raises(ManifestError) as err:
        load_manifest(path)
    text = str(err.value)
    assert str(path) in text and "route PATCH /tickets/{id}: invalid claim" in text and message in text


def test_claim_defaults() -> None:
    m = ConnectorManifest.model_validate(manifest({"ttl_seconds": 900}))
    assert m.routes[0].claim == ClaimSpec(mode="exclusive", ttl_seconds=900, acquire="implicit")
    assert m.routes[1].claim is None


def test_generated_schema_declares_context_claim_on_claim_routes_only() -> None:
    text = generate_schema([ConnectorManifest.model_validate(manifest({"ttl_seconds": 60}))])
    update = next(line for line in text.splitlines() if line.startswith("type SvcTicketUpdateContext"))
    assert "claim: { held: Bool, holder: String, holder_groups: Set<String>, mine: Bool" in update
    assert "conflict: Bool" in update and "claim?:" not in update
    other = next(line for line in text.splitlines() if line.startswith("type SvcOtherReadContext"))
    assert "claim" not in other


def _claim(holder: str, mode: str = "exclusive", exp: float = 1100.0) -> Claim:
    return Claim(f"clm_{holder}", "svc", 'Ticket::"1"', holder, ["support"], mode, 1000.0, exp, 3)


def test_claim_context_shapes() -> None:
    spec = ClaimSpec(ttl_seconds=60)
    free = claim_context([], "me", spec, True, None)
    assert free == {"held": False, "holder": "", "holder_groups": [], "mine": False, "mode": "exclusive",
                    "since": 0, "expires_at": 0, "write": True, "conflict": False}
    theirs = _claim("bob")
    ctx = claim_context([theirs], "me", spec, True, theirs)
    assert ctx["held"] and ctx["holder"] == "bob" and ctx["holder_groups"] == ["support"] and not ctx["mine"]
    assert ctx["conflict"] and ctx["expires_at"] == 1100
    mine = claim_context([_claim("me")], "me", spec, False, None)
    assert mine["mine"] and mine["holder"] == "me" and not mine["conflict"] and not mine["write"]


def test_conflict_refusal_fields() -> None:
    r = conflict_refusal(_claim("bob", exp=1100.4), 1000.0, ["claim-held-by-another-agent"])
    assert r.status == 409 and r.kind == "claim-conflict" and r.headers == {"Retry-After": "101"}
    assert r.extra["claim"]["holder"] == "bob" and r.extra["claim"]["until"] == "1970-01-01T00:18:20Z"
    assert r.reasons == ["claim-held-by-another-agent"] and "bob" in r.detail


class DownStore:
    calls = 0

    async def claims_on(self, *a: Any) -> list[Claim]:
        self.calls += 1
        raise StoreError("state store: claims_on failed: connection refused")

    async def acquire_claim(self, **kw: Any) -> Any:
        self.calls += 1
        raise StoreError("state store: acquire_claim failed: connection refused")


def _exchange(spec: Any, method: str = "PATCH") -> Exchange:
    req = AgentRequest(method=method, scheme="http", host="svc.example.com", port=80, path="/tickets/1", query="",
                       headers={}, body=b"", client_ip="127.0.0.1", mode="forward")
    ex = Exchange(req)
    ex.identity = AgentIdentity("me", "https://idp", {}, None)
    route = ConnectorManifest.model_validate(manifest(spec)).routes[0] if spec else None
    ex.classification = Classification("svc", "svc.ticket.update", "Ticket", "1", spec=route)
    return ex


def test_store_down_fails_closed_on_claim_routes_only() -> None:
    store = DownStore()
    chain = Chain([ClaimCheck(store, lambda i: [])], error_refusals=[store_unavailable])
    ex = _exchange({"ttl_seconds": 60})
    asyncio.run(chain.request(ex))
    assert ex.refusal is not None and ex.refusal.status == 503 and not ex.allowed
    # a route without a claim never asks the store
    plain = _exchange(None)
    asyncio.run(chain.request(plain))
    assert plain.allowed and store.calls == 1 and CONTEXT_EXTRA not in plain.stage_data
    # the acquisition failing is a 503 too, never a forwarded write
    class CheckOnly:
        async def claims_on(self, *a: Any) -> list[Claim]:
            return []
    chain = Chain([ClaimCheck(CheckOnly(), lambda i: []), ClaimAcquire(store)], error_refusals=[store_unavailable])
    ex = _exchange({"ttl_seconds": 60})
    asyncio.run(chain.request(ex))
    assert ex.refusal is not None and ex.refusal.status == 503
    assert ex.stage_data[CONTEXT_EXTRA]["claim"]["held"] is False


def test_two_writers_past_the_check_the_store_lets_one_through(tmp_path: Path) -> None:
    """Both requests read a free resource before either acquires (the race the pre-check
    cannot see): the acquisition in the store forwards exactly one, the other gets the 409."""
    from proxy.store import open_store

    async def main() -> None:
        store = open_store(f"sqlite://{tmp_path / 'proctor.db'}")
        await store.open()
        try:
            check, acquire = ClaimCheck(store, lambda i: ["support"]), ClaimAcquire(store)
            a, b = _exchange({"ttl_seconds": 60}), _exchange({"ttl_seconds": 60})
            b.identity = AgentIdentity("other", "https://idp", {}, None)
            await check.on_request(a)
            await check.on_request(b)
            assert not a.stage_data[CONTEXT_EXTRA]["claim"]["held"] and not b.stage_data[CONTEXT_EXTRA]["claim"]["held"]
            await acquire.on_request(a)
            await acquire.on_request(b)
            assert a.refusal is None and a.plan.response_headers["Proctor-Claim"].startswith("clm_")
            assert b.refusal is not None and b.refusal.status == 409 and b.refusal.reasons == []
            assert b.refusal.extra["claim"]["holder"] == "me" and "lost the race" in b.refusal.detail
            # the holder's next write renews; the other agent's pre-check now sees the conflict
            again, late = _exchange({"ttl_seconds": 60}), _exchange({"ttl_seconds": 60})
            late.identity = AgentIdentity("other", "https://idp", {}, None)
            await check.on_request(again)
            await check.on_request(late)
            assert again.stage_data[CONTEXT_EXTRA]["claim"]["mine"]
            assert late.stage_data[CONTEXT_EXTRA]["claim"]["conflict"]
            assert late.stage_data[CONTEXT_EXTRA]["claim"]["holder_groups"] == ["support"]
        finally:
            await store.close()

    asyncio.run(main())


def test_bundled_policies_validate_with_a_claim_bearing_bundled_route(tmp_path: Path) -> None:
    """The bundled set (its conflict rule included) with the bundled connectors, one of whose
    write routes declares a claim: it loads, and a policy on context.claim of that action validates;
    on an action without claims, context.claim is a validation error (so typos are caught)."""
    from proxy.config import DEFAULTS_DIR
    from proxy.connectors.manifest import load_manifests
    from proxy.policy.engine import PolicyLoadError, PolicySource, load_bundle

    manifests = load_manifests(DEFAULTS_DIR / "connectors")
    ticketing = next(m for m in manifests if m.name == "ticketing")
    updates = [r for r in ticketing.routes if r.action == "ticketing.incident.update"]
    for route in updates:  # every route of the action: context.claim is then always there (not optional)
        route.claim = ClaimSpec(ttl_seconds=900)
    pdir = tmp_path / "policies"
    pdir.mkdir()
    for f in (DEFAULTS_DIR / "policies").glob("*.ced*"):
        (pdir / f.name).write_text(f.read_text())
    (pdir / "extra.cedar").write_text(
        '@id("no-writes-through-claims-on-critical")\n'
        'forbid (principal, action == Action::"ticketing.incident.update", resource)\n'
        'when { context.claim.held && !context.claim.mine && context.risk == "critical" };\n')
    bundle = load_bundle(PolicySource(pdir / "schema.cedarschema", pdir, None, tuple(manifests)))
    assert {"claim-held-by-another-agent", "no-writes-through-claims-on-critical"} <= set(bundle.policies)
    assert bundle.policies["claim-held-by-another-agent"].annotations.get("claim") == "conflict"
    (pdir / "extra.cedar").write_text(
        '@id("typo")\nforbid (principal, action == Action::"ticketing.incident.read", resource)\n'
        'when { context.claim.held };\n')
    with pytest.raises(PolicyLoadError):
        load_bundle(PolicySource(pdir / "schema.cedarschema", pdir, None, tuple(manifests)))


def test_a_claim_taken_by_a_write_refused_later_is_given_back(tmp_path: Path) -> None:
    """A stage after the acquisition refuses (the audit gate): the write was not forwarded, so
    the claim it newly took is released; a forwarded write keeps its claim."""
    from proxy.core.chain import Stage
    from proxy.core.model import Refusal
    from proxy.store import open_store

    class Gate(Stage):
        name = "audit-gate"
        closed = True

        def on_request(self, ex: Exchange) -> None:
            if self.closed:
                ex.refuse(Refusal(503, "Audit unavailable", "closed", kind="fail-closed"))

    async def main() -> None:
        store = open_store(f"sqlite://{tmp_path / 'proctor.db'}")
        await store.open()
        try:
            gate = Gate()
            chain = Chain([ClaimCheck(store, lambda i: []), ClaimAcquire(store), gate],
                          error_refusals=[store_unavailable])
            refused = _exchange({"ttl_seconds": 60})
            await chain.request(refused)
            assert refused.refusal is not None and refused.refusal.status == 503
            await chain.response(refused)
            assert await store.list_claims(0.0) == []
            gate.closed = False
            ok = _exchange({"ttl_seconds": 60})
            await chain.request(ok)
            await chain.response(ok)
            assert ok.allowed and [c.holder for c in await store.list_claims(0.0)] == ["me"]
        finally:
            await store.close()

    asyncio.run(main())


def test_holder_renewal_takes_the_one_statement_path() -> None:
    """A write by the claim's holder renews with `renew_claim` (one statement); only when that
    finds nothing (expired, transferred meanwhile) does it take the full acquire transaction."""
    from proxy.store.claims import ClaimOutcome

    mine = _claim("me")

    class CountingStore:
        def __init__(self, renew_finds: bool) -> None:
            self.renew_finds = renew_finds
            self.calls: list[str] = []

        async def claims_on(self, *a: Any) -> list[Claim]:
            self.calls.append("claims_on")
            return [mine]

        async def renew_claim(self, claim_id: str, **kw: Any) -> Claim | None:
            self.calls.append("renew_claim")
            assert claim_id == mine.id and kw["agent"] == "me" and kw["ttl"] == 60.0
            return mine if self.renew_finds else None

        async def acquire_claim(self, **kw: Any) -> ClaimOutcome:
            self.calls.append("acquire_claim")
            return ClaimOutcome(True, mine, renewed=True)

    for finds, calls in ((True, ["claims_on", "renew_claim"]),
                         (False, ["claims_on", "renew_claim", "acquire_claim"])):
        store = CountingStore(finds)
        chain = Chain([ClaimCheck(store, lambda i: [], clock=lambda: 1000.0),
                       ClaimAcquire(store, clock=lambda: 1000.0)])
        ex = _exchange({"ttl_seconds": 60})
        asyncio.run(chain.request(ex))
        assert ex.allowed and store.calls == calls and mine.id in ex.plan.response_headers["Proctor-Claim"]
