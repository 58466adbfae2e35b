"""Wire the pieces together and run: `proctor run`.

One asyncio loop hosts mitmproxy (agent listeners), the aiohttp gateway
listener when `gateway.engine` is `aiohttp`, the control API and the policy
hot-reload watcher.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from dataclasses import dataclass, field

from aiohttp import web
from mitmproxy import options as mitm_options
from mitmproxy.addons import core, disable_h2c, next_layer, proxyserver, tlsconfig
from mitmproxy.master import Master

from .ca import prepare_ca
from .config import ProctorConfig
from .public_url import control_base_url
from .connectors.aliases import ConnectorAliases, own_listeners
from .connectors.classifier import GENERIC_CONNECTOR, build_classifier
from .connectors.credentials import CredentialInjector
from .connectors.manifest import load_manifests
from .workflows.spec import Workflows, load_workflows
from .approvals.agent_status import AgentStatus
from .approvals.notify import Notifier, WebhookConfig
from .audit.setup import build_audit, replica_id
from .audit.trail import AuditTrail
from .approvals.service import ApprovalService
from .connectors.lookup import LookupClient
from .governance.registry import Governance, Registration
from .control.api import build_app
from .connectors.enrich import Enricher
from .engine.aiohttp_gateway import AiohttpGateway
from .engine.gateway import GatewayRouter
from .engine.gateway_tls import ListenerCertificates
from .engine.listeners import ListenerWatch
from .engine.transparent import TransparentGuard
from .engine.mitm import ProctorAddon
from .engine.mitm_drain import MitmDrain
from .identity.stage import Authenticator
from .identity.workload import WorkloadIdentity
from .limits.budget_setup import Budgets, build_budgets
from .limits.setup import RateLimits, build_rate_limits
from .request_path import Parts, RequestPath, build_request_path
from .engine.patches import EngineTimeouts, install_engine_patches
from .identity.dev_issuer import DevIssuer
from .observability.metrics import Metrics, runtime_families
from .observability.tracing import Tracing
from .identity.verifier import TokenVerifier
from .policy.engine import PolicyStore
from .policy.fleet import FleetPolicy
from .store.events import StoreEvents
from .wakeups import install as install_wakeups
from .policy.revisions import record_revision
from .policy.sources import policy_source
from .store import Store, StoreError, open_store
from .store.guard import MARKER_NAME, open_verified, watch_store
from .policy.shadow import ShadowPolicies
from .policy.monitor import MonitorScope
from .record.decisions import DecisionRecorder
from .shutdown import Shutdown, drain, install_signal_handlers

log = logging.getLogger("proctor")



@dataclass
class ProctorRuntime:
    config: ProctorConfig
    policies: PolicyStore
    path: RequestPath
    recorder: DecisionRecorder
    addon: ProctorAddon
    metrics: Metrics
    store: Store
    lookups: LookupClient
    verifier: TokenVerifier
    shadow: ShadowPolicies | None = None
    enricher: Enricher | None = None
    approvals: ApprovalService | None = None
    notifier: Notifier | None = None
    governance: Governance | None = None
    audit: AuditTrail | None = None
    listeners: ListenerWatch | None = None  # set by serve() once the engine exists
    # Held by the file watcher and by a rollback, so the watcher never loads a half-restored directory.
    policy_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    fleet: FleetPolicy | None = None  # one policy set for every replica (set by serve(); proxy/policy/fleet.py)
    events: StoreEvents | None = None  # cross-replica wake-ups (set by serve(); proxy/wakeups.py)
    tracing: Tracing | None = None
    workflows: Workflows = field(default_factory=Workflows)
    rate_limits: RateLimits | None = None  # declared rate limits and their counters (docs/limits.md)
    budgets: Budgets | None = None  # declared budgets and their ledger (docs/limits.md, "Budgets")
    shutdown: Shutdown | None = None  # SIGTERM: drain, then stop (proxy/shutdown.py; set by build_runtime)
    workload: WorkloadIdentity | None = None  # transparent mode's one identity (docs/transparent.md)
    monitor: MonitorScope = field(default_factory=MonitorScope)  # monitor mode: where policies are not enforced

    def stats(self) -> dict[str, int]:
        """The engine's request counters (GET /v1/stats)."""
        out = dict(self.path.stage("metrics").stats)  # type: ignore[attr-defined]
        out["creator_record_failures"] = self.path.stage("track-creator").failures  # type: ignore[attr-defined]
        return out


