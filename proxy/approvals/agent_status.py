"""The approval status a transparent agent reads (docs/transparent.md, docs/approvals.md).

A held request's answer names a status URL. A forward-proxy or gateway agent
reads it at the control API with its own token. A transparent agent has no token
and the rules refuse it the control port, so `proctor netsetup` redirects its
connections to the control port on a local address to the transparent listener
(the status address), and the engine asks this module for the answer to exactly
`GET /v1/approvals/{id}/status` there (engine/transparent.py decides what is a
status request). The answer is the control API's: the same body
(`ApprovalStatus`), `Retry-After` while pending, and 404 for an approval that is
not the workload identity's, as for an unknown id, so another agent's approvals
are never revealed. Without a usable workload identity: 503, like every
transparent request.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from ..control.models_responses import ApprovalStatus
from ..identity.errors import IdentityUnavailable
from ..identity.workload import WorkloadIdentity, WorkloadUnavailable
from ..store import StoreError
from .service import ApprovalService

log = logging.getLogger("proctor.approvals")

Answer = tuple[int, dict[str, str], bytes]


def _problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None,
             extra: dict[str, Any] | None = None) -> Answer:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, **(extra or {})}
    return status, {"Content-Type": "application/problem+json", **(headers or {})}, json.dumps(body).encode()


class AgentStatus:
    """`answer(approval_id)`: the status of one of the workload identity's approvals."""

    def __init__(self, service: ApprovalService, workload: WorkloadIdentity) -> None:
        self.service = service
        self.workload = workload

    async def answer(self, approval_id: str) -> Answer:
        try:
            identity, _ = await self.workload.current()
        except (WorkloadUnavailable, IdentityUnavailable) as e:
            return _problem(503, "Workload identity unavailable",
                            f"{e}; the approval status cannot be attributed to the workload until the sidecar's "
                            "token file holds a valid token", {"Retry-After": "5"},
                            {"reasons": ["workload-identity-unavailable"]})
        try:
            approval = await self.service.store.get_approval(approval_id)
        except StoreError as e:
            log.error("approval store error: %s", e)
            return _problem(503, "Approval store unavailable", "the approval store cannot be reached; try again",
                            {"Retry-After": "5"})
        if approval is None or approval.agent_id != identity.agent_id:
            return _problem(404, "No such approval", "no approval with that id for you")
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        if approval.state == "pending":
            headers["Retry-After"] = str(self.service.config.retry_after_seconds)
        body = ApprovalStatus.of(approval).model_dump(mode="json", exclude_unset=True)
        return 200, headers, json.dumps(body, separators=(",", ":")).encode()
