"""An unmodified MCP agent (the official MCP Python SDK client, configured by its environment
alone) that sends one message Proctor may refuse although no caller waits on an answer to it,
then goes on, and reports what the SDK made of it.

    python mcp_refused_client.py https://mcp.example/mcp notification|answer

- notification: initialize, send notifications/roots/list_changed, then search_tickets
- answer: initialize, call close_ticket: the server asks the user first (elicitation) and
  the client's answer is a JSON-RPC response (`rpc.response` in the connector)

Every step runs under a deadline, so a client that would wait forever says so instead.
Prints a JSON transcript: each step's outcome (ok, or the exception's type and message) and
the SDK's own log records (its transport logs an HTTP error it cannot hand to a caller).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any

import anyio
from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.context import RequestContext
from mcp.shared.exceptions import McpError

STEP_DEADLINE = 20.0


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            exc = record.exc_info[1] if record.exc_info else None
            self.records.append({"logger": record.name, "level": record.levelname, "message": record.getMessage(),
                                 "exception": f"{type(exc).__name__}: {exc}" if exc else None})


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


def _failure(e: BaseException) -> dict[str, Any]:
    leaves = _leaves(e)
    out: dict[str, Any] = {"ok": False, "errors": [f"{type(x).__name__}: {x}" for x in leaves]}
    for x in leaves:
        if isinstance(x, McpError):
            out["mcp_error"] = {"code": x.error.code, "message": x.error.message, "data": x.error.data}
    return out


async def _step(out: dict[str, Any], name: str, work: Any) -> None:
    started = time.monotonic()
    try:
        with anyio.fail_after(STEP_DEADLINE):
            result = await work()
        out[name] = {"ok": True, "result": result}
    except TimeoutError:
        out[name] = {"ok": False, "timeout": True}
    except Exception as e:  # noqa: BLE001 - reported, not handled
        out[name] = _failure(e)
    out[name]["seconds"] = round(time.monotonic() - started, 2)


async def main(url: str, scenario: str) -> dict[str, Any]:
    out: dict[str, Any] = {"asked": []}

    async def confirm(context: RequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        out["asked"].append(params.message)
        return types.ElicitResult(action="accept", content={"confirm": True})

    def text(result: types.CallToolResult) -> list[str]:
        return [c.text for c in result.content if getattr(c, "type", None) == "text"]

    try:
        async with streamable_http_client(url) as (read, write, get_session_id):
            async with ClientSession(read, write, elicitation_callback=confirm) as session:
                await _step(out, "initialize", lambda: _initialize(session))
                if scenario == "notification":
                    await _step(out, "notify", session.send_roots_list_changed)
                    await asyncio.sleep(0.5)  # the transport posts it after send returns
                    await _step(out, "after", lambda: _search(session, text))
                else:
                    await _step(out, "close", lambda: _close(session, text))
                    await _step(out, "after", lambda: _search(session, text))
        out["exited"] = {"ok": True}
    except BaseException as e:  # noqa: BLE001 - an exception group out of the transport's task group
        out["exited"] = _failure(e)
    return out


async def _initialize(session: ClientSession) -> str:
    return (await session.initialize()).serverInfo.name


async def _search(session: ClientSession, text: Any) -> list[str]:
    return text(await session.call_tool("search_tickets", {"query": "printer"}))


async def _close(session: ClientSession, text: Any) -> list[str]:
    return text(await session.call_tool("close_ticket", {"ticket_id": "T-2"}))


if __name__ == "__main__":
    captured = Captured()
    logging.getLogger("mcp").addHandler(captured)
    logging.getLogger("mcp").setLevel(logging.DEBUG)
    transcript = anyio.run(main, sys.argv[1], sys.argv[2])
    transcript["log"] = captured.records
    print(json.dumps(transcript))
