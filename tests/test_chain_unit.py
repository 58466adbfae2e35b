"""The stage chain with fake stages: order, short-circuit, the response phase for
refusals, fail closed on exceptions, holds and resumes, pending refusals.

No processes, no network: these run in milliseconds.
"""

from __future__ import annotations

import asyncio

import pytest

from proxy.core.chain import Chain, Stage
from proxy.core.exchange import HOLD_KIND, Exchange, ResponseSummary
from proxy.core.model import AgentRequest, Decision, Refusal


def _req(**kw) -> AgentRequest:
    base = dict(method="GET", scheme="http", host="erp.internal", port=80, path="/x", query="", headers={},
                body=b"", client_ip="127.0.0.1", mode="forward")
    base.update(kw)
    return AgentRequest(**base)


def run(coro):
    return asyncio.run(coro)


class Log(Stage):
    """Notes every hook call in a shared journal; optionally refuses, holds or raises."""

    def __init__(self, name: str, journal: list[str], *, refuse: Refusal | None = None, raise_in: str = "",
                 is_async: bool = False) -> None:
        self.name = name  # type: ignore[misc]  # instance name for the test
        self.journal = journal
        self.refusal = refuse
        self.raise_in = raise_in
        self.is_async = is_async

    def _hook(self, phase: str, ex: Exchange):
        self.journal.append(f"{phase}:{self.name}")
        if self.raise_in == phase:
            raise RuntimeError(f"{self.name} exploded in {phase}")
        if phase == "request" and self.refusal is not None:
            ex.refuse(self.refusal)

    def on_head(self, ex):
        return self._maybe_async("head", ex)

    def on_request(self, ex):
        return self._maybe_async("request", ex)

    def on_response(self, ex):
        return self._maybe_async("response", ex)

    def _maybe_async(self, phase, ex):
        if not self.is_async:
            self._hook(phase, ex)
            return None

        async def hook():
            await asyncio.sleep(0)
            self._hook(phase, ex)

        return hook()


def _full(chain: Chain, ex: Exchange) -> None:
    async def go():
        await chain.head(ex)
        if ex.refusal is None:
            await chain.request(ex)
        await chain.response(ex)

    run(go())


DENY = Refusal(403, "Denied by policy", "no", reasons=["p1"], kind="policy")


def test_request_in_order_response_in_reverse_and_allowed():
    journal: list[str] = []
    chain = Chain([Log("a", journal), Log("b", journal, is_async=True), Log("c", journal)])
    ex = Exchange(_req())
    _full(chain, ex)
    assert journal == [
        "head:a", "head:b", "head:c",
        "request:a", "request:b", "request:c",
        "response:c", "response:b", "response:a",
    ]
    assert ex.allowed and ex.decision is Decision.ALLOW and ex.decision_ms is not None
    assert set(ex.timings) == {"a", "b", "c"}


def test_a_refusal_short_circuits_the_request_phase_and_every_response_hook_still_runs():
    journal: list[str] = []
    chain = Chain([Log("record", journal), Log("auth", journal, refuse=DENY), Log("later", journal)])
    ex = Exchange(_req())
    _full(chain, ex)
    assert "request:later" not in journal
    assert journal[-3:] == ["response:later", "response:auth", "response:record"]
    assert not ex.allowed and ex.decision is Decision.DENY and ex.refusal is DENY


def test_a_refusal_in_the_head_phase_skips_the_request_phase():
    journal: list[str] = []

    class HeadRefuser(Stage):
        name = "auth"

        def on_head(self, ex):
            ex.refuse(Refusal(407, "Proxy authentication required", "no token", kind="authentication"))

    chain = Chain([Log("record", journal), HeadRefuser(), Log("later", journal)])
    ex = Exchange(_req())
    _full(chain, ex)
    assert journal == ["head:record", "response:later", "response:record"]
    assert ex.refusal is not None and ex.refusal.status == 407 and ex.decision_ms is None


@pytest.mark.parametrize("is_async", [False, True])
def test_an_exception_in_a_request_stage_fails_closed_with_503(is_async):
    journal: list[str] = []
    chain = Chain([Log("record", journal), Log("buggy", journal, raise_in="request", is_async=is_async),
                   Log("forward", journal)])
    ex = Exchange(_req())
    _full(chain, ex)
    assert "request:forward" not in journal and "response:record" in journal
    assert ex.refusal is not None and ex.refusal.status == 503 and ex.refusal.kind == "fail-closed"
    assert not ex.allowed and ex.decision is Decision.DENY
    assert any("buggy exploded" in e for e in ex.errors)