def build_runtime(config: ProctorConfig) -> ProctorRuntime:
    """Everything but the network: fails fast (and clearly) on bad config, policies or connectors."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    if config.dev_issuer_enabled:
        DevIssuer(config.dev_issuer_dir, config.dev_issuer).ensure()
    prepare_ca(config)  # generated, or the configured CA checked and laid out for the engines
    manifests = load_manifests(config.connectors_dir)
    monitor = MonitorScope.from_config(config.monitor)
    monitor.check_connectors([m.name for m in manifests] + [GENERIC_CONNECTOR])  # a typo is a config error
    workflows = load_workflows(config.effective_workflows_dir, manifests)
    policies = PolicyStore(policy_source(config, manifests=manifests))
    injector = CredentialInjector({m.name: m.auth for m in manifests if m.auth is not None})
    classifier = build_classifier(manifests, config.egress)
    verifier = TokenVerifier(config.effective_issuers(), config.identity_settings())
    shadow = None
    if config.policies.shadow_dir is not None:
        shadow = ShadowPolicies(policy_source(config, config.policies.shadow_dir, manifests=manifests))
    store = open_store(config.store_url, staleness_seconds=config.store.staleness_seconds,
                       command_timeout=config.store.command_timeout_seconds,
                       connect_timeout=config.store.connect_timeout_seconds)
    rate_limits = build_rate_limits(config, manifests, workflows.actions, store)
    budgets = build_budgets(config, manifests, workflows.actions, store,
                            rate_limits.counters if rate_limits is not None else None)
    lookups = LookupClient(config.upstream, injector)
    enricher = Enricher(manifests, creator_of=store.creator_of, fetch_json=lookups.fetch_json)
    recorder = DecisionRecorder(config.decisions_path, replica=replica_id(config))  # every line names its replica
    audit, redactor = build_audit(config)
    recorder.redact = redactor
    if audit is not None:
        recorder.listeners.append(audit.emit)
    approvals = notifier = None
    if config.approvals.enabled:
        # never the listen address itself: 0.0.0.0 in a Location reaches no one (control.public_url)
        control = config.control.base_url
        notifier = Notifier(
            [WebhookConfig.model_validate(h) for h in config.approvals.webhooks],
            config.approvals.console_url or f"{control}/console",
        )
        approvals = ApprovalService(
            store,
            config.approvals,
            recorder.write,
            notifier,
            status_base_url=control,
            shared_store=not config.store_url.startswith("sqlite:"),
        )
        approvals.redact = redactor
        approvals.bind_headers(  # what an approval is bound to; see approvals/service.py
            config.limits.context_headers,
            replaced={m.name: m.auth.headers_to_remove() for m in manifests if m.auth is not None},
        )
    governance = Governance(store)
    if approvals is not None:
        governance.on_change.append(approvals.wake_all)
        approvals.interrupt = lambda a: governance.suspension_for(a.agent_id, a.connector, a.action) is not None
    aliases = ConnectorAliases(manifests, own_listeners(config)) if classifier.has_generic_egress else None
    router = GatewayRouter(config.gateway.routes) if config.gateway.enabled else None
    metrics = Metrics()
    tracing = Tracing()
    workload = None
    if config.transparent.enabled:
        assert config.transparent.token_file is not None  # (config validation)
        workload = WorkloadIdentity(config.transparent.token_file, verifier,
                                    check_seconds=config.transparent.token_check_seconds, registry=metrics.registry)
    path = build_request_path(Parts(
        config=config,
        authenticator=Authenticator(verifier, config.identity_settings(), workload),
        classifier=classifier,
        policies=policies,
        recorder=recorder,
        metrics=metrics,
        store=store,
        shadow=shadow,
        enricher=enricher,
        aliases=aliases,
        governance=governance,
        approvals=approvals,
        notifier=notifier,
        injector=injector,
        audit=audit,
        tracing=tracing,
        workflows=workflows,
        rate_limits=rate_limits,
        budgets=budgets,
    ))
    guard = TransparentGuard.from_config(config, workload.usable_identity) if workload is not None else None
    if guard is not None and workload is not None and approvals is not None:
        # a transparent agent's held request names the status address in its pod, answered there
        approvals.transparent_status_base_url = guard.status_base_url
        guard.approval_status = AgentStatus(approvals, workload).answer
    addon = ProctorAddon(path.requests, path.tunnels, router, config.limits, transparent=guard)
    runtime = ProctorRuntime(
        config, policies, path, recorder, addon, metrics, store, lookups, verifier, shadow, enricher,
        approvals, notifier, governance, audit, tracing=tracing, workflows=workflows, rate_limits=rate_limits,
        budgets=budgets,
    )
    runtime.shutdown = Shutdown(config.shutdown.grace_seconds)
    runtime.workload = workload
    runtime.monitor = monitor
    if approvals is not None:
        approvals.on_settled = lambda outcome, seconds: metrics.approval_wait.labels(outcome).observe(seconds)
    metrics.add_collector(lambda: runtime_families(runtime))
    return runtime


def announce_monitor(scope: MonitorScope) -> None:
    """Monitor mode must be impossible to miss: a WARNING naming what is not enforced, on stderr
    even when the log level hides warnings."""
    if not scope.enabled:
        return
    text = scope.banner()
    if log.isEnabledFor(logging.WARNING):
        log.warning("%s", text)
    else:
        print(f"proctor: WARNING: {text}", file=sys.stderr, flush=True)


def _warn_guessed_public_url(config: ProctorConfig) -> None:
    """A wildcard control listen host without control.public_url: links name loopback, say so."""
    c = config.control
    base, guessed = control_base_url(c.listen.host, c.listen.port, c.public_url)
    if c.enabled and guessed:
        log.warning(
            "control API listens on %s and control.public_url is not set: status URLs, Location headers and "
            "console links name %s, which only this host reaches; set control.public_url to the address "
            "agents and approvers use (e.g. the Service or ingress URL)",
            c.listen.host, base,
        )


def mitm_options_for(config: ProctorConfig) -> dict:
    """mitmproxy options (applied after the addons that declare them are loaded)."""
    modes = [f"regular@{config.listen.host}:{config.listen.port}"]
    if config.gateway.enabled and config.gateway.engine == "mitmproxy":
        gw = config.gateway.listen
        # The reverse target is a placeholder: every request is re-targeted by
        # the gateway router after it is allowed (lazy connect never dials it).
        modes.append(f"reverse:http://127.0.0.1:9@{gw.host}:{gw.port}")
    modes.extend(transparent_specs(config))
    return dict(
        mode=modes,
        confdir=str(config.ca_dir),
        connection_strategy="lazy",
        rawtcp=False,
        keep_host_header=True,
        # Hard ceiling on any buffered HTTP message (memory protection, enforced by
        # the engine before authentication). Request bodies above
        # limits.max_body_bytes are refused by the pipeline long before this.
        body_size_limit=str(config.limits.engine_max_message_bytes),
        ssl_insecure=config.upstream.insecure_skip_verify,
        ssl_verify_upstream_trusted_ca=str(config.upstream.ca_file) if config.upstream.ca_file else None,
        websocket=True,
        # HTTP/1.1 only towards agents and upstreams: ALPN never offers h2, so every
        # refusal and engine error reaches the agent as problem+json.
        http2=False,
        http3=False,
    )


def transparent_specs(config: ProctorConfig) -> list[str]:
    """mitmproxy transparent listeners (original destination by SO_ORIGINAL_DST), one per host."""
    t = config.transparent
    return [f"transparent@{host}:{t.port}" for host in t.hosts] if t.enabled else []


def engine_master(options: dict, gating_addon: object) -> Master:
    """mitmproxy with only the addons a proxy needs, then `gating_addon` (last, so it
    sees every flow after the engine's own addons). The benchmark's bare-mitmproxy
    baseline is built by this same function, with a no-op addon."""
    master = Master(mitm_options.Options(), with_termlog=False)
    master.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        disable_h2c.DisableH2C(),
        next_layer.NextLayer(),
        tlsconfig.TlsConfig(),
        gating_addon,
    )
    master.options.update(**options)
    return master


async def _watch_policies(runtime: ProctorRuntime) -> None:
    interval = runtime.config.policies.reload_interval_seconds
    beat = runtime.config.policies.heartbeat_seconds
    last = time.monotonic()
    while True:
        # (wakes for the heartbeat too when it is shorter than the reload interval)
        await asyncio.sleep(min(interval, beat))
        if time.monotonic() - last < interval:
            if runtime.fleet is not None:
                try:
                    await runtime.fleet.heartbeat()
                except Exception as e:  # noqa: BLE001 - the next beat retries
                    log.warning("replica heartbeat failed: %s", e)
            continue
        last = time.monotonic()
        try:
            # Parsing, validating and indexing a large set takes a while: do it off
            # the event loop so traffic keeps flowing; the swap itself is atomic.
            fleet = runtime.fleet
            if fleet is None or fleet.mode == "directory":
                async with runtime.policy_lock:
                    before = runtime.policies.bundle.revision
                    await asyncio.to_thread(runtime.policies.reload_if_changed)
                    if runtime.policies.bundle.revision != before:
                        if fleet is not None:
                            await fleet.publish_loaded()  # the fleet's active revision now: followers load it
                        else:
                            await record_revision(runtime.store, runtime.policies.bundle)
            if fleet is not None:
                await fleet.tick()  # store mode: follow the fleet's active revision; every mode: heartbeat
            if runtime.shadow is not None:
                await asyncio.to_thread(runtime.shadow.reload_if_changed)
        except Exception:
            log.exception("policy watcher error")


async def serve(config: ProctorConfig, ready: asyncio.Event | None = None) -> None:
    runtime = build_runtime(config)
    _warn_guessed_public_url(config)
    if config.upstream.insecure_skip_verify:
        log.warning("UPSTREAM TLS VERIFICATION IS DISABLED (upstream.insecure_skip_verify); never do this in production")

    try:
        # refuses a missing, emptied or different store where one existed (see store/guard.py)
        await open_verified(runtime.store, config.state_dir / MARKER_NAME)
        runtime.fleet = FleetPolicy(config, runtime.store, runtime.policies, runtime.policy_lock)
        await runtime.fleet.start()  # publish what was loaded, or (policies.source: store) follow the fleet
        await runtime.governance.load(
            [Registration(a.id, a.owner, a.team, a.description) for a in config.agents]
        )
    except StoreError as e:
        raise SystemExit(f"proctor: cannot open the state store: {e}") from None

    install_engine_patches(
        config.limits.max_request_head_bytes,
        EngineTimeouts(
            upstream_connect=config.upstream.connect_timeout_seconds,
            upstream_read=config.upstream.read_timeout_seconds,
            client_idle=config.limits.client_idle_timeout_seconds,
        ),
    )
    options = mitm_options_for(config)
    master = engine_master(options, runtime.addon)
    # mitmproxy runs on without a listener it cannot bind: this stops it instead (exit below)
    listened = {options["mode"][0]: ("agents", f"{config.listen.host}:{config.listen.port}")}
    gateway: AiohttpGateway | None = None
    if config.gateway.enabled and config.gateway.engine == "aiohttp":
        # the gateway listener served by aiohttp on the same request chain (docs/gateway-engines.md)
        gateway = AiohttpGateway(
            runtime.path.requests, runtime.addon.router, config.limits, config.upstream,
            config.gateway.listen.host, config.gateway.listen.port,
            body_budget=runtime.addon.body_budget,  # one process-wide bound on bodies being received
            tls=ListenerCertificates(config.ca_dir),  # TLS on the same port, as mitmproxy's listener does
        )
    elif config.gateway.enabled:
        listened[options["mode"][1]] = ("gateway", f"{config.gateway.listen.host}:{config.gateway.listen.port}")
    for spec, host in zip(transparent_specs(config), config.transparent.hosts):
        listened[spec] = ("transparent", f"[{host}]:{config.transparent.port}" if ":" in host
                          else f"{host}:{config.transparent.port}")
    runtime.listeners = ListenerWatch(master, listened, [gateway] if gateway is not None else [])
    master.addons.add(runtime.listeners)

    runner = None
    if config.control.enabled:
        runner = web.AppRunner(build_app(runtime), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, config.control.listen.host, config.control.listen.port)
        try:
            await site.start()
        except OSError as e:
            # release what is already open (the store's thread would keep the process alive)
            await runner.cleanup()
            await runtime.lookups.close()
            await runtime.store.close()
            runtime.recorder.close()
            raise SystemExit(
                f"proctor: cannot listen on {config.control.listen.host}:{config.control.listen.port} "
                f"(control API): {e}"
            ) from None

    # The first SIGTERM/SIGINT drains (within shutdown.grace_seconds), then stops the engine;
    # a second one exits at once (proxy/shutdown.py).
    shutdown = runtime.shutdown or Shutdown(config.shutdown.grace_seconds)
    install_signal_handlers(asyncio.get_running_loop(), shutdown)
    draining = asyncio.create_task(drain(
        shutdown, [MitmDrain(master, runtime.addon), *([gateway] if gateway is not None else [])],
        runtime.approvals.release_held if runtime.approvals is not None else None, master.shutdown,
    ))

    watcher = asyncio.create_task(_watch_policies(runtime))
    workload_watch = None
    if runtime.workload is not None:  # read at build; verified before ready, then watched for rotation
        await runtime.workload.check()
        workload_watch = asyncio.create_task(runtime.workload.run())
    runtime.events = install_wakeups(runtime)  # LISTEN/NOTIFY between replicas (polling stays the fallback)
    governance_task = asyncio.create_task(runtime.governance.run())
    store_watch = asyncio.create_task(watch_store(runtime.store))
    timers = None
    if runtime.approvals is not None:
        timers = asyncio.create_task(runtime.approvals.run_timers())
    if runtime.notifier is not None:
        await runtime.notifier.start()
    if runtime.audit is not None:
        await runtime.audit.start()
    b = runtime.policies.bundle
    gw = f", gateway on {config.gateway.listen.host}:{config.gateway.listen.port}" if config.gateway.enabled else ""
    if config.transparent.enabled:  # (docs/transparent.md)
        gw += (f", transparent on port {config.transparent.port} of {', '.join(config.transparent.hosts)} "
               f"as the workload identity in {config.transparent.token_file}")
    log.info(
        "proctor starting: agents on %s:%d%s; control API on %s:%d; policy revision %s (%d policies); "
        "decisions -> %s; interception CA: %s",
        config.listen.host,
        config.listen.port,
        gw,
        config.control.listen.host,
        config.control.listen.port,
        b.revision,
        b.policy_count,
        config.decisions_path,
        config.ca_dir / "mitmproxy-ca-cert.pem",
    )
    announce_monitor(runtime.monitor)
    # Move everything allocated at startup (mitmproxy, the policy bundle, the
    # connector tables) out of the collector's view: later collections then
    # scan only per-request garbage, which keeps GC pauses off the request path.
    gc.collect()
    gc.freeze()
    if ready is not None:
        ready.set()
    try:
        if gateway is not None:
            try:
                await gateway.start()
            except OSError:
                pass  # reported by the listener watch once mitmproxy has bound its own: exit non-zero
        await master.run()
    finally:
        draining.cancel()  # (done already after a signal; the engine may have stopped on its own)
        if gateway is not None:
            await gateway.close()  # requests in flight finish (bounded) and are recorded
        try:
            await asyncio.wait_for(runtime.addon.drain(), 5)  # refusals still being recorded
        except Exception:
            log.exception("could not finish recording every refusal")
        watcher.cancel()
        if workload_watch is not None:
            workload_watch.cancel()
        governance_task.cancel()
        store_watch.cancel()
        if runtime.events is not None:
            await runtime.events.close()
        try:
            await runtime.governance.flush()
        except Exception:
            log.exception("could not record the last agent activity")
        if timers is not None:
            timers.cancel()
        if runtime.notifier is not None:
            await runtime.notifier.close()
        if runner is not None:
            await runner.cleanup()
        if runtime.audit is not None:
            await runtime.audit.close()  # SIGTERM: deliver what the sinks still hold (bounded)
        runtime.recorder.close()
        await runtime.lookups.close()
        if runtime.rate_limits is not None:
            await runtime.rate_limits.close()
        elif runtime.budgets is not None:  # (shares the rate limits' backend when both exist)
            await runtime.budgets.close()
        await runtime.store.close()
        if runtime.tracing is not None:
            runtime.tracing.shutdown()
    if runtime.listeners.failures:
        raise SystemExit(f"proctor: {runtime.listeners.failure_message()}")
