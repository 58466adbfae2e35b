"""Control API route for duplicate-work suppression (docs/coordination.md, "Duplicate work").

    GET /v1/duplicates[?kind=idempotency|dedupe&agent=ID&limit=N]   live entries (operators)

One entry per live row of the idempotency table: an agent's `Idempotency-Key`
(`kind: idempotency`, scope `idem:<agent>`) or a route's dedupe window (`kind:
dedupe`, scope `dedupe:<connector>:<method> <path>`), with the request that
holds it (`first_decision_id`, `agent`), its state (`in-progress` or
`completed`, the upstream's `status` once completed), whether a response is
kept for replay, and when it was created and ends. Newest first.

What is never shown:
- the stored response bodies (they are business data the upstream answered one
  agent; the store query does not even read them);
- the keys themselves: an agent's Idempotency-Key is its own value (some agents
  build keys from order numbers, customer ids or e-mail addresses), and a
  dedupe key is a SHA-256 over a few typed business values, small enough to be
  confirmed by guessing. Neither helps an operator: the entry is named by its
  scope and the decision that holds it;
- the request fingerprint (a digest of the method, URL, body and bound headers);
- response headers other than the `Location` of what the first request created,
  reduced to scheme, host and path (no query string, no userinfo).

Operators authenticate as for claims and the kill switch (control.admin_group).
The recent suppressed requests themselves are in the audit trail:
`GET /v1/activity?record=duplicate`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Annotated, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..logredact import safe_url
from ..record.decisions import iso
from ..store import StoreError
from ..store.idempotency import IdempotencyEntry
from .auth import control_auth, problem
from .models import MAX_PAGE, FilterText, InputModel, _clamp, read_query
from .models_responses import Timestamp

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")


# ---- what the route accepts and answers (documented in control/openapi.py) ----
class DuplicateListQuery(InputModel):
    FIELD_TITLES = {"limit": "Bad paging"}
    BAD_TITLE = "Bad filter"
    kind: Literal["idempotency", "dedupe"] | None = Field(
        None, description="Only agents' Idempotency-Keys (`idempotency`) or routes' dedupe windows (`dedupe`)."
    )
    agent: FilterText | None = Field(None, description="Only entries held by this agent's requests.")
    limit: Annotated[int, _clamp(1, MAX_PAGE)] = Field(200, description="At most this many, clamped to 1..1000.")


class DuplicateEntry(BaseModel):
    """A live idempotency key or dedupe window: a repeat of the request that holds it is not
    forwarded until `expires_at` (docs/coordination.md, "Duplicate work")."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["idempotency", "dedupe"]
    scope: str = Field(description="`idem:<agent>` (a key belongs to one agent) or `dedupe:<connector>:<method> <path>`.")
    connector: str | None = Field(None, description="The route's connector (dedupe windows).")
    route: str | None = Field(None, description="The route, `<METHOD> <path template>` (dedupe windows).")
    agent: str = Field(description="The agent whose request holds the entry.")
    first_decision_id: str = Field(description="The decision id of that request.")
    state: Literal["in-progress", "completed"]
    status: int | None = Field(None, description="The upstream's status, once completed.")
    replayable: bool = Field(description="A response is kept: a repeat of an Idempotency-Key gets it replayed "
                                         "(else 409); a dedupe window replays it only on routes declared "
                                         "`answer: replay`.")
    first_result: str | None = Field(
        None, description="The upstream's `Location` for what the first request created (no query string).")
    created_at: Timestamp
    expires_at: Timestamp = Field(description="In progress: when a crashed holder's reservation lapses; "
                                              "completed: when the window or the replay ends.")

    @classmethod
    def of(cls, e: IdempotencyEntry) -> "DuplicateEntry":
        connector = route = None
        if e.scope.startswith("dedupe:"):
            kind: Literal["idempotency", "dedupe"] = "dedupe"
            connector, _, route = e.scope[len("dedupe:"):].partition(":")
        else:
            kind = "idempotency"
        location = e.headers.get("location") if isinstance(e.headers, dict) else None
        return cls(
            kind=kind, scope=e.scope, connector=connector or None, route=route or None, agent=e.agent_id,
            first_decision_id=e.owner, state="completed" if e.state == "completed" else "in-progress",
            status=e.status, replayable=bool(e.body_stored) and e.state == "completed",
            first_result=(safe_url(location) or None) if isinstance(location, str) else None,
            created_at=iso(e.created_at), expires_at=iso(e.expires_at),
        )


class DuplicateList(BaseModel):
    model_config = ConfigDict(frozen=True)
    entries: list[DuplicateEntry] = Field(description="Newest first.")
    limit: int


def add_duplicate_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    auth = control_auth(app, runtime.config)

    async def list_duplicates(request: web.Request) -> web.Response:
        who = await auth.operator(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, DuplicateListQuery)
        if isinstance(q, web.Response):
            return q
        try:
            entries = await runtime.store.list_idempotency(time.time(), kind=q.kind, agent=q.agent or None,
                                                           limit=q.limit)
        except StoreError as e:
            log.error("store error: %s", e)
            return problem(503, "Store unavailable", "the state store cannot be reached; try again")
        out = DuplicateList(entries=[DuplicateEntry.of(e) for e in entries], limit=q.limit)
        return web.json_response(out.model_dump(mode="json"))

    app.router.add_get("/v1/duplicates", list_duplicates)
