"""Proctor configuration: pydantic models for `proctor.yaml` and the embedded default.

Every path in a config file is resolved relative to the file's directory, so a
config can be moved together with its policies and connectors. With no config
file, `default_config()` describes the embedded default: state in
`./.proctor/`, the bundled connectors and policies, the dev token issuer.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .limits.budget_spec import BudgetSpec, LlmPrices, unique_budget_names
from .limits.spec import ConfigRateLimit, CountersConfig, unique_names
from .public_url import check_public_url, control_base_url

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULTS_DIR = PACKAGE_DIR / "defaults"

# Asymmetric algorithms only: an HMAC key shared with every verifier is not an
# identity, and accepting HS* next to RS* is the classic key-confusion attack.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEV_ISSUER = "proctor-dev"
DEV_AUDIENCE = "proctor"


class Strict(BaseModel):
    """Base model: unknown keys are an error, so a typo never silently disables a control."""

    model_config = ConfigDict(extra="forbid")


class Listen(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class IssuerConfig(Strict):
    """One trusted token issuer (the enterprise IdP, or the embedded dev issuer)."""

    issuer: str
    audience: str | list[str]
    jwks_file: Path | None = None
    jwks_url: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    allow_symmetric: bool = False
    # How long a fetched JWKS is trusted before it is refetched in the background.
    jwks_cache_seconds: int = Field(300, ge=10)
    # An unknown `kid` triggers a refetch at most this often (an attacker must
    # not be able to turn us into a JWKS-fetching amplifier).
    jwks_min_refetch_seconds: int = Field(30, ge=1)
    jwks_ca_file: Path | None = None
    # Dev only: allow http:// JWKS URLs (never in production).
    jwks_allow_http: bool = False

    @model_validator(mode="after")
    def _check(self) -> "IssuerConfig":
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError(f"issuer {self.issuer!r}: set exactly one of jwks_file or jwks_url")
        if self.jwks_url and not self.jwks_url.startswith("https://") and not self.jwks_allow_http:
            raise ValueError(f"issuer {self.issuer!r}: jwks_url must be https:// (set jwks_allow_http for tests)")
        if not self.algorithms:
            raise ValueError(f"issuer {self.issuer!r}: algorithms must not be empty")
        for alg in self.algorithms:
            if alg.lower() == "none":
                raise ValueError("algorithm 'none' is never accepted")
            if alg not in ASYMMETRIC_ALGORITHMS and not self.allow_symmetric:
                raise ValueError(
                    f"issuer {self.issuer!r}: algorithm {alg!r} is not asymmetric; "
                    "set allow_symmetric: true only if you understand key confusion"
                )
        return self


class PrincipalMapping(Strict):
    """How verified claims become the Cedar principal `Agent::"<id>"`."""

    agent_id_claim: str = "sub"
    # Cedar attribute name -> claim name. Missing claims are simply absent
    # (declare them optional in the schema).
    attributes: dict[str, str] = Field(
        default_factory=lambda: {"team": "team", "assignment_group": "assignment_group"}
    )
    # A claim holding a list (or a single string) of group names; each becomes
    # a parent entity `<group_entity_type>::"<name>"`.
    groups_claim: str | None = "groups"
    group_entity_type: str = "AgentGroup"


class IdentityConfig(Strict):
    issuers: list[IssuerConfig]
    principal: PrincipalMapping = Field(default_factory=PrincipalMapping)
    # The username in http://<agent-id>:<jwt>@proxy must equal the agent id
    # derived from the token ("must_match"), or is ignored ("ignore").
    proxy_username: Literal["must_match", "ignore"] = "must_match"
    leeway_seconds: int = Field(30, ge=0, le=300)
    max_token_bytes: int = Field(8192, ge=256, le=65536)
    # Tokens without `exp` are refused: every agent credential must expire.
    require_exp: bool = True
    # Verified tokens are cached (by SHA-256 of the token) until they expire.
    cache_size: int = Field(10000, ge=0)


class DevIssuerConfig(Strict):
    """The embedded dev issuer: a key pair generated on first run in the state directory."""

    # Default: on only when no `identity` section names a real issuer. Anyone who
    # can read the state directory can mint dev tokens, so never leave it on in
    # production.
    enabled: bool | None = None
    issuer: str = DEV_ISSUER
    audience: str = DEV_AUDIENCE
    default_ttl: str = "1h"
    max_ttl: str = "24h"
    # A configured ES256 (EC P-256) signing key, so every replica verifies the tokens any
    # of them issues (the key id is derived from the key): a PEM file, or a variable
    # holding the PEM (or the PEM base64-encoded). Unset: generated in the state directory.
    key_file: Path | None = None
    key_env: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_key_source(self) -> "DevIssuerConfig":
        if self.key_file is not None and self.key_env is not None:
            raise ValueError("dev_issuer: set key_file or key_env, not both")
        return self

    @property
    def key_configured(self) -> bool:
        return self.key_file is not None or self.key_env is not None


class CaConfig(Strict):
    """The interception CA from files or secrets, so every replica presents the same CA.

    The certificate (a CA: basicConstraints CA:TRUE; optionally followed by its chain)
    and its unencrypted private key (RSA or EC), each from a PEM file or a variable
    holding the PEM (or the PEM base64-encoded). Checked at startup (proxy/ca.py)."""

    cert_file: Path | None = None
    cert_env: str | None = Field(None, min_length=1)
    key_file: Path | None = None
    key_env: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _both(self) -> "CaConfig":
        cert = [k for k in ("cert_file", "cert_env") if getattr(self, k) is not None]
        key = [k for k in ("key_file", "key_env") if getattr(self, k) is not None]
        if len(cert) > 1 or len(key) > 1:
            raise ValueError(f"ca: set one of {' or '.join(cert if len(cert) > 1 else key)}, not both")
        if not cert or not key:
            raise ValueError("ca: set both the certificate (cert_file or cert_env) and its key (key_file or key_env)")
        return self


class Route(Strict):
    """Reverse (gateway) mode: requests to `host` (optional) under `prefix` go to `upstream`."""

    prefix: str = "/"
    host: str | None = None
    upstream: str

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("route prefix must start with '/'")
        return v

    @field_validator("upstream")
    @classmethod
    def _upstream(cls, v: str) -> str:
        if not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("route upstream must be an http:// or https:// base URL")
        return v


class GatewayConfig(Strict):
    enabled: bool = False
    listen: Listen = Field(default_factory=lambda: Listen(port=8082))
    routes: list[Route] = Field(default_factory=list)
    # What serves the gateway listener (docs/gateway-engines.md): mitmproxy (the default,
    # also the forward/CONNECT engine) or aiohttp (plain HTTP/1.1, same stage chain).
    engine: Literal["mitmproxy", "aiohttp"] = "mitmproxy"


class TransparentConfig(Strict):
    """Transparent mode (docs/transparent.md): the agent's connections are redirected to this
    listener by the network (`proctor netsetup`), the original destination is recovered
    (SO_ORIGINAL_DST), and every request is attributed to ONE workload identity, the agent
    token read from `token_file`."""

    enabled: bool = False
    # Loopback only: whoever reaches this port speaks as the workload identity. The redirect
    # sends IPv4 to 127.0.0.1 and IPv6 to ::1 (drop "::1" where the namespace has no IPv6).
    hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"], min_length=1)
    port: int = Field(15001, ge=1, le=65535)
    # The workload's agent token (a mounted secret or a projected service-account token):
    # read at start, re-read when it changes (checked at most every token_check_seconds).
    token_file: Path | None = None
    token_check_seconds: float = Field(5.0, ge=0.1, le=300)
    # Destination ports that must carry TLS: plain bytes redirected from them are refused.
    tls_ports: list[int] = Field(default_factory=lambda: [443])

    @field_validator("hosts")
    @classmethod
    def _loopback(cls, v: list[str]) -> list[str]:
        for host in v:
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"transparent.hosts: {host!r} is not an IP address (use 127.0.0.1 and ::1)") from None
            if not ip.is_loopback:
                raise ValueError(f"transparent.hosts: {host} is not a loopback address: anyone reaching the "
                                 "transparent port speaks as the workload identity, so it listens on loopback only")
        if len(set(v)) != len(v):
            raise ValueError("transparent.hosts: an address is listed twice")
        return v

    @field_validator("tls_ports")
    @classmethod
    def _ports(cls, v: list[int]) -> list[int]:
        if any(not 1 <= p <= 65535 for p in v):
            raise ValueError("transparent.tls_ports: ports are 1..65535")
        return v

    @model_validator(mode="after")
    def _identity(self) -> "TransparentConfig":
        if self.enabled and self.token_file is None:
            raise ValueError("transparent: enabled needs token_file (the workload identity's token)")
        return self


class EgressConfig(Strict):
    """What happens to requests no connector classifies.

    `default: deny` refuses them (egress default-deny). Hosts listed in
    `unclassified_hosts` are classified generically (action `http.request`,
    resource `HttpHost::"<host>"`) and still go through Cedar.
    """

    default: Literal["deny", "generic"] = "deny"
    unclassified_hosts: list[str] = Field(default_factory=list)
    # Generic egress refuses (415) bodies Proctor cannot read (not JSON, a form or
    # multipart); true forwards them as opaque (policies see context.payload).
    opaque_bodies: bool = False


class PolicyConfig(Strict):
    dir: Path
    schema_file: Path | None = None  # default: <dir>/schema.cedarschema
    entities_file: Path | None = None  # default: <dir>/entities.json if present
    reload_interval_seconds: float = Field(1.0, gt=0)
    # Shadow mode: a candidate policy directory (with its own schema.cedarschema and
    # optional entities.json) evaluated beside the active set on every request. Only
    # the active decision is enforced; disagreements are recorded and counted.
    shadow_dir: Path | None = None
    # Generate the Cedar declarations of connector actions and resource types from
    # the manifests and validate the policies against them plus the schema file.
    schema_from_connectors: bool = True
    # Where the enforced set comes from (docs/policies.md, "One policy set for the fleet"):
    # `directory` (default) loads `dir` and publishes what it loads as the fleet's active
    # revision; `store` follows the active revision in the state store (pushed with
    # `proctor policy push`, or published by a directory-mode replica), `dir` being only the
    # seed used while the store has none.
    source: Literal["directory", "store"] = "directory"
    # How often a replica reports its revision to the store (the /v1/policies fleet view);
    # a replica silent for 3 intervals is no longer listed.
    heartbeat_seconds: float = Field(5.0, ge=0.5, le=300)


class RequestLimits(Strict):
    # Bodies up to this size are parsed into Cedar context; larger ones are refused (413).
    max_body_bytes: int = Field(1024 * 1024, ge=0)
    max_json_depth: int = Field(32, ge=1, le=256)
    # A body number Cedar cannot hold exactly (more than 4 decimal places, beyond
    # 64 bits, 1e400): `refuse` (400, default), or `text`: context.body holds its
    # exact decimal text as a String, so a numeric test of it fails evaluation and
    # the request is denied (coordinates, rates and scores pass where no policy
    # compares them). Declared body fields are always exact.
    inexact_numbers: Literal["refuse", "text"] = "refuse"
    # Request headers copied into Cedar context (lower-case names).
    context_headers: list[str] = Field(
        default_factory=lambda: ["content-type", "user-agent", "idempotency-key", "x-request-id"]
    )
    # Engine ceiling for any buffered HTTP message, requests and responses alike
    # (responses with a larger Content-Length get 502; chunked ones are streamed).
    engine_max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Request line plus headers; larger heads are refused (431) before authentication.
    max_request_head_bytes: int = Field(64 * 1024, ge=8 * 1024, le=16 * 1024 * 1024)
    # All request bodies still being received, process-wide; past it new bodies get 503.
    max_inflight_body_bytes: int = Field(256 * 1024 * 1024, ge=64 * 1024)
    # A client connection with nothing in flight (no request, or a request or TLS
    # handshake that stopped arriving) is closed after this long.
    client_idle_timeout_seconds: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _inflight_holds_one_body(self) -> "RequestLimits":
        if self.max_inflight_body_bytes < self.max_body_bytes:
            raise ValueError("max_inflight_body_bytes must be at least max_body_bytes (one body must fit)")
        if self.engine_max_message_bytes < self.max_body_bytes:
            # otherwise the engine refuses such bodies itself, past the pre-authentication bookkeeping
            raise ValueError("engine_max_message_bytes must be at least max_body_bytes")
        return self

    @field_validator("context_headers")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        names = [h.strip().lower() for h in v]
        for forbidden in ("authorization", "proxy-authorization", "cookie"):
            if forbidden in names:
                raise ValueError(f"{forbidden} may not be copied into the policy context (it carries secrets)")
        return names


class UpstreamConfig(Strict):
    # Upstream TLS is verified against the Mozilla CA bundle (certifi), or, when
    # set, against this PEM bundle instead.
    ca_file: Path | None = None
    # Never verify upstream TLS (tests against self-signed servers only). Loud warning.
    insecure_skip_verify: bool = False
    # Connecting (DNS + TCP) to an upstream; then 504.
    connect_timeout_seconds: float = Field(10.0, gt=0, le=300)
    # An upstream connection that sends nothing for this long is closed; a request
    # still waiting for (the rest of) its answer gets 504.
    read_timeout_seconds: float = Field(60.0, gt=0, le=3600)


class RecordConfig(Strict):
    decisions_file: Path | None = None  # default: <state_dir>/decisions.jsonl
    # Keep the Cedar principal, resource and context of each decision (without the
    # raw body, raw query string or tool arguments) so `proctor policy replay` and
    # `explain --decision` can re-evaluate it. See docs/decision-record.md.
    policy_inputs: bool = True


class StoreConfig(Strict):
    """Durable state (approvals, resource creators, agent registry, suspensions).

    `url`: `sqlite:///name.db` (relative to state_dir), `sqlite:////abs/path.db`, or
    `postgresql://...`. A DSN carrying a password belongs in the environment:
    name the variable with `url_env` instead.
    """

    url: str | None = None  # default: sqlite:///<state_dir>/proctor.db
    url_env: str | None = None
    # Partitions (docs/governance.md): past this long without an answer from the store
    # every request is refused 503 and /readyz is 503, rather than serving on a kill
    # switch and approvals that may be out of date. Checks run every second.
    staleness_seconds: float = Field(10.0, ge=1, le=300)
    # PostgreSQL: each query's limit, and connecting (default: the URL's connect_timeout,
    # else 5 s). Taking a pooled connection is bounded by their sum.
    command_timeout_seconds: float = Field(10.0, gt=0, le=300)
    connect_timeout_seconds: float | None = Field(None, gt=0, le=120)

    @model_validator(mode="after")
    def _one(self) -> "StoreConfig":
        if self.url and self.url_env:
            raise ValueError("store: give url or url_env, not both")
        if self.url and "@" in self.url and ":" in self.url.split("@", 1)[0].split("//", 1)[-1]:
            raise ValueError("store.url carries a password; put the DSN in an environment variable and use url_env")
        return self


class ApprovalsConfig(Strict):
    """Human approval of held requests (see docs/approvals.md).

    A request denied only by `forbid` policies annotated `@approval("group")` is
    held until people from those groups approve it, then re-evaluated with the
    approval in `context.approval`.
    """

    enabled: bool = True
    # How a held agent waits (a connector or route may override): `sync` keeps the
    # connection open up to sync_wait_seconds; `async` answers 202 with a status URL
    # and the agent's retry of the same request proceeds once approved.
    mode: Literal["sync", "async"] = "sync"
    sync_wait_seconds: float = Field(120.0, gt=0, le=3600)
    expire_after_seconds: float = Field(3600.0, gt=0)
    # After this long still pending, notify `escalate_to` as well (webhooks with the
    # `escalated` event); approvers from that group may then decide too.
    escalate_after_seconds: float | None = Field(None, gt=0)
    escalate_to: str | None = None
    retry_after_seconds: int = Field(5, ge=1, le=3600)  # advertised to async agents
    # Approvers authenticate with JWTs from the same issuers as agents, but for this
    # audience, so an agent token can never approve and an approver token never acts as an agent.
    approver_audience: str = "proctor-approvers"
    approver_groups_claim: str = "approval_groups"
    console_url: str | None = None  # default: http://<control listen>/console
    webhooks: list[dict] = Field(default_factory=list)  # see proxy/approvals/notify.py WebhookConfig
    # Held request bodies shown to approvers are cut at this size.
    preview_body_bytes: int = Field(16 * 1024, ge=0, le=1024 * 1024)
    # After an approval released its request, the same request again (same Idempotency-Key, or
    # same fingerprint without one) gets 409 Already forwarded for this long, on every replica,
    # instead of a new hold; later it is a new request. 0: never (held anew at once).
    forwarded_retry_seconds: float = Field(24 * 3600.0, ge=0, le=366 * 24 * 3600)

    @model_validator(mode="after")
    def _escalation(self) -> "ApprovalsConfig":
        if (self.escalate_after_seconds is None) != (self.escalate_to is None):
            raise ValueError("approvals: escalate_after_seconds and escalate_to go together")
        return self


class IdempotencyConfig(Strict):
    """Idempotency-Key on writes and route dedupe windows (docs/coordination.md)."""

    # A completed request's response is replayed to retries with its key this long.
    replay_seconds: float = Field(24 * 3600.0, gt=0, le=30 * 24 * 3600)
    # A key stays "in progress" at most this long (a replica that died mid-request
    # frees it then); should exceed the upstream timeout.
    in_progress_seconds: float = Field(300.0, gt=0, le=24 * 3600)
    # Larger response bodies are not kept: a retry is told it completed (409), not replayed.
    max_body_bytes: int = Field(64 * 1024, ge=0, le=1024 * 1024)
    max_key_length: int = Field(255, ge=8, le=1024)
    retry_after_seconds: int = Field(2, ge=1, le=3600)  # advertised with "in progress" 409s
    sweep_interval_seconds: float = Field(60.0, gt=0)  # how often a replica deletes expired keys


class ConcurrencyConfig(Strict):
    """Optimistic concurrency on `if_match` routes (docs/coordination.md)."""

    # An ETag an agent saw is used for If-Match this long after the answer that carried it;
    # later, its next write goes without one (as if it had never read the record).
    etag_ttl_seconds: float = Field(3600.0, gt=0, le=7 * 24 * 3600)
    sweep_interval_seconds: float = Field(60.0, gt=0)  # how often a replica deletes expired ETags


class WorkflowsConfig(Strict):
    """Workflow exceptions (docs/workflows.md, "Exceptions")."""

    # How often the control API process looks for stalled instances (no progress for longer
    # than their SLA) and escalates them; every replica does, each instance is escalated once.
    sweep_interval_seconds: float = Field(60.0, ge=0.1, le=3600)
    # Instances looked at per workflow and sweep (the most recently moved of the stalled ones first).
    sweep_batch: int = Field(1000, ge=1, le=100000)


DEFAULT_REDACT_KEYS = [
    "password", "passwd", "secret", "client_secret", "token", "access_token", "refresh_token", "api_key", "apikey",
    "authorization", "cookie", "set-cookie", "ssn", "card_number", "cardnumber", "cvv", "iban",
]
# Payment card numbers (13-19 digits, optionally grouped by spaces or dashes).
DEFAULT_REDACT_PATTERNS = [r"\b(?:\d[ -]?){12,18}\d\b"]


class AuditFileConfig(Strict):
    path: Path = Path("audit.jsonl")  # relative to state_dir
    max_bytes: int = Field(100 * 1024 * 1024, ge=0)  # rotate at this size (0: never)
    max_age_seconds: float = Field(86400.0, ge=0)  # rotate files older than this (0: never)
    keep: int = Field(30, ge=0)  # rotated files kept (0: all)
    fsync: bool = False  # fsync after every event (survives a power loss; much slower)
    overflow: Literal["block", "drop", "fail_closed"] = "fail_closed"
    # Full disk (docs/siem.md#full-disk): preallocated next to the file and given back when a
    # write hits ENOSPC, so events of requests already forwarded still land (0: no reserve) ...
    reserve_bytes: int = Field(1024 * 1024, ge=0)
    # ... and below this much free space the sink is unhealthy: writes are refused before forwarding (0: off).
    min_free_bytes: int = Field(16 * 1024 * 1024, ge=0)


class RedactConfig(Strict):
    """Values that never reach the decision record, the audit trail or its sinks."""

    keys: list[str] = Field(default_factory=lambda: list(DEFAULT_REDACT_KEYS))  # object keys, any depth
    patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_REDACT_PATTERNS))  # regexes over strings

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"redact pattern {p!r}: {e}") from None
        return v


class AuditConfig(Strict):
    """The OCSF audit trail (docs/siem.md)."""

    enabled: bool = True
    file: AuditFileConfig | None = Field(default_factory=AuditFileConfig)
    sinks: list[dict] = Field(default_factory=list)  # stdout / syslog / http (proxy/audit/netsinks.py)
    # Requests refused while a fail_closed sink is unhealthy (default: writes only).
    fail_closed_methods: list[str] = Field(default_factory=lambda: ["POST", "PUT", "PATCH", "DELETE"])
    block_timeout_seconds: float = Field(5.0, gt=0, le=300)
    redact: RedactConfig = Field(default_factory=RedactConfig)
    # The hash chain is keyed (HMAC-SHA256) so an intruder cannot re-sign a rewritten trail.
    # Key: chain_key_env (a variable), else chain_key_file (relative to state_dir), else
    # <state_dir>/audit-chain.key, generated on first start. `sha256`: unkeyed (not recommended).
    chain_alg: Literal["hmac-sha256", "sha256"] = "hmac-sha256"
    chain_key_file: Path | None = None
    chain_key_env: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_key_source(self):
        if self.chain_key_file is not None and self.chain_key_env is not None:
            raise ValueError("audit: set chain_key_file or chain_key_env, not both")
        if self.chain_alg == "sha256" and (self.chain_key_file is not None or self.chain_key_env is not None):
            raise ValueError("audit: chain_alg sha256 is unkeyed; remove chain_key_file / chain_key_env")
        return self


class ControlConfig(Strict):
    listen: Listen = Field(default_factory=lambda: Listen(port=8081))
    enabled: bool = True
    # Operators (agent registry, kill switch) authenticate like approvers (same
    # audience and groups claim) and must be in this group.
    admin_group: str = "proctor-admins"
    # Where agents, approvers and webhook receivers reach the control API (a Service or
    # ingress URL, e.g. https://proctor.example.com): held requests' status URL and
    # Location, and the default approvals.console_url, are built from it. Unset: the listen
    # address, or loopback for a wildcard listen host (with a startup warning).
    public_url: str | None = None
    # Where the OTHER replicas reach THIS one's control API (fleet views fan out to it): a
    # per-replica address, unlike public_url, which is usually a load-balanced Service.
    # `peer_url_env` names an environment variable holding it (Kubernetes: built from the
    # pod IP, `http://$(POD_IP):8081`). Unset: public_url, else a concrete listen address.
    peer_url: str | None = None
    peer_url_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")

    @field_validator("public_url", "peer_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        return None if v is None else check_public_url(v)

    @model_validator(mode="after")
    def _peer(self) -> "ControlConfig":
        if self.peer_url and self.peer_url_env:
            raise ValueError("control: give peer_url or peer_url_env, not both")
        return self

    def peer_base_url(self) -> str | None:
        """This replica's own control URL for the other replicas (ValueError: a bad or unset variable)."""
        if self.peer_url_env:
            value = os.environ.get(self.peer_url_env)
            if not value:
                raise ValueError(f"control.peer_url_env names {self.peer_url_env}, which is not set")
            return check_public_url(value)
        return self.peer_url

    @property
    def base_url(self) -> str:
        """The control API's base URL as clients reach it (never a wildcard address)."""
        return control_base_url(self.listen.host, self.listen.port, self.public_url)[0]


