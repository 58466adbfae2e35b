"""Control API (aiohttp) on the control port: health, readiness, policy status, reload.

Health and readiness are computed by control/health.py.

Issue-scoped for now: later capabilities (approvals, agents, metrics) mount
their routes on the same application.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__
from ..policy.revisions import record_revision
from ..store import StoreError
from .activity_api import add_activity_routes
from .explain_api import add_explain_routes
from .approvals_api import add_approval_routes
from .budgets_api import add_budget_routes
from .auth import problem
from .claims_api import add_claim_routes
from .duplicates_api import add_duplicate_routes
from .rate_limits_api import add_rate_limit_routes
from .workflows_api import add_workflow_routes
from .workflow_inbox_api import add_workflow_inbox_routes
from .workflow_export_api import add_workflow_export_routes
from .governance_api import add_governance_routes
from .health import counters_component, health, not_ready_reasons
from .console_routes import add_console_routes
from .openapi import add_openapi_route

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")


def build_app(runtime: "ProctorRuntime") -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    started = time.time()

    async def healthz(_: web.Request) -> web.Response:
        """Liveness (always 200 while the process answers), the policy reload status and
        every component's state; `status` is degraded whenever one is not ok."""
        status = runtime.policies.status
        components = health(runtime)
        reasons = not_ready_reasons(components)
        components["counters"] = await counters_component(runtime)  # (informational: see health.py)
        all_ok = status.ok and all(c.status in ("ok", "disabled") for c in components.values())
        body = {
            "status": "ok" if all_ok else "degraded",
            "version": __version__,
            "uptime_seconds": round(time.time() - started, 1),
            "policy": status.as_dict(),
            "engine_running": runtime.addon.running_event_seen,
            "ready": not reasons,
            "monitor": runtime.monitor.describe(),  # monitor mode: where policies are not enforced
            "components": {name: c.as_dict() for name, c in components.items()},
        }
        return web.json_response(body, status=200)

    async def readyz(_: web.Request) -> web.Response:
        """200 only while every required part is up; else 503 with the reasons."""
        reasons = not_ready_reasons(health(runtime))
        return web.json_response({"ready": not reasons, "reasons": reasons}, status=503 if reasons else 200)

    async def policy_status(_: web.Request) -> web.Response:
        b = runtime.policies.bundle
        return web.json_response(
            {
                "active_revision": b.revision,
                "policy_count": b.policy_count,
                "loaded_at": b.loaded_at,
                "files": list(b.files),
                "reload": runtime.policies.status.as_dict(),
                "shadow": runtime.shadow.status() if runtime.shadow else None,
                "fleet": await fleet_status(),
            }
        )

    async def fleet_status() -> dict[str, Any] | None:
        """The fleet's active revision and each replica's (None when the store cannot say)."""
        fleet = runtime.fleet
        if fleet is None:
            return None
        try:
            active, replicas = await fleet.replicas()
        except StoreError as e:
            log.warning("fleet policy status: %s", e)
            return None
        return {
            "source": fleet.mode, "replica_id": fleet.replica_id, "active_revision": active,
            "following": fleet.following, "error": fleet.follow_error,
            "disagreeing": [r.replica_id for r in replicas if not r.agrees],
            "replicas": [{"replica_id": r.replica_id, "hostname": r.hostname, "policy_source": r.policy_source,
                          "revision": r.revision, "following": r.following, "reload_ok": r.reload_ok,
                          "last_seen": r.last_seen, "agrees": r.agrees} for r in replicas],
        }

    async def policy_reload(request: web.Request) -> web.Response:
        if request.remote not in ("127.0.0.1", "::1"):
            return problem(403, "Forbidden", "reload is loopback-only")
        async with runtime.policy_lock:
            before = runtime.policies.bundle.revision
            ok = await asyncio.to_thread(runtime.policies.reload)
            if ok and runtime.policies.bundle.revision != before:
                await record_revision(runtime.store, runtime.policies.bundle)
        return web.json_response(
            {"reloaded": ok, "active_revision": runtime.policies.bundle.revision, "reload": runtime.policies.status.as_dict()},
            status=200 if ok else 422,
        )

    async def stats(_: web.Request) -> web.Response:
        return web.json_response({"engine": runtime.stats(), "records_written": runtime.recorder.written})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/policies", policy_status)
    app.router.add_post("/v1/policies/reload", policy_reload)
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(runtime.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/metrics", metrics)
    if runtime.approvals is not None:
        add_approval_routes(app, runtime)
    if runtime.governance is not None:
        add_governance_routes(app, runtime)
    add_claim_routes(app, runtime)
    add_duplicate_routes(app, runtime)
    add_rate_limit_routes(app, runtime)
    add_budget_routes(app, runtime)
    add_workflow_routes(app, runtime)
    add_workflow_inbox_routes(app, runtime)
    add_workflow_export_routes(app, runtime)
    add_activity_routes(app, runtime)
    add_explain_routes(app, runtime)
    add_openapi_route(app)
    add_console_routes(app)
    return app