def test_an_exception_in_the_head_phase_fails_closed():
    journal: list[str] = []
    chain = Chain([Log("auth", journal, raise_in="head"), Log("next", journal)])
    ex = Exchange(_req())
    run(chain.head(ex))
    assert journal == ["head:auth"] and ex.refusal is not None and ex.refusal.status == 503


def test_an_exception_mapping_turns_a_known_failure_into_its_own_refusal():
    class StoreDown(Exception):
        pass

    class NeedsStore(Stage):
        name = "store-user"

        def on_request(self, ex):
            raise StoreDown("gone")

    def store_refusal(e, ex):
        if isinstance(e, StoreDown):
            return Refusal(503, "State store unavailable", "retry", reasons=["store-unavailable"], kind="fail-closed")
        return None

    ex = Exchange(_req())
    run(Chain([NeedsStore()], error_refusals=[store_refusal]).request(ex))
    assert ex.refusal is not None and ex.refusal.reasons == ["store-unavailable"]


def test_an_exception_in_a_response_hook_is_counted_and_the_others_still_run():
    journal: list[str] = []
    chain = Chain([Log("record", journal), Log("buggy", journal, raise_in="response"), Log("c", journal)])
    ex = Exchange(_req())
    _full(chain, ex)
    assert journal[-3:] == ["response:c", "response:buggy", "response:record"]
    assert ex.allowed  # the answer is not replaced: the upstream already acted
    assert chain.response_failures == 1 and any("buggy" in e for e in ex.errors)


def test_a_hold_ends_the_request_phase_as_a_hold():
    journal: list[str] = []
    held = Refusal(202, "Held for approval", "wait", kind=HOLD_KIND)
    chain = Chain([Log("record", journal), Log("hold", journal, refuse=held), Log("credential", journal)])
    ex = Exchange(_req())
    _full(chain, ex)
    assert "request:credential" not in journal and "response:record" in journal
    assert ex.decision is Decision.HOLD and not ex.allowed


def test_a_stage_may_wait_and_resume_the_request():
    """Sync approval: the stage awaits a decision and then lets the request go on."""
    journal: list[str] = []

    class WaitForApproval(Stage):
        name = "approval"

        def __init__(self) -> None:
            self.decided = asyncio.Event()

        async def on_request(self, ex):
            journal.append("waiting")
            await self.decided.wait()
            journal.append("resumed")

    async def go():
        waiter = WaitForApproval()
        chain = Chain([waiter, Log("credential", journal)])
        ex = Exchange(_req())
        task = asyncio.create_task(chain.request(ex))
        await asyncio.sleep(0.01)
        assert journal == ["waiting"] and not task.done()
        waiter.decided.set()
        await task
        return ex

    ex = run(go())
    assert journal == ["waiting", "resumed", "request:credential"] and ex.allowed


class SetsPending(Stage):
    name = "authorize"

    def on_request(self, ex):
        ex.pending_refusal = DENY


def test_a_pending_refusal_stops_every_stage_that_does_not_settle_it():
    journal: list[str] = []
    chain = Chain([SetsPending(), Log("credential", journal), Log("audit", journal)])
    ex = Exchange(_req())
    run(chain.request(ex))
    assert journal == [] and ex.refusal is DENY and not ex.allowed and ex.pending_refusal is None


def test_a_pending_refusal_left_by_the_last_stage_is_still_the_answer():
    ex = Exchange(_req())
    run(Chain([SetsPending()]).request(ex))
    assert ex.refusal is DENY and not ex.allowed


@pytest.mark.parametrize("verdict", ["release", "hold", "leave"])
def test_a_settling_stage_may_release_hold_or_leave_the_pending_refusal(verdict):
    journal: list[str] = []
    held = Refusal(202, "Held for approval", "wait", kind=HOLD_KIND)

    class Approval(Stage):
        name = "approval"
        settles_pending = True

        def on_request(self, ex):
            journal.append("approval")
            if verdict == "release":
                ex.settle_pending(None)
            elif verdict == "hold":
                ex.settle_pending(held)

    ex = Exchange(_req())
    run(Chain([SetsPending(), Approval(), Log("credential", journal)]).request(ex))
    if verdict == "release":
        assert journal == ["approval", "request:credential"] and ex.allowed
    elif verdict == "hold":
        assert journal == ["approval"] and ex.decision is Decision.HOLD
    else:
        assert journal == ["approval"] and ex.refusal is DENY