class ShutdownConfig(Strict):
    """Graceful shutdown on SIGTERM / SIGINT (proxy/shutdown.py, docs/configuration.md)."""

    # From the first signal: requests already decided or forwarded have this long to
    # finish (held ones are answered at once); then what is still open is cut. Keep
    # it below the orchestrator's kill deadline (Kubernetes terminationGracePeriodSeconds).
    grace_seconds: float = Field(20.0, ge=1, le=3600)


class AgentRegistration(Strict):
    """A pre-registered agent (the registry also records every agent it sees)."""

    id: str = Field(min_length=1, max_length=256)
    owner: str = ""
    team: str = ""
    description: str = ""


_MONITOR_NAME = r"^[^\x00-\x1f\x7f]{1,256}$"  # (agent ids and group names come from tokens: any printable text)


class MonitorConfig(Strict):
    """Monitor mode (docs/governance.md, "Monitor mode"): in the scopes named here a Cedar deny
    or approval hold is computed, recorded and audited as what it would have been, and the
    request is forwarded. `global` covers every request; `connectors` names connectors (checked
    against the loaded manifests at startup); `agents` agent ids and `groups` agent groups (as
    Cedar sees them: the token's groups claim). Authentication, the kill switch, malformed
    requests, egress default-deny, rate limits, budgets, duplicates and fail-closed 503s are
    enforced whatever this says."""

    global_: bool = Field(False, alias="global")
    connectors: list[Annotated[str, Field(pattern=_MONITOR_NAME)]] = Field(default_factory=list)
    agents: list[Annotated[str, Field(pattern=_MONITOR_NAME)]] = Field(default_factory=list)
    groups: list[Annotated[str, Field(pattern=_MONITOR_NAME)]] = Field(default_factory=list)


