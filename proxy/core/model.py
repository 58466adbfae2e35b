"""Engine-agnostic request and decision types.

Engine adapters (mitmproxy today) translate their flows into `AgentRequest`
and apply what the stage chain decided (core/exchange.py); nothing in here knows about an engine.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Literal

# forward: HTTP(S)_PROXY; reverse: the gateway; transparent: redirected by the network (docs/transparent.md)
Mode = Literal["forward", "reverse", "transparent"]


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """A verified agent: who it is and the claims its token proved."""

    agent_id: str
    issuer: str
    claims: dict[str, Any]
    expires_at: float | None  # epoch seconds, from `exp`


@dataclass(slots=True)
class AgentRequest:
    """One HTTP request as the agent sent it, before any decision.

    `headers` keys are lower-case; multi-valued headers are joined with ", ".
    `path` is the raw request path without the query string.
    """

    method: str
    scheme: str
    host: str
    port: int
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    client_ip: str
    mode: Mode
    # Set when the identity was proven earlier on the same connection (CONNECT),
    # with the SHA-256 of the token that proved it.
    connection_identity: AgentIdentity | None = None
    connection_token_digest: bytes | None = None
    # Where else the request says it is going (forward mode; see core/target.py):
    host_header: str | None = None  # raw Host header value; None when absent
    request_authority: str = ""  # authority of an absolute-form request line inside a tunnel
    tls_sni: str | None = None
    # Set by the adapter when a header value carries CR, LF or NUL (refused).
    header_problem: str | None = None
    repeated_headers: frozenset[str] = frozenset()  # lower-case names that appeared more than once
    # Engine callback: is the agent still connected? (a held request must not be
    # forwarded for an agent that hung up; the approval then applies to its retry)
    client_alive: Any = None
    # The request line's version as sent (HTTP/1.0 or HTTP/1.1; anything else is refused).
    http_version: str = "HTTP/1.1"
    # Gateway mode: no route matched this request (host and path are what the agent
    # addressed); the gateway-route stage refuses it after authentication.
    unrouted: bool = False
    # Transparent mode: where the agent's connection was going before the network redirected
    # it (SO_ORIGINAL_DST). Never dialled: host/port are what the request names (core/target.py).
    original_destination: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        default = (self.scheme == "https" and self.port == 443) or (self.scheme == "http" and self.port == 80)
        authority = self.host if default else f"{self.host}:{self.port}"
        return f"{self.scheme}://{authority}{self.path}" + (f"?{self.query}" if self.query else "")


class Decision(str, enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    HOLD = "hold"  # held for human approval and not (yet) forwarded


@dataclass(frozen=True, slots=True)
class Classification:
    """What a request means in business terms, as a connector understood it."""

    connector: str
    action: str  # Cedar action id, e.g. "ticketing.incident.create"
    resource_type: str  # Cedar entity type, e.g. "Incident"
    resource_id: str
    resource_attrs: dict[str, Any] = field(default_factory=dict)
    risk: str = "low"
    route: str = ""  # the matched route template, for the record
    # Typed values declared by the route, as Cedar JSON (context.params / query_params / fields).
    params: dict[str, Any] = field(default_factory=dict)
    query_params: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)
    body_specs: Any = None  # the route's declared body fields (applied once the body is parsed)
    resource_attribute_names: tuple[str, ...] = ()
    # JSON-RPC endpoints: the operations to match on the body, and the matched call
    # ({"method", "tool"?}); `action` stays "" until an operation matches.
    rpc_ops: Any = None
    rpc: dict[str, Any] | None = None
    arguments: Any = None  # the call's params.arguments (MCP tools/call), as Cedar JSON
    spec: Any = None  # the matched RouteSpec (lookup, track_creator)
    approval_mode: Any = None  # the route's (or connector's) ApprovalWait, if it sets one
    # Entity references among the resource's attributes (attr -> (type, id)), e.g. created_by.
    resource_refs: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The route lets bodies Proctor cannot read through as opaque (uploads); otherwise they are refused (415).
    opaque_body: bool = False
    # A plain route on the path of a JSON-RPC route of the connector: that route ("POST /mcp").
    # Its messages are judged from the body, so a body here is refused (connectors/derive.py).
    jsonrpc_endpoint: str = ""

    @property
    def resource_uid(self) -> str:
        # Cedar's entity-uid syntax: the id is a quoted, escaped string literal.
        return f"{self.resource_type}::{json.dumps(self.resource_id, ensure_ascii=False)}"


@dataclass(slots=True)
class Refusal:
    """A request Proctor will not forward, with everything needed to explain it."""

    status: int
    title: str
    detail: str
    reasons: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    # Machine-readable category for the record: authentication, policy, classification, ...
    kind: str = "policy"
    extra: dict[str, Any] = field(default_factory=dict)  # more problem fields (approval_id, status_url)
