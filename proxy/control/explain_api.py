"""Control API route for `proctor policy explain --decision ID --url URL`: a recorded decision,
re-evaluated under the current policies, whichever replica made it.

`GET /v1/decisions/{id}/explain` (operators: the answer shows the recorded Cedar inputs) looks
the decision up in this replica's decision record; when it is not there, every other live
replica is asked (control/fleet_views.py: the caller's token forwarded, `scope=replica`), and
the replica that made the decision explains it under its own current policies. The answer is
the document `proctor policy explain --decision ID --json` prints, plus `replica`.

404 when no replica has it (with `incomplete` and `missing` when some could not be asked: the
decision may be on one of them); 422 when it was refused before any policy ran (nothing to
explain).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from aiohttp import web

from ..policy.explain import recorded_explanation
from ..policy.replay import ReplayInputError, find_record
from ..record.model import DecisionRecord
from .auth import bearer, control_auth, problem
from .fleet_views import FleetViews
from .models import ExplainQuery, read_query

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")


class NotExplainable(Exception):
    """A recorded decision made before any policy ran (or recorded without its inputs)."""


def explain_here(runtime: ProctorRuntime, decision_id: str) -> dict[str, Any] | None:
    """This replica's explanation of one of its own decisions; None: not in its record."""
    try:
        rec: DecisionRecord | None = find_record(runtime.config.decisions_path, decision_id)
    except ReplayInputError:  # (no decision record yet)
        return None
    if rec is None:
        return None
    if rec.cedar is None or not rec.action:
        refusal = rec.refusal
        raise NotExplainable(
            f"decision {decision_id} was refused before any policy ran ({refusal['kind'] if refusal else '?'}: "
            f"{refusal['detail'] if refusal else ''}), or recorded without policy inputs")
    return recorded_explanation(runtime.policies, rec)


def add_explain_routes(app: web.Application, runtime: ProctorRuntime) -> None:
    auth = control_auth(app, runtime.config)
    views = FleetViews(runtime)

    async def explain(request: web.Request) -> web.Response:
        who = await auth.operator(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, ExplainQuery)
        if isinstance(q, web.Response):
            return q
        decision_id = request.match_info["id"].strip()
        if not decision_id or len(decision_id) > 256:
            return problem(400, "Bad decision id", "a decision id is 1 to 256 characters (X-Proctor-Decision-Id)")
        try:
            found = await asyncio.to_thread(explain_here, runtime, decision_id)
        except NotExplainable as e:
            return problem(422, "Nothing to explain", str(e), extra={"replica": views.replica_id})
        if found is not None:
            return web.json_response({**found, "replica": views.replica_id})
        missing: list[dict[str, str]] = []
        if q.scope == "fleet":
            peers, missing = await views.peers_or_missing()
            asked = await views.ask(peers, f"/v1/decisions/{quote(decision_id, safe='')}/explain", {},
                                    bearer(request) or "",
                                    accept=(200, 404, 422))
            missing = missing + asked.missing
            for replica, (status, doc) in sorted(asked.answers.items()):
                if status == 200:
                    return web.json_response(doc)
                if status == 422:  # that replica made it, before any policy ran
                    return problem(422, "Nothing to explain", str(doc.get("detail", "")), extra={"replica": replica})
        where = "any live replica's decision record" if q.scope == "fleet" else "this replica's decision record"
        return problem(404, "No such decision", f"no decision {decision_id} in {where}"
                       + ("; it may be on a replica that could not be asked: "
                          + "; ".join(f"{m['replica']} ({m['error']})" for m in missing) if missing else ""),
                       extra={"replica": views.replica_id, "incomplete": bool(missing), "missing": missing})

    app.router.add_get("/v1/decisions/{id}/explain", explain)