class ProctorConfig(Strict):
    state_dir: Path = Path(".proctor")
    listen: Listen = Field(default_factory=Listen)
    control: ControlConfig = Field(default_factory=ControlConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    transparent: TransparentConfig = Field(default_factory=TransparentConfig)
    identity: IdentityConfig | None = None  # None: the dev issuer only
    dev_issuer: DevIssuerConfig = Field(default_factory=DevIssuerConfig)
    # The interception CA from files or secrets (shared by replicas); None: generated in state_dir/ca.
    ca: CaConfig | None = None
    connectors_dir: Path = DEFAULTS_DIR / "connectors"
    # Workflow definitions (docs/workflows.md). None: the bundled ones when the connectors
    # are the bundled ones, else none (they name the bundled connectors' actions).
    workflows_dir: Path | None = None
    policies: PolicyConfig = Field(default_factory=lambda: PolicyConfig(dir=DEFAULTS_DIR / "policies"))
    # This replica's name in fleet views (/v1/policies): default the host name and the control port.
    replica_id: str | None = Field(None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    egress: EgressConfig = Field(default_factory=EgressConfig)
    limits: RequestLimits = Field(default_factory=RequestLimits)
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)
    record: RecordConfig = Field(default_factory=RecordConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    approvals: ApprovalsConfig = Field(default_factory=ApprovalsConfig)
    idempotency: IdempotencyConfig = Field(default_factory=IdempotencyConfig)
    concurrency: ConcurrencyConfig = Field(default_factory=ConcurrencyConfig)
    workflows: WorkflowsConfig = Field(default_factory=WorkflowsConfig)
    agents: list[AgentRegistration] = Field(default_factory=list)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    # Rate limits (docs/limits.md) and where their counters live.
    rate_limits: list[ConfigRateLimit] = Field(default_factory=list)
    counters: CountersConfig = Field(default_factory=CountersConfig)
    # Budgets (spend per calendar window, docs/limits.md "Budgets") and LLM token prices.
    budgets: list[BudgetSpec] = Field(default_factory=list)
    llm_prices: LlmPrices | None = None
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    # Monitor mode: would-be denies and holds recorded, not enforced (docs/governance.md)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @field_validator("rate_limits")
    @classmethod
    def _rate_limit_names(cls, v: list[ConfigRateLimit]) -> list[ConfigRateLimit]:
        return unique_names(v)

    @model_validator(mode="after")
    def _budget_names(self) -> "ProctorConfig":
        unique_budget_names(self.budgets, [lim.name for lim in self.rate_limits])
        if any(b.cost is not None and b.cost.llm for b in self.budgets) and self.llm_prices is None:
            raise ValueError("a budget with cost {llm: true} needs llm_prices (the token price table)")
        return self

    @model_validator(mode="after")
    def _transparent_port(self) -> "ProctorConfig":
        t = self.transparent
        if t.enabled:
            others = [("listen", self.listen.port), *([("gateway.listen", self.gateway.listen.port)]
                                                      if self.gateway.enabled else []),
                      *([("control.listen", self.control.listen.port)] if self.control.enabled else [])]
            for name, port in others:
                if port == t.port:
                    raise ValueError(f"transparent.port {t.port} is also {name}'s port: give the transparent "
                                     "listener a port of its own")
        return self

    # -- derived paths ---------------------------------------------------------
    @property
    def effective_workflows_dir(self) -> Path | None:
        if self.workflows_dir is not None:
            return self.workflows_dir
        bundled = DEFAULTS_DIR / "workflows"
        same = self.connectors_dir.resolve() == (DEFAULTS_DIR / "connectors").resolve()
        return bundled if same and bundled.is_dir() else None

    @property
    def dev_issuer_enabled(self) -> bool:
        if self.dev_issuer.enabled is None:
            return self.identity is None
        return self.dev_issuer.enabled

    @property
    def store_url(self) -> str:
        if self.store.url_env:
            url = os.environ.get(self.store.url_env)
            if not url:
                raise ValueError(f"store.url_env names {self.store.url_env}, which is not set")
            return url
        url = self.store.url or "sqlite:///proctor.db"
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            path = Path(url[len("sqlite:///"):])
            if not path.is_absolute():
                path = self.state_dir / path
            return f"sqlite://{path.resolve()}"  # the store takes sqlite:// + an absolute path
        return url

    @property
    def counters_redis_url(self) -> str:
        """The Redis URL of the rate-limit counters (counters.backend: redis)."""
        c = self.counters
        if c.redis_url_env:
            url = os.environ.get(c.redis_url_env)
            if not url:
                raise ValueError(f"counters.redis_url_env names {c.redis_url_env}, which is not set")
            return url
        if not c.redis_url:
            raise ValueError("counters.backend redis needs redis_url or redis_url_env")
        return c.redis_url

    @property
    def ca_dir(self) -> Path:
        """mitmproxy's confdir. A configured CA is copied (0600) into its own directory at
        startup, so the generated CA in `ca/` is kept intact for a config without one."""
        return self.state_dir / ("ca-configured" if self.ca is not None else "ca")

    @property
    def dev_issuer_dir(self) -> Path:
        # A configured key publishes its JWKS beside no generated key.pem (which would not match it).
        return self.state_dir / ("dev-issuer-configured" if self.dev_issuer.key_configured else "dev-issuer")

    @property
    def decisions_path(self) -> Path:
        return self.record.decisions_file or (self.state_dir / "decisions.jsonl")

    @property
    def audit_path(self) -> Path | None:
        if self.audit.file is None:
            return None
        p = self.audit.file.path
        return p if p.is_absolute() else self.state_dir / p

    @property
    def schema_path(self) -> Path:
        return self.policies.schema_file or (self.policies.dir / "schema.cedarschema")

    @property
    def entities_path(self) -> Path:
        """Static entities; an absent file means none (and is picked up when created)."""
        return self.policies.entities_file or (self.policies.dir / "entities.json")

    def effective_issuers(self) -> list[IssuerConfig]:
        """Configured issuers, plus the dev issuer when it is enabled."""
        issuers = list(self.identity.issuers) if self.identity else []
        if self.dev_issuer_enabled:
            issuers.append(
                IssuerConfig(
                    issuer=self.dev_issuer.issuer,
                    audience=self.dev_issuer.audience,
                    jwks_file=self.dev_issuer_dir / "jwks.json",
                    algorithms=["ES256"],
                )
            )
        return issuers

    def identity_settings(self) -> IdentityConfig:
        return self.identity or IdentityConfig(issuers=[])


class ConfigError(Exception):
    """A config file that cannot be used; the message says what and where."""


def _resolve_paths(raw: dict, base: Path) -> dict:
    """Make relative paths in a raw config dict relative to the config file's directory."""

    def fix(d: dict, key: str) -> None:
        if isinstance(d, dict) and isinstance(d.get(key), str):
            p = Path(os.path.expanduser(d[key]))
            d[key] = str(p if p.is_absolute() else base / p)

    # Without an explicit state_dir, state lives next to the config file.
    raw.setdefault("state_dir", ".proctor")
    fix(raw, "state_dir")
    fix(raw, "connectors_dir")
    fix(raw, "workflows_dir")
    pol = raw.get("policies")
    if isinstance(pol, dict):
        for k in ("dir", "schema_file", "entities_file", "shadow_dir"):
            fix(pol, k)
    up = raw.get("upstream")
    if isinstance(up, dict):
        fix(up, "ca_file")
    rec = raw.get("record")
    if isinstance(rec, dict):
        fix(rec, "decisions_file")
    tr = raw.get("transparent")
    if isinstance(tr, dict):
        fix(tr, "token_file")
    ca = raw.get("ca")
    if isinstance(ca, dict):
        fix(ca, "cert_file")
        fix(ca, "key_file")
    dev = raw.get("dev_issuer")
    if isinstance(dev, dict):
        fix(dev, "key_file")
    ident = raw.get("identity")
    if isinstance(ident, dict):
        for iss in ident.get("issuers") or []:
            if isinstance(iss, dict):
                fix(iss, "jwks_file")
                fix(iss, "jwks_ca_file")
    return raw


def load_config(path: str | Path | None) -> ProctorConfig:
    """Load `proctor.yaml` (or the embedded default when `path` is None)."""
    if path is None:
        return default_config()
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    raw = _resolve_paths(raw, p.resolve().parent)
    try:
        return ProctorConfig.model_validate(raw)
    except ValidationError as e:
        # every problem, by location, without echoing values (a config may hold a DSN with a password)
        problems = [
            f"  {'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}"
            for err in e.errors(include_url=False, include_input=False)
        ]
        raise ConfigError(f"{p}: invalid configuration:\n" + "\n".join(problems)) from None


def default_config() -> ProctorConfig:
    """The embedded default: everything bundled, state in ./.proctor."""
    return ProctorConfig(state_dir=Path(".proctor").resolve())
