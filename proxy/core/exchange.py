"""The `Exchange`: one request's whole passage through Proctor, typed.

An engine adapter creates it from the agent's request, the stages of the chain
(core/chain.py) fill it in, and the engine applies what it says: either answer
the agent with the refusal, or forward the request with the forward plan's
header edits to the target the decision was made for.

There is one source of truth for the outcome: `refusal`. The decision
(allow / deny / hold) is derived from it and from whether every request stage
passed, so a refusal and the decision can never disagree.
"""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .hosts import authority
from .model import AgentIdentity, AgentRequest, Classification, Decision, Refusal

# A refusal of this kind is a hold: the request waits for (or was sent back to wait
# for) a human approval; it was not forwarded.
HOLD_KIND = "approval-pending"


class Kind(str, enum.Enum):
    """What the exchange is about."""

    REQUEST = "request"  # an HTTP request to decide and maybe forward
    TUNNEL = "tunnel"  # a CONNECT: admitted or refused, never forwarded itself
    CONNECTION = "connection"  # a connection-level event (non-TLS in a tunnel, TLS failure): no request


def new_decision_id() -> str:
    # time-ordered prefix (ms) + randomness: sortable in logs, unguessable
    return f"{int(time.time() * 1000):012x}-{uuid.uuid4().hex[:20]}"


@dataclass(slots=True)
class ForwardPlan:
    """What the engine does to the request before it goes upstream.

    Removals are applied before additions, so a stage can replace a header (the
    agent's Authorization by the connector's credential). The target is the
    request's own (canonical) scheme, host, port and path: stages that move a
    request (gateway routing) do it on `Exchange.request` before the decision, so
    the upstream gets exactly what was decided.
    """

    remove_headers: list[str] = field(default_factory=list)
    set_headers: dict[str, str] = field(default_factory=dict)
    # Headers added to the agent's answer, forwarded or refused (e.g. rate-limit state). Set in
    # the response phase, they reach the agent when the engine held the answer back until then
    # (a buffered answer: small, read by a stage, or of a status in `replaceable_statuses`).
    response_headers: dict[str, str] = field(default_factory=dict)
    # Largest response body a stage needs to read (0: none; the engine may stream it).
    read_response_body: int = 0
    # Upstream statuses whose answer a response stage may replace (`Exchange.replace_response`)
    # or add headers to: the engine buffers such an answer whole (within its message limit) and
    # sends nothing of it before the response phase ran. Empty: the engine may stream any answer.
    replaceable_statuses: set[int] = field(default_factory=set)

    def remove(self, *names: str) -> None:
        for name in names:
            lowered = name.lower()
            if lowered not in self.remove_headers:
                self.remove_headers.append(lowered)
            self.set_headers.pop(lowered, None)

    def set(self, name: str, value: str) -> None:
        self.set_headers[name.lower()] = value


@dataclass(slots=True)
class ResponseSummary:
    """What came back (or what the agent was answered with)."""

    status: int | None  # the status the agent got (None: the connection was closed without an answer)
    upstream_status: int | None = None  # set when the upstream answered
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names (upstream responses)
    body: bytes | None = None  # the upstream body when buffered (see ForwardPlan.read_response_body)
    error: str | None = None  # engine or upstream error text


@dataclass(slots=True)
class LocalReply:
    """An answer a stage gives the agent itself instead of forwarding (a stored response
    replayed for a retried request). The request was decided and allowed; nothing reaches
    the upstream."""

    status: int
    headers: dict[str, str]
    body: bytes
    reason: str  # short label for logs and records, e.g. "idempotent-replay"


@dataclass(slots=True)
class Connection:
    """Where a connection-level event happened (no HTTP request to name it)."""

    client_ip: str | None
    host: str | None
    port: int | None
    reason: str  # short label for metrics: non-tls-in-tunnel, interception-rejected, internal-error


