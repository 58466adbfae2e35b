"""What `/healthz` and `/readyz` report: each component's state, and whether Proctor is ready.

Ready means every part a request needs is up:

- **listeners**: every agent-facing listener (forward proxy, gateway) is bound, and
  Proctor is not shutting down (from the first SIGTERM on, /readyz is 503 at once so
  load balancers stop sending: proxy/shutdown.py);
- **store**: open, still the store it opened, answering its checks, and the
  kill switch's suspension set read from it since any trouble;
- **policies**: a policy set is loaded (a rejected reload keeps the last good
  set: still ready, reported as degraded);
- **audit**: no sink whose overflow policy holds or refuses requests
  (`fail_closed`, `block`) is unhealthy, i.e. the audit gate would admit writes;
- **workload_identity** (transparent mode only): the token file holds a valid,
  unexpired token, so redirected requests are attributed (otherwise every one of
  them is refused 503: docs/transparent.md).

Identity (JWKS keys per issuer) is reported but does not decide readiness: a
JWKS URL is fetched on the first token, and an issuer without keys refuses its
own agents (503) without affecting the others.

Counters (rate limits and budgets in Redis, `counters.backend: redis`) are pinged
and reported (`down` when Redis does not answer) but do not decide readiness
either: every replica shares that Redis, so taking them all out of service would
turn refusals on limited routes (each limit fails open or closed per its
`on_unavailable`) into an outage of every route. The store backend's counters are
the store, which readiness covers already.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..server import ProctorRuntime


@dataclass
class Component:
    status: str  # ok | degraded | down | disabled
    detail: dict[str, Any] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)  # why it keeps Proctor from being ready

    def as_dict(self) -> dict[str, Any]:
        return {"status": self.status, **self.detail, **({"reasons": self.reasons} if self.reasons else {})}


def listeners_component(runtime: "ProctorRuntime") -> Component:
    watch = runtime.listeners
    if watch is None:
        return Component("down", {"listeners": []}, ["the proxy engine is not running"])
    states = watch.states()
    shutdown = runtime.shutdown
    if shutdown is not None and shutdown.draining:
        return Component("down", {"listeners": [s.as_dict() for s in states], "shutting_down": True},
                         [f"shutting down: new requests are refused; open ones have "
                          f"{shutdown.remaining():.1f} s left to finish"])
    reasons = [f"listener {s.name} ({s.address}) is not listening: {s.error}" for s in states if not s.up]
    if not runtime.addon.running_event_seen and not reasons:
        reasons.append("the proxy engine is not running yet")
    return Component("down" if reasons else "ok", {"listeners": [s.as_dict() for s in states]}, reasons)


def store_component(runtime: "ProctorRuntime") -> Component:
    store = runtime.store
    detail: dict[str, Any] = {
        "backend": store.kind,
        "location": store.location,
        "store_id": store.identity.store_id if store.identity else None,
        "last_check": store.last_check,
    }
    events = runtime.events
    if events is not None:  # cross-replica wake-ups (proxy/store/events.py): informational
        detail["events"] = {"shared": events.shared, "listening": events.connected, "received": events.received,
                            "published": events.published}
    if store.identity is None:
        return Component("down", detail, ["the state store is not open"])
    if store.lost is not None:
        return Component("down", {**detail, "lost": True}, [f"state store lost: {store.lost}"])
    if store.problem is not None:
        return Component("down", detail, [f"state store unavailable: {store.problem}"])
    stale = runtime.governance.stale_reason if runtime.governance is not None else None
    if stale is not None:
        return Component("down", detail, [stale])
    return Component("ok", detail)


def policies_component(runtime: "ProctorRuntime") -> Component:
    bundle = runtime.policies.bundle
    status = runtime.policies.status
    if bundle is None:
        return Component("down", {}, ["no policy set is loaded"])
    detail = {"revision": bundle.revision, "policy_count": bundle.policy_count, "reload_ok": status.ok}
    # a rejected reload keeps enforcing the last good set: degraded, not down
    return Component("ok" if status.ok else "degraded", detail)


def audit_component(runtime: "ProctorRuntime") -> Component:
    trail = runtime.audit
    if trail is None:
        return Component("disabled")
    sinks, reasons = [], []
    for sink in trail.sinks:
        healthy = bool(sink.healthy)
        sinks.append({"name": sink.name, "overflow": sink.overflow, "healthy": healthy, "queue_depth": sink.queue_depth})
        if not healthy and sink.overflow in ("fail_closed", "block"):
            reasons.append(
                f"audit sink {sink.name!r} cannot take events (overflow {sink.overflow}: requests are held or refused)"
            )
    status = "down" if reasons else ("ok" if all(s["healthy"] for s in sinks) else "degraded")
    return Component(status, {"sinks": sinks}, reasons)


def identity_component(runtime: "ProctorRuntime") -> Component:
    # Informational: the key count each issuer holds right now (a JWKS URL is fetched lazily).
    issuers = []
    for name, issuer in getattr(runtime.verifier, "_issuers", {}).items():
        keys = getattr(issuer.keys, "_keys", None)
        issuers.append({"issuer": name, "keys": None if keys is None else len(keys)})
    return Component("ok", {"issuers": issuers})


def workload_component(runtime: "ProctorRuntime") -> Component:
    """Transparent mode's workload identity: agent, expiry, last reload, error (never the token)."""
    workload = runtime.workload
    if workload is None:
        return Component("disabled")
    status = workload.status()
    error = status["error"]
    return Component("down" if error else "ok", status, [error] if error else [])


async def counters_component(runtime: "ProctorRuntime") -> Component:
    """Where rate-limit counters and budget ledgers live, and whether Redis answers a ping."""
    users = [name for name, part in (("rate_limits", runtime.rate_limits), ("budgets", runtime.budgets))
             if part is not None]
    if not users:
        return Component("disabled")
    backend = runtime.rate_limits.counters if runtime.rate_limits is not None else runtime.budgets.ledger  # type: ignore[union-attr]
    detail: dict[str, Any] = {"backend": getattr(backend, "backend", "?"), "used_by": users}
    ping = getattr(backend, "ping", None)
    if ping is None:
        return Component("ok", detail)
    try:
        await ping()
    except Exception as e:  # noqa: BLE001 - CounterUnavailable (or anything a broken client raises): reported
        return Component("down", {**detail, "error": str(e)})
    return Component("ok", detail)


def health(runtime: "ProctorRuntime") -> dict[str, Component]:
    return {
        "listeners": listeners_component(runtime),
        "store": store_component(runtime),
        "policies": policies_component(runtime),
        "audit": audit_component(runtime),
        "identity": identity_component(runtime),
        "workload_identity": workload_component(runtime),
    }


def not_ready_reasons(components: dict[str, Component]) -> list[str]:
    return [r for c in components.values() for r in c.reasons]
