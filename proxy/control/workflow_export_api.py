"""Control API route for the process-mining export of workflow history (docs/workflows.md,
"Process-mining export"; the log is built by proxy/workflows/export.py).

    GET /v1/workflows/export?format=ocel2|csv&workflow=&since=&until=

People authenticate as for the other workflow views (an approver or operator token): the log
carries what the instance views show (step, agent, decision id, business object ids), never a
body. The answer is streamed. The OCEL 2.0 log is assembled in a temporary file before the first
byte is sent, so a store failure is a clean 503; the CSV log is sent as it is read, so a store
failure after the first rows ends the transfer without its final chunk (an incomplete download,
never a short file that looks whole).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Annotated, Literal

from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from ..store import StoreError
from ..workflows.export import csv_chunks, ocel_chunks, parse_when
from .auth import control_auth, problem
from .models import FilterText, InputModel, read_query
from .models_responses import Timestamp

if TYPE_CHECKING:
    from ..server import ProctorRuntime

log = logging.getLogger("proctor.control")
CSV_MEDIA = "text/csv"


def _when(value: str) -> str:
    try:
        parse_when(value)
    except ValueError as e:
        raise PydanticCustomError("time_format", str(e)) from None
    return value


WhenText = Annotated[str, StringConstraints(strip_whitespace=True, max_length=64), AfterValidator(_when)]


class ExportQuery(InputModel):
    FIELD_TITLES = {"since": "Bad time", "until": "Bad time", "format": "Bad format"}
    BAD_TITLE = "Bad filter"
    format: Literal["ocel2", "csv"] = Field(
        "ocel2", description="`ocel2`: an OCEL 2.0 JSON log (application/json); `csv`: a flat event log, one row "
        "per step event (text/csv).")
    workflow: FilterText | None = Field(None, description="Only this workflow (a loaded definition; else 404).")
    since: WhenText | None = Field(
        None, description="Only events at or after this time: ISO 8601 (UTC when no offset is given), epoch "
        "seconds, or a span back from now (30m, 24h, 7d).")
    until: WhenText | None = Field(None, description="Only events before this time (excluded), as `since`.")


# ---- the OCEL 2.0 JSON log, as documented (the answer is written by workflows/export.py) ----
class _Ocel(BaseModel):
    model_config = ConfigDict(frozen=True)


class OcelAttributeDeclaration(_Ocel):
    name: str
    type: Literal["string", "time", "integer", "float", "boolean"]


class OcelType(_Ocel):
    name: str
    attributes: list[OcelAttributeDeclaration]


class OcelRelationship(_Ocel):
    objectId: str
    qualifier: str = Field(description="event -> object: `instance`, `performed-by`, `creates` or `names`; "
                           "object -> object: `part-of` (a business object in a workflow instance).")


class OcelEventAttribute(_Ocel):
    name: str
    value: str = Field(description="As text; the event type's declaration says its type.")


class OcelObjectAttribute(_Ocel):
    name: str
    value: str = Field(description="As text; the object type's declaration says its type.")
    time: str = Field(description="From when the value holds (1970-01-01T00:00:00Z: always).",
                      json_schema_extra={"format": "date-time"})


class OcelEvent(_Ocel):
    id: str = Field(description="`ev-` and the store's sequence number.")
    type: str = Field(description="The step (completed), or `<step> failed` / `<step> refused`.")
    time: Timestamp
    attributes: list[OcelEventAttribute]
    relationships: list[OcelRelationship]


class OcelObject(_Ocel):
    id: str = Field(description="`wfi_...` (a workflow instance), `Agent:<id>`, or `<Type>:<id>` (a business "
                    "object).")
    type: str
    attributes: list[OcelObjectAttribute]
    relationships: list[OcelRelationship]


class OcelLog(_Ocel):
    """An OCEL 2.0 JSON log (https://www.ocel-standard.org)."""

    objectTypes: list[OcelType]
    eventTypes: list[OcelType]
    objects: list[OcelObject]
    events: list[OcelEvent]


def add_workflow_export_routes(app: web.Application, runtime: "ProctorRuntime") -> None:
    auth = control_auth(app, runtime.config)

    async def export(request: web.Request) -> web.StreamResponse:
        who = await auth.person(request)
        if isinstance(who, web.Response):
            return who
        q = read_query(request, ExportQuery)
        if isinstance(q, web.Response):
            return q
        if q.workflow is not None and runtime.workflows.get(q.workflow) is None:
            return problem(404, "No such workflow", "no loaded workflow definition has that name")
        since = parse_when(q.since) if q.since else None
        until = parse_when(q.until) if q.until else None
        if since is not None and until is not None and until <= since:
            return problem(400, "Bad time", "until must be after since",
                           extra={"errors": [{"field": "until", "in": "query", "message": "must be after since"}]})
        specs = runtime.workflows.specs
        make = ocel_chunks if q.format == "ocel2" else csv_chunks
        chunks = make(runtime.store, specs, workflow=q.workflow, since=since, until=until)
        try:  # the generator holds a temporary file: close it however this ends (a client gone midway too)
            return await _send(request, chunks, q, who.id)
        finally:
            await chunks.aclose()

    async def _send(request: web.Request, chunks: AsyncGenerator[str, None], q: ExportQuery, who: str) -> web.StreamResponse:
        try:
            first = await anext(chunks)
        except StoreError as e:
            log.error("workflow export: store error: %s", e)
            return problem(503, "Store unavailable", "the state store cannot be reached; try again")
        name = "proctor-workflows" + (f"-{q.workflow}" if q.workflow else "")
        media, suffix = ("application/json", "ocel.json") if q.format == "ocel2" else (CSV_MEDIA, "csv")
        resp = web.StreamResponse(headers={
            "Content-Type": f"{media}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{name}.{suffix}"',
            "Cache-Control": "no-store",
        })
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(first.encode("utf-8", "replace"))
        try:
            async for chunk in chunks:
                await resp.write(chunk.encode("utf-8", "replace"))
        except StoreError as e:
            # the status is sent: end the transfer without its final chunk, so the client sees it incomplete
            log.error("workflow export: store error midway, transfer aborted: %s", e)
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
        log.info("workflow export (%s) by %s: workflow=%s since=%s until=%s", q.format, who, q.workflow,
                 q.since, q.until)
        return resp

    app.router.add_get("/v1/workflows/export", export)
