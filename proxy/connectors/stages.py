"""Connector stages: what a request means, and what the connector adds to it.

- `ErrorFormat`    the shape refusals are answered in: the error format of the connector
                   owning the target (manifest `error_format`), before anything can refuse;
- `Classify`       the connector route, action and resource; the body read strictly
                   into the typed values policies see (connectors/derive.py);
- `ConnectorAlias` generic egress must not reach a connector's upstream under another name;
- `Enrich`         resource attributes from the store (creator) or an upstream lookup;
- `InjectCredential` the agent's credential out, the connector's in;
- `TrackCreator`   after an allowed create answered 2xx, remember which agent created what;
- `TunnelTarget`   a CONNECT is admitted only to a host some connector (or egress rule) covers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import RequestLimits
from ..core.chain import Stage
from ..core.exchange import Exchange
from ..core.hosts import HostRejected, canonical_host
from ..core.model import AgentRequest, Refusal
from ..core.target import canonicalise_target
from .aliases import PROCTOR, AliasUnresolvable, ConnectorAliases
from .classifier import GENERIC_CONNECTOR, Classifier, host_matches, split_host_pattern
from .credentials import CredentialInjector, CredentialUnavailable
from .derive import derive_request
from .enrich import Enricher, created_id

log = logging.getLogger("proctor.connectors")

# A create's response is read (bounded) to learn the new resource's id.
TRACK_CREATOR_MAX_BODY = 1024 * 1024


# Gateway mode, before routing: the upstream (host, port) a request addressed to Proctor goes to.
GatewayTarget = Callable[[AgentRequest], "tuple[str, int] | None"]


class ErrorFormat(Stage):
    """Which shape Proctor's refusals take (core/problem.py `refusal_answer`): the `error_format`
    of the connector that owns the request's target, so that an SDK shows the reason of every
    refusal on that API (an OpenAI SDK reads OpenAI's error object). Runs first, on the head
    too, so a 401 before classification is answered in it as well; in gateway mode the head
    is not routed yet and `gateway_target` names the upstream its route leads to."""

    name = "error-format"

    def __init__(self, classifier: Classifier, gateway_target: GatewayTarget | None = None) -> None:
        self.classifier = classifier
        self.gateway_target = gateway_target
        self.needed = any(c.error_format != "problem" for c in classifier.connectors)

    def _choose(self, ex: Exchange) -> None:
        req = ex.request
        if not self.needed or req is None:
            return
        host, port = req.host, req.port
        if req.unrouted:
            target = self.gateway_target(req) if self.gateway_target is not None else None
            if target is None:
                ex.error_format = "problem"
                return
            host, port = target
        try:
            connector = self.classifier.connector_for(canonical_host(host), port)
        except HostRejected:
            connector = None
        ex.error_format = connector.error_format if connector is not None else "problem"

    def on_head(self, ex: Exchange) -> None:
        self._choose(ex)

    def on_request(self, ex: Exchange) -> None:
        self._choose(ex)  # the routed request (gateway mode), with its body


class Classify(Stage):
    name = "classify"

    def __init__(self, classifier: Classifier, limits: RequestLimits) -> None:
        self.classifier = classifier
        self.limits = limits

    def on_request(self, ex: Exchange) -> None:
        assert ex.request is not None
        derived = derive_request(self.classifier, self.limits, ex.request)
        ex.classification = derived.classification
        ex.is_jsonrpc = derived.is_jsonrpc
        ex.jsonrpc_id = derived.jsonrpc_id
        ex.body = derived.body
        ex.payload = derived.payload
        if derived.refusal is not None:
            ex.refuse(derived.refusal)
            return
        cls = ex.classification
        if cls is not None:  # decided here, before policy: an approval would be asked for nothing
            cleartext = cleartext_credential(self.classifier, ex.request, cls.connector)
            if cleartext is not None:
                ex.refuse(cleartext)


def cleartext_credential(classifier: Classifier, req: AgentRequest, connector: str) -> Refusal | None:
    """A connector with `auth:` injects its credential: over plain HTTP it would cross the network
    in the clear, so that is refused unless one of the connector's host patterns names this
    host:port explicitly (the operator declared that endpoint, e.g. `127.0.0.1:9104`). A pattern
    without a port covers every port of the host, and the agent chooses the scheme:
    `http://api.openai.com/` is refused (use https://) rather than sending the key to port 80.
    Loopback is not exempt: the agent shares it (in its pod, on a laptop), so a portless
    `127.0.0.1` or `localhost` pattern would hand the credential to a listener of the agent's own."""
    if req.scheme != "http" or req.mode == "reverse":
        return None  # (gateway routes name their upstream's scheme themselves)
    manifest = next((c for c in classifier.connectors if c.name == connector), None)
    if manifest is None or manifest.auth is None:
        return None
    if any(split_host_pattern(p)[1] == req.port and host_matches(p, req.host, req.port) for p in manifest.hosts):
        return None
    return Refusal(
        400,
        "Plain HTTP refused for this connector",
        f"connector {connector!r} injects an upstream credential, which Proctor sends in the clear only to a "
        f"host:port the connector names; {req.host}:{req.port} over plain HTTP is not one: use "
        f"https://{req.host}/ (the request was not forwarded)",
        reasons=["cleartext-credential"],
        kind="request",
    )


class ConnectorAlias(Stage):
    name = "connector-alias"

    def __init__(self, aliases: ConnectorAliases) -> None:
        self.aliases = aliases

    async def on_request(self, ex: Exchange) -> None:
        req, cls = ex.request, ex.classification
        assert req is not None and cls is not None
        if cls.connector != GENERIC_CONNECTOR:
            return
        try:
            alias = await self.aliases.alias_of(req.host, req.port)
        except AliasUnresolvable as e:
            ex.refuse(Refusal(502, "Upstream host unresolvable",
                              f"{e}; its addresses could not be checked, so the request was not forwarded",
                              reasons=["egress-unresolvable"], kind="egress"))
            return
        if alias is None:
            return
        if alias.connector == PROCTOR:
            ex.refuse(Refusal(
                508, "Loop refused",
                f"{req.host}:{req.port} is one of Proctor's own listeners; requests are never sent back to "
                "Proctor (from its own address the control API would trust them): address the service you "
                "want to reach", reasons=["proxy-loop"], kind="loop"))
            return
        where = f"{alias.host}:{alias.port}" if alias.port is not None else alias.host
        ex.refuse(Refusal(
            403,
            "Egress not permitted",
            f"{req.host}:{req.port} reaches the upstream of connector {alias.connector!r}, whose requests are "
            f"decided by that connector's policies; address it as {where} instead",
            reasons=["connector-alias"],
            kind="egress",
        ))


class Enrich(Stage):
    name = "enrich"

    def __init__(self, enricher: Enricher) -> None:
        self.enricher = enricher

    async def on_request(self, ex: Exchange) -> None:
        req, cls = ex.request, ex.classification
        assert req is not None and cls is not None
        if not self.enricher.needed(cls):
            return
        cls, refusal = await self.enricher.enrich(req, cls)
        ex.classification = cls
        if refusal is not None:
            ex.refuse(refusal)


class InjectCredential(Stage):
    """Swap whatever credential the agent sent for the connector's own (fail closed if unavailable).
    (Plain HTTP that would carry it in the clear was refused at classification: `cleartext_credential`.)"""

    name = "credential"

    def __init__(self, injector: CredentialInjector) -> None:
        self.injector = injector

    async def on_request(self, ex: Exchange) -> None:
        cls = ex.classification
        assert cls is not None
        auth = self.injector.configured(cls.connector)
        if auth is None:
            return
        try:
            headers = await self.injector.headers_for(cls.connector)
        except CredentialUnavailable as e:
            ex.refuse(Refusal(
                503,
                "Upstream credential unavailable",
                f"{e}; the request was allowed by policy but not forwarded without its credential (fail closed)",
                reasons=["upstream-credential-unavailable"],
                kind="fail-closed",
            ))
            return
        ex.plan.remove(*auth.headers_to_remove())
        for name, value in headers.items():
            ex.plan.set(name, value)


class TrackCreator(Stage):
    name = "track-creator"

    def __init__(self, store: Any) -> None:
        self.store = store
        self.failures = 0

    @staticmethod
    def _tracks(ex: Exchange) -> bool:
        cls = ex.classification
        return cls is not None and cls.spec is not None and cls.spec.track_creator is not None

    def on_request(self, ex: Exchange) -> None:
        # runs last among the request stages that matter: ask the engine to buffer the id-bearing body
        if self._tracks(ex):
            ex.plan.read_response_body = max(ex.plan.read_response_body, TRACK_CREATOR_MAX_BODY)

    def on_response(self, ex: Exchange) -> Awaitable[None] | None:
        # (a plain method: only a tracked create's answer has anything to await)
        resp = ex.response
        if not ex.allowed or not self._tracks(ex) or resp is None or ex.identity is None:
            return None
        if resp.upstream_status is None or not 200 <= resp.upstream_status < 300:
            return None
        return self._record_creator(ex)

    async def _record_creator(self, ex: Exchange) -> None:
        resp = ex.response
        assert resp is not None and ex.identity is not None
        cls = ex.classification
        assert cls is not None and cls.spec is not None and cls.spec.track_creator is not None
        try:
            if resp.body is None or len(resp.body) > TRACK_CREATOR_MAX_BODY:
                raise ValueError("the response body was streamed or too large to read the new id from")
            new_id = created_id(json.loads(resp.body), cls.spec.track_creator.id_from)
            if new_id is None:
                raise ValueError(f"no id at {cls.spec.track_creator.id_from} in the response")
            if self.store is None:
                raise ValueError("no store is configured")
            await self.store.record_creator(cls.resource_type, new_id, ex.identity.agent_id, ex.decision_id, time.time())
        except Exception as e:
            # The upstream already created the resource: the answer still goes back to
            # the agent, but without a creator record "no self-approval" cannot apply
            # to it. Say so loudly and count it.
            self.failures += 1
            log.error(
                "decision %s: could not record the creator of a new %s (%s); policies on created_by "
                "will not see it", ex.decision_id, cls.resource_type, e,
            )


class TunnelTarget(Stage):
    """CONNECT: the tunnel dials the canonical host, and only hosts something could classify."""

    name = "tunnel-target"

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier

    def on_request(self, ex: Exchange) -> None:
        req = ex.request
        assert req is not None
        refusal = canonicalise_target(req)
        if refusal is None and not self.classifier.knows_host(req.host, req.port):
            refusal = Refusal(
                403,
                "Egress not permitted",
                f"no connector covers {req.host}:{req.port}; tunnels to unclassified hosts are refused",
                reasons=["egress-default-deny"],
                kind="egress",
            )
        if refusal is not None:
            ex.refuse(refusal)
