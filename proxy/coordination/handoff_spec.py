"""The `handoff:` declaration of a connector route (docs/coordination.md, "Handoffs").

    - method: PATCH
      path: /api/now/table/incident/{sys_id}
      claim: {mode: exclusive, ttl_seconds: 900}
      body:
        assigned_to: {path: assigned_to}
        assignment_group: {path: assignment_group}
      handoff:
        to: {agent: assigned_to, group: assignment_group}
        human_groups: [service-desk, network-ops]
        ttl_seconds: 900
        human_ttl_seconds: 86400

When a write on such a route is forwarded and the upstream answers 2xx, the claim
on the resource moves to the target the request names: the agent in `to.agent`
if the body (or path) names one, else the group in `to.group`. A group listed
in `human_groups` (or any group, with `human_groups: ["*"]`) is people: the claim
ends and the resource goes to that group's inbox (a human queue). Any other group
value is taken to be an agent id (teams of agents are addressed by their id).
Kept apart from the manifest module (like dedupe) so the stage and the manifest
share one definition without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

ANY_GROUP = "*"


class HandoffTarget(BaseModel):
    """Which declared values (a body value or a path parameter) name the new holder."""

    model_config = ConfigDict(extra="forbid")
    agent: str | None = Field(None, min_length=1, description="Value naming the agent that takes over.")
    group: str | None = Field(None, min_length=1, description="Value naming the group that takes over.")

    @model_validator(mode="after")
    def _one(self) -> "HandoffTarget":
        if self.agent is None and self.group is None:
            raise ValueError("to needs agent or group (the declared value naming the new holder)")
        return self


class HandoffSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: HandoffTarget
    # Groups that are people: a handoff to one of them goes to its inbox, not to an agent.
    human_groups: list[str] = Field(default_factory=list, max_length=256)
    # The new holder's lease; default: the route's claim ttl_seconds.
    ttl_seconds: int | None = Field(None, ge=1, le=7 * 24 * 3600)
    # How long an item waits in a human group's inbox (people work slower than agents);
    # default: ttl_seconds (else the claim's).
    human_ttl_seconds: int | None = Field(None, ge=1, le=30 * 24 * 3600)

    def is_human(self, group: str) -> bool:
        return ANY_GROUP in self.human_groups or group in self.human_groups


def check_route_handoff(spec: HandoffSpec, method: str, path: str, params: set[str], body: set[str],
                        has_claim: bool, jsonrpc: bool) -> None:
    """Raise ValueError naming the route when its handoff declaration cannot work."""
    where = f"handoff on {method} {path}"
    if jsonrpc:
        raise ValueError(f"{where}: not supported on jsonrpc routes")
    if method in ("GET", "HEAD", "OPTIONS", "TRACE"):
        raise ValueError(f"{where}: only writes hand off, not {method}")
    if not has_claim:
        raise ValueError(f"{where}: the route needs a claim (a handoff moves the route's claim)")
    for role, name in (("agent", spec.to.agent), ("group", spec.to.group)):
        if name is not None and name not in params and name not in body:
            raise ValueError(f"{where}: to.{role} names {name!r}, which is neither a declared path parameter "
                             "(params) nor a declared body value (body)")
