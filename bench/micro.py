"""Per-stage micro-benchmark of Proctor's decision path, in-process.

Builds the same deployment bench/run.py benchmarks (500 generated policies,
ES256 issuer, `bench` connector), wires it with `proxy.server.build_runtime`
(the exact objects `proctor run` uses), and times each stage of one allowed
request in a tight loop: microseconds per call, best of several repeats. No
network and no mitmproxy event loop are involved, so this is the floor of
Proctor's own cost per request.

It also times Cedar authorization against two reduced policy sets, to show how
the cost scales with the number of policies Cedar has to look at:
- "action-partitioned": only the policies whose action scope can match the
  request's action (== it, `in [...]` containing it, or unscoped) -- what a
  per-action index of the policy set would hand to Cedar;
- "bench policies only": the two bench policies;
- the same with an empty context, which isolates the cost of converting
  Proctor's request context (nested records, `datetime` and `ip` extension
  values) inside cedarpy/Cedar.

    python bench/micro.py [--policies 500]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import cedarpy  # noqa: E402 (after the path setup above)
import proctor_env  # noqa: E402

UPSTREAM_PORT = 18999  # only named in the connector manifest; nothing listens


def _time(fn: Callable[[], Any], budget_s: float = 0.25, repeats: int = 3) -> float:
    """Best-of-`repeats` mean time per call in microseconds."""
    n = 1
    while True:  # calibrate: enough calls for ~budget_s/repeats
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= budget_s / repeats / 4 or n >= 1 << 20:
            break
        n *= 2
    n = max(1, int(n * (budget_s / repeats) / max(dt, 1e-9)))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def _filtered_policy_set(policies_dir: Path, action: str, only_ids: set[str] | None = None):
    """A PolicySet of the policies whose action scope can match `action` (or those with @id in only_ids)."""
    texts = [p.read_text() for p in sorted(policies_dir.glob("*.cedar"))]
    est = json.loads(cedarpy.policies_to_json_str("\n".join(texts)))
    keep = {}
    for pid, pol in est["staticPolicies"].items():
        if only_ids is not None:
            if pol.get("annotations", {}).get("id") in only_ids:
                keep[pid] = pol
            continue
        scope = pol["action"]
        op = scope["op"]
        if (
            op == "All"
            or (op == "==" and scope["entity"]["id"] == action)
            or (op == "in" and any(e["id"] == action for e in scope.get("entities", [scope.get("entity", {})])))
        ):
            keep[pid] = pol
    text = cedarpy.policies_from_json_str(json.dumps({"staticPolicies": keep, "templates": {}, "templateLinks": []}))
    return cedarpy.PolicySet.from_str(text), len(keep)


def _flow(target_port: int, token: str):
    from mitmproxy import http
    from mitmproxy.test import tflow

    f = tflow.tflow()
    f.request = http.Request.make(
        "GET",
        f"http://127.0.0.1:{target_port}/items/1",
        headers={
            "Host": f"127.0.0.1:{target_port}",
            "User-Agent": "proctor-bench/micro",
            "Accept": "*/*",
            "Proxy-Authorization": f"Bearer {token}",
        },
    )
    f.request.host_header = f"127.0.0.1:{target_port}"
    return f


def run_micro(policy_count: int = 500, budget_s: float = 0.25, profile: bool = True) -> dict:
    from proxy.config import load_config
    from proxy.connectors.classifier import Classifier  # noqa: F401  (import cost outside timing)
    from proxy.core.context import (
        parse_json_body,
        principal_entity,
        request_context,
        resource_entity,
    )
    from proxy.audit.ocsf import to_ocsf
    from proxy.core.exchange import Exchange, ResponseSummary, new_decision_id
    from proxy.record.model import DecisionRecord, parse_line
    from proxy.server import build_runtime

    with tempfile.TemporaryDirectory(prefix="proctor-micro-") as tmp:
        env = proctor_env.build(Path(tmp), UPSTREAM_PORT, 18998, 18997, policy_count)
        config = load_config(str(env.config_path))
        rt = build_runtime(config)
        chain, addon, policies = rt.path.requests, rt.addon, rt.policies
        authenticator = rt.path.stage("authenticate").authenticator  # type: ignore[attr-defined]
        classifier = rt.path.stage("classify").classifier  # type: ignore[attr-defined]
        record_stage = rt.path.stage("record")
        with_inputs = record_stage.with_inputs  # type: ignore[attr-defined]
        loop = asyncio.new_event_loop()

        async def decide(req):
            # what an engine adapter does before forwarding: the head phase, then the request phase
            ex = Exchange(req)
            await chain.head(ex)
            await chain.request(ex)
            return ex

        flow = _flow(UPSTREAM_PORT, env.token)
        req = addon._agent_request(flow, False)
        outcome = loop.run_until_complete(decide(req))
        assert outcome.allowed, f"micro-benchmark request was refused: {outcome.refusal}"
        outcome.response = ResponseSummary(200, 200)  # as recorded after the upstream answered
        identity = outcome.identity
        cls = outcome.classification
        settings = config.identity_settings()
        limits = config.limits
        bundle = policies.bundle

        def run_coro(coro_fn):
            def f():
                c = coro_fn()
                try:
                    c.send(None)
                except StopIteration:
                    return
                raise RuntimeError("coroutine suspended; the micro-benchmark expects a synchronous path")

            return f

        principal = principal_entity(identity, settings.principal)
        resource = resource_entity(cls)
        context = request_context(req, cls, None, limits.context_headers, now=time.time())
        entities = bundle.entities.with_added_json_str(json.dumps([principal, resource]))
        cedar_request = {
            "principal": principal["uid"],
            "action": {"type": "Action", "id": cls.action},
            "resource": resource["uid"],
            "context": context,
        }
        principal_base = bundle.entities.with_added_json_str(json.dumps([principal]))  # as if cached per identity
        part_set, part_n = _filtered_policy_set(env.policies_dir, cls.action)
        tiny_set, tiny_n = _filtered_policy_set(env.policies_dir, cls.action, {"bench-read-items", "bench-no-item-deletes"})
        for ps in (part_set, tiny_set):
            r = cedarpy.is_authorized(cedar_request, ps, entities)
            assert r.decision == cedarpy.Decision.Allow, r

        rec_outcome = outcome
        rec_record = DecisionRecord.from_exchange(rec_outcome, with_inputs)
        rec_line = rec_record.line()

        stages: list[tuple[str, str, Callable[[], Any]]] = [
            ("adapter", "flow -> AgentRequest (ProctorAddon._agent_request)", lambda: addon._agent_request(flow, False)),
            ("auth", "authenticate: credential + JWT cache hit", run_coro(lambda: authenticator.authenticate(req))),
            ("classify", "classify (connector route match)", lambda: classifier.classify(req.method, req.host, req.port, req.path)),
            ("body", "parse_json_body (no body)", lambda: parse_json_body(req, limits.max_json_depth)),
            (
                "context",
                "principal + resource + context dicts",
                lambda: (
                    principal_entity(identity, settings.principal),
                    resource_entity(cls),
                    request_context(req, cls, None, limits.context_headers, now=1_800_000_000.0),
                ),
            ),
            (
                "authorize",
                f"PolicyStore.authorize ({bundle.policy_count} policies: action part, pruned context, cached entities)",
                lambda: policies.authorize(principal, cls.action, resource, context, [principal, resource], bundle=bundle),
            ),
            (
                "authorize.entities",
                "reference: uncached entities delta (json.dumps + with_added_json_str)",
                lambda: bundle.entities.with_added_json_str(json.dumps([principal, resource])),
            ),
            (
                "authorize.cedar",
                f"reference: cedarpy.is_authorized, whole {bundle.policy_count}-policy set, full context",
                lambda: cedarpy.is_authorized(cedar_request, bundle.policy_set, entities),
            ),
            (
                "entities.cached_principal",
                "entities delta alternative: resource only, onto a cached principal handle",
                lambda: principal_base.with_added_json_str(json.dumps([resource])),
            ),
            (
                "cedar.partitioned",
                f"reference: cedarpy.is_authorized, action part only ({part_n} policies), full context",
                lambda: cedarpy.is_authorized(cedar_request, part_set, entities),
            ),
            (
                "cedar.tiny",
                f"reference: cedarpy.is_authorized, bench policies only ({tiny_n} policies)",
                lambda: cedarpy.is_authorized(cedar_request, tiny_set, entities),
            ),
            (
                "cedar.tiny.noctx",
                "reference: cedarpy.is_authorized, bench policies only, empty context",
                lambda: cedarpy.is_authorized(dict(cedar_request, context={}), tiny_set, entities),
            ),
            ("decision_id", "new_decision_id", new_decision_id),
            (
                "record.build",
                "decision record: the typed record from the exchange (no validation)",
                lambda: DecisionRecord.from_exchange(rec_outcome, with_inputs),
            ),
            (
                "record.line",
                "decision record: build + serialise the line",
                lambda: DecisionRecord.from_exchange(rec_outcome, with_inputs).line(),
            ),
            (
                "record",
                "record stage: build, redact, serialise, write(2), and the OCSF audit event (redacted, chained, queued)",
                lambda: record_stage.on_response(rec_outcome),
            ),
            (
                "record.ocsf",
                "reference: the record as an OCSF event (not redacted or chained here)",
                lambda: to_ocsf(rec_record),
            ),
            (
                "record.parse",
                "reference: a line read back (validated; replay, explain)",
                lambda: parse_line(rec_line),
            ),
            ("decide", "chain head + request phases (all request stages, end to end)", run_coro(lambda: decide(req))),
        ]
        results = []
        for key, label, fn in stages:
            fn()  # warm
            results.append({"key": key, "stage": label, "us": round(_time(fn, budget_s), 2)})

        prof_rows: list[dict] = []
        if profile:
            decide_once = run_coro(lambda: decide(req))
            pr = cProfile.Profile()
            n = 2000
            pr.enable()
            for _ in range(n):
                decide_once()
            pr.disable()
            st = pstats.Stats(pr, stream=io.StringIO())
            total = st.total_tt  # type: ignore[attr-defined]
            for (file, line, func), (_cc, nc, tt, _ct, _callers) in sorted(
                st.stats.items(), key=lambda kv: -kv[1][2]  # type: ignore[attr-defined]
            )[:12]:
                prof_rows.append(
                    {
                        "function": f"{Path(file).name}:{line}({func})" if line else func,
                        "self_share": round(tt / total * 100, 1) if total else 0.0,
                        "calls_per_decision": round(nc / n, 2),
                    }
                )
        rt.recorder.close()
        loop.close()
        return {
            "policies": bundle.policy_count,
            "partitioned_policies": part_n,
            "stages": results,
            "cprofile_decide_top": prof_rows,
        }


def format_table(m: dict) -> str:
    lines = ["| stage | µs per call |", "|---|---:|"]
    for r in m["stages"]:
        lines.append(f"| {r['stage']} | {r['us']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", type=int, default=500)
    ap.add_argument("--budget", type=float, default=0.25, help="seconds of timing per stage")
    a = ap.parse_args()
    m = run_micro(a.policies, a.budget)
    print(format_table(m))
    print()
    for r in m["cprofile_decide_top"]:
        print(f"{r['self_share']:5.1f}%  {r['calls_per_decision']:5.2f}/decision  {r['function']}")
