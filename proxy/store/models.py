"""Records kept in the durable state store.

Plain dataclasses, engine-agnostic: timestamps are float epoch seconds, nested
data (approval groups, votes, request/derived summaries, policy files) is
stored as JSON text by every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field

APPROVAL_STATES = ("pending", "approved", "denied", "expired", "forwarded", "cancelled")
# States in which an approval still answers a retry of the same request.
OPEN_APPROVAL_STATES = ("pending", "approved", "denied")
VOTE_DECISIONS = ("approve", "deny")
SUSPENSION_KINDS = ("agent", "connector", "action")


@dataclass
class Vote:
    approver: str
    group: str
    decision: str  # "approve" | "deny"
    reason: str
    at: float


@dataclass
class Approval:
    id: str  # "apr_" + 20 url-safe random chars, made by the caller
    state: str  # pending | approved | denied | expired | forwarded | cancelled
    created_at: float
    expires_at: float
    agent_id: str
    action: str
    resource_type: str
    resource_id: str
    connector: str
    groups: dict[str, int]  # approval group -> approvals required from it (N-of-M)
    fingerprint: str  # request fingerprint (hex) used to match an async retry
    idempotency_key: str | None
    mode: str  # "sync" | "async"
    decision_id: str  # decision that created the hold
    request: dict  # display summary: method, url, headers (already redacted), body preview
    derived: dict  # action, resource, attributes, context summary, policy ids asking for approval
    escalate_at: float | None = None
    escalated: bool = False
    votes: list[Vote] = field(default_factory=list)
    decided_at: float | None = None
    decided_by: str | None = None
    reason: str | None = None
    forwarded_at: float | None = None
    version: int = 1  # optimistic concurrency (see Store.update_approval)


@dataclass
class AgentRecord:
    id: str
    owner: str = ""
    team: str = ""
    description: str = ""
    registered: bool = False
    first_seen: float | None = None
    last_seen: float | None = None
    requests: int = 0
    allowed: int = 0
    denied: int = 0


@dataclass
class Suspension:
    kind: str  # "agent" | "connector" | "action"
    target: str
    since: float
    by: str
    reason: str


@dataclass
class PolicyRevision:
    revision: str
    loaded_at: float
    files: dict[str, str]  # filename -> text
    active: bool = False


@dataclass
class ReplicaBeat:
    """One replica's last report (proxy/policy/fleet.py): which policy revision it enforces."""

    replica_id: str
    hostname: str
    policy_source: str  # directory | store
    revision: str  # the revision it enforces (its own hash of what it loaded)
    following: str | None  # store mode: the fleet revision it follows (None: directory mode)
    reload_ok: bool
    started_at: float
    last_seen: float
    # where the other replicas reach its control API (control.public_url, else the listen
    # address): the fleet views (activity, explain) ask each replica for its own records
    control_url: str | None = None