@dataclass(slots=True)
class Exchange:
    request: AgentRequest | None
    kind: Kind = Kind.REQUEST
    decision_id: str = field(default_factory=new_decision_id)
    started: float = field(default_factory=time.perf_counter)  # perf_counter at creation
    timestamp: float = field(default_factory=time.time)  # epoch seconds at creation
    connection: Connection | None = None

    # identity (authentication stage)
    identity: AgentIdentity | None = None
    credential_digest: bytes | None = None  # SHA-256 of the agent's token (binds tunnels, strips copies)
    # classification (classify / enrich stages)
    classification: Classification | None = None
    body: Any = None  # the body as Cedar JSON (context.body)
    payload: Any = None  # how the body was read (core/body.py ReadBody)
    is_jsonrpc: bool = False
    jsonrpc_id: Any = None
    # The shape refusals are answered in (core/problem.py): "problem" (problem+json) or an API's
    # own error shape its SDKs read ("openai"), as the connector owning the target declares it
    # (manifest `error_format`); set before anything can refuse. JSON-RPC routes answer JSON-RPC.
    error_format: str = "problem"
    # Cedar (authorize stage): (principal, resource, context) as last given to Cedar
    policy_inputs: tuple[Any, Any, Any] | None = None
    policy_revision: str = ""
    policy_decision: str | None = None  # allow | deny | hold (None: refused before policy)
    reasons: list[str] = field(default_factory=list)  # policy ids that decided
    shadow: dict[str, Any] | None = None  # the candidate set's verdict when it disagrees
    approval_id: str | None = None
    # the outcome
    refusal: Refusal | None = None
    # A refusal a stage right after the one that set it may still settle (a policy deny
    # that an approval can turn into a hold or a release). The chain makes it the
    # refusal before any other stage runs, and at the end: it is never forwarded.
    pending_refusal: Refusal | None = None
    # Monitor mode (proxy/policy/monitor.py, docs/governance.md "Monitor mode"): the request is in a
    # monitored scope (globally, by its connector or by its agent); `monitored` is the refusal that
    # was computed and recorded as what it would have been, but not enforced (the request went on).
    monitor: bool = False
    monitored: Refusal | None = None
    decided: bool = False  # every request stage passed (with no refusal): the request may be forwarded
    local_reply: LocalReply | None = None  # a stage answered the allowed request itself (not forwarded)
    # A response stage replaced the upstream's answer by `refusal` (see replace_response):
    # the engine sends the refusal instead of what the upstream said.
    replaced: bool = False
    errors: list[str] = field(default_factory=list)
    plan: ForwardPlan = field(default_factory=ForwardPlan)
    response: ResponseSummary | None = None
    # observability
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    decision_ms: float | None = None  # time to the end of the request phase
    trace_ids: tuple[str, str] | None = None  # (trace id, span id) when tracing is on
    # State a stage keeps between its on_request and on_response (keyed by stage name).
    stage_data: dict[str, Any] = field(default_factory=dict)

    # -- the outcome ----------------------------------------------------------------
    @property
    def decision(self) -> Decision:
        if self.refusal is not None:
            return Decision.HOLD if self.refusal.kind == HOLD_KIND else Decision.DENY
        return Decision.ALLOW if self.decided else Decision.DENY

    @property
    def allowed(self) -> bool:
        return self.refusal is None and self.decided

    @property
    def refused(self) -> bool:
        return self.refusal is not None

    def refuse(self, refusal: Refusal) -> None:
        """End the request phase with this answer (a deny, or a hold when its kind says so)."""
        self.refusal = refusal
        self.decided = False

    def reply_locally(self, reply: LocalReply) -> None:
        """End the request phase by answering the (allowed) request from Proctor: the engine
        sends `reply` instead of forwarding. Only for requests every earlier stage allowed."""
        if self.refusal is not None or self.pending_refusal is not None:
            raise RuntimeError("a refused request cannot be answered locally")
        self.local_reply = reply

    @property
    def forwardable(self) -> bool:
        """Allowed and not answered locally: the engine forwards it."""
        return self.allowed and self.local_reply is None

    def replace_response(self, refusal: Refusal) -> None:
        """From a response stage: answer the agent with `refusal` instead of the upstream's
        answer (an upstream 412 on a precondition Proctor added becomes a 409 that says what
        happened). The request was forwarded; the record keeps the upstream status and shows
        the refusal and the status the agent got. Only for an upstream status the stage
        announced in `plan.replaceable_statuses` before forwarding: the engine kept that
        answer back, so nothing of it has reached the agent."""
        resp = self.response
        if (not self.allowed or self.local_reply is not None or resp is None or resp.upstream_status is None
                or resp.upstream_status not in self.plan.replaceable_statuses or resp.error is not None):
            raise RuntimeError("only a buffered upstream answer with an announced status can be replaced")
        self.refuse(refusal)
        self.replaced = True
        resp.status = refusal.status
        resp.body = None

    def settle_pending(self, refusal: Refusal | None) -> None:
        """A settling stage's verdict on the pending refusal: another refusal (a hold,
        or a refusal about the approval), or None to release the request."""
        self.pending_refusal = None
        if refusal is not None:
            self.refuse(refusal)

    @property
    def strip_headers(self) -> tuple[str, ...]:
        return tuple(self.plan.remove_headers)

    # -- the forward target --------------------------------------------------------
    def host_header(self) -> str:
        req = self.request
        assert req is not None
        return authority(req.host, req.port, req.scheme)

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def refused_exchange(refusal: Refusal, request: AgentRequest | None = None, identity: AgentIdentity | None = None,
                     kind: Kind = Kind.REQUEST) -> Exchange:
    """An exchange that is refused before any stage ran (engine-level refusals)."""
    ex = Exchange(request, kind=kind, identity=identity)
    ex.refuse(refusal)
    return ex
