"""Kill-switch stages: a suspended agent, connector or action is refused.

The agent is checked as soon as it is known (right after authentication); the
connector and action once the request is classified. Agent activity (first and
last seen, allowed and denied counts) is noted on the way back.
"""

from __future__ import annotations

from ..core.chain import Stage
from ..core.exchange import Exchange, Kind
from .registry import Governance, suspension_refusal


class AgentSuspended(Stage):
    name = "suspended-agent"

    def __init__(self, governance: Governance) -> None:
        self.governance = governance

    def on_request(self, ex: Exchange) -> None:
        assert ex.identity is not None
        suspended = self.governance.agent_suspension(ex.identity.agent_id)
        if suspended is not None:
            ex.refuse(suspension_refusal(suspended))

    def on_response(self, ex: Exchange) -> None:
        # only requests that reached a decision count as activity (not tunnels, not refusals before it)
        if ex.kind is Kind.REQUEST and ex.identity is not None and ex.decision_ms is not None:
            self.governance.seen(ex.identity.agent_id, ex.allowed)


class TargetSuspended(Stage):
    name = "suspended-target"

    def __init__(self, governance: Governance) -> None:
        self.governance = governance

    def on_request(self, ex: Exchange) -> None:
        assert ex.classification is not None
        suspended = self.governance.target_suspension(ex.classification)
        if suspended is not None:
            ex.refuse(suspension_refusal(suspended))
