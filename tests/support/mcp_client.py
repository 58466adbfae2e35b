"""An unmodified MCP agent: the official MCP Python SDK client, configured by nothing but
its environment (HTTPS_PROXY/HTTP_PROXY, SSL_CERT_FILE: httpx's defaults).

    python mcp_client.py https://mcp.example/mcp

Runs a whole session (initialize, discovery, allowed and denied tool calls, a tool
that asks the user to confirm (elicitation: the client answers the server's request),
ping, a notification, then the close that ends the session) and prints a JSON transcript.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from mcp import ClientSession, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.context import RequestContext
from mcp.shared.exceptions import McpError


def _tool_result(result: Any) -> dict:
    return {
        "is_error": result.isError,
        "text": [c.text for c in result.content if getattr(c, "type", None) == "text"],
        "structured": result.structuredContent,
    }


async def _call(session: ClientSession, name: str, arguments: dict) -> dict:
    try:
        return {"result": _tool_result(await session.call_tool(name, arguments))}
    except McpError as e:  # a JSON-RPC error answer
        return {"error": {"code": e.error.code, "message": e.error.message, "data": e.error.data}}


async def main(url: str) -> dict:
    out: dict[str, Any] = {"asked": []}

    async def confirm(context: RequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        """The user's side of an elicitation: say yes (the answer is a JSON-RPC response)."""
        out["asked"].append(params.message)
        return types.ElicitResult(action="accept", content={"confirm": True})

    async with streamable_http_client(url) as (read, write, get_session_id):
        async with ClientSession(read, write, elicitation_callback=confirm) as session:
            init = await session.initialize()
            out["server"] = init.serverInfo.name
            out["protocol_version"] = init.protocolVersion
            out["session_id"] = get_session_id()
            out["tools"] = sorted(t.name for t in (await session.list_tools()).tools)
            out["search"] = await _call(session, "search_tickets", {"query": "printer"})
            out["create"] = await _call(session, "create_ticket", {"title": "Monitor flickers", "priority": 3})
            out["create_p1"] = await _call(session, "create_ticket", {"title": "Datacenter on fire", "priority": 1})
            out["delete"] = await _call(session, "delete_ticket", {"ticket_id": "T-1"})
            out["close"] = await _call(session, "close_ticket", {"ticket_id": "T-2"})  # asks the user first
            out["resources"] = sorted(str(r.uri) for r in (await session.list_resources()).resources)
            out["resource_templates"] = sorted(
                t.uriTemplate for t in (await session.list_resource_templates()).resourceTemplates)
            queues = await session.read_resource("helpdesk://queues")  # type: ignore[arg-type]
            out["queues"] = [getattr(c, "text", None) for c in queues.contents]
            out["prompts"] = sorted(p.name for p in (await session.list_prompts()).prompts)
            prompt = await session.get_prompt("triage", {"ticket_id": "T-2"})
            out["prompt"] = [getattr(m.content, "text", None) for m in prompt.messages]
            await session.send_ping()
            out["pinged"] = True
            await session.send_roots_list_changed()  # a notification: no id, no answer
            await asyncio.sleep(0.3)  # let the GET stream open (the client starts it after initialize)
    out["closed"] = True  # the transport sent the DELETE that ends the session
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1]))))