def test_a_refusal_and_the_decision_cannot_disagree():
    ex = Exchange(_req())
    assert ex.decision is Decision.DENY and not ex.allowed  # undecided is not allowed
    run(Chain([Log("a", [])]).request(ex))
    assert ex.decision is Decision.ALLOW
    ex.refuse(DENY)  # e.g. the credential could not be fetched after all
    assert ex.decision is Decision.DENY and not ex.allowed and not ex.decided


def test_stage_names_are_unique():
    with pytest.raises(ValueError, match="unique"):
        Chain([Log("a", []), Log("a", [])])


def test_only_overridden_hooks_are_called():
    class OnlyResponse(Stage):
        name = "observer"

        def on_response(self, ex):
            ex.response = ResponseSummary(200)

    chain = Chain([OnlyResponse()])
    assert chain._request == () and chain._head == () and len(chain._response) == 1


def test_the_plan_removes_before_it_sets():
    ex = Exchange(_req())
    ex.plan.remove("Proxy-Authorization", "Authorization")
    ex.plan.set("Authorization", "Bearer upstream")
    assert ex.plan.remove_headers == ["proxy-authorization", "authorization"]
    assert ex.plan.set_headers == {"authorization": "Bearer upstream"}
    ex.plan.remove("authorization")  # removing after setting drops the set too
    assert ex.plan.set_headers == {}


def test_the_bundled_request_path_reads_top_to_bottom():
    """The one list: observers first (their on_response runs last), then the decision, then forwarding."""
    from proxy.config import ProctorConfig
    from proxy.server import build_runtime

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        cfg = ProctorConfig.model_validate({"state_dir": str(Path(d) / "state")})
        rt = build_runtime(cfg)
        try:
            names = rt.path.requests.names
        finally:
            rt.recorder.close()
            run(rt.store.close())
    # error-format goes before authentication: a 401 on a connector's host is answered in its error shape
    first = ["metrics", "record", "error-format", "authenticate"]
    assert names[:4] == first or names[:5] == ["trace", *first]
    order = ["authenticate", "gateway-route", "suspended-agent", "target", "classify", "suspended-target", "enrich",
             "track-creator", "authorize", "approval", "credential", "audit-gate", "spend-approval"]
    assert [n for n in names if n in order] == order


def test_core_depends_on_no_feature_package():
    """proxy/core is the engine-agnostic centre: features import it, never the other way round."""
    import ast
    from pathlib import Path

    core = Path(__file__).resolve().parent.parent / "proxy" / "core"
    features = {"approvals", "audit", "connectors", "control", "engine", "governance", "identity", "observability",
                "policy", "record", "store", "demo", "server", "request_path", "cli"}
    offenders = []
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and node.module:
                top = node.module.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("proxy."):
                top = (node.module or "").split(".")[1]
            elif isinstance(node, ast.Import):
                tops = [a.name.split(".")[1] for a in node.names if a.name.startswith("proxy.")]
                offenders += [f"{path.name}: {t}" for t in tops if t in features]
                continue
            else:
                continue
            if top in features:
                offenders.append(f"{path.name}: {top}")
    assert offenders == []


def test_a_local_reply_ends_the_request_phase_allowed_but_not_forwardable():
    from proxy.core.exchange import LocalReply

    journal: list[str] = []

    class Replay(Stage):
        name = "replay"

        def on_request(self, ex):
            ex.reply_locally(LocalReply(201, {"Idempotent-Replayed": "true"}, b'{"id":"1"}', "idempotent-replay"))

    ex = Exchange(_req())
    _full(Chain([Log("record", journal), Replay(), Log("credential", journal)]), ex)
    assert "request:credential" not in journal and "response:record" in journal
    assert ex.decision is Decision.ALLOW and ex.allowed and not ex.forwardable


def test_a_refused_request_cannot_be_answered_locally():
    from proxy.core.exchange import LocalReply

    ex = Exchange(_req())
    ex.refuse(DENY)
    with pytest.raises(RuntimeError):
        ex.reply_locally(LocalReply(200, {}, b"", "x"))
    ex2 = Exchange(_req())
    ex2.pending_refusal = DENY
    with pytest.raises(RuntimeError):
        ex2.reply_locally(LocalReply(200, {}, b"", "x"))
