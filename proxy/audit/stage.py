"""The audit gate: a request is forwarded only while the audit trail can record it.

Runs once per request, after everything else that could refuse it (and before an
approval is spent), so a sink that is full or unreachable refuses writes with a
503 instead of letting them happen unrecorded (per sink `overflow` setting).
"""

from __future__ import annotations

from ..core.chain import Stage
from ..core.exchange import Exchange
from .trail import AuditTrail


class AuditGate(Stage):
    name = "audit-gate"

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    async def on_request(self, ex: Exchange) -> None:
        assert ex.request is not None
        refusal = await self.trail.admit(ex.request.method)
        if refusal is not None:
            ex.refuse(refusal)
