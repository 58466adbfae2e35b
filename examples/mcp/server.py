"""A small helpdesk MCP server (the official MCP Python SDK's FastMCP, Streamable HTTP).

The MCP server behind the example connector (examples/mcp/helpdesk-mcp.yaml): four
tools (search, create, close and delete tickets; closing asks the user to confirm, a
server-to-client request the client answers), a resource and a resource template, and
a prompt, at http://127.0.0.1:9110/mcp by default.

    python examples/mcp/server.py [--port 9110] [--cert server.pem --key server.key]
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

from mcp.server.fastmcp import Context, FastMCP
from pydantic import BaseModel

TICKETS: dict[str, dict[str, Any]] = {
    "T-1": {"id": "T-1", "title": "Printer on floor 3 is jammed", "priority": 3, "status": "open"},
    "T-2": {"id": "T-2", "title": "VPN drops every hour", "priority": 2, "status": "open"},
}


class Confirm(BaseModel):
    confirm: bool


def build_server(host: str = "127.0.0.1", port: int = 9110) -> FastMCP:
    mcp = FastMCP("helpdesk", instructions="Search, open and close helpdesk tickets.", host=host, port=port)
    ids = itertools.count(3)

    @mcp.tool()
    def search_tickets(query: str) -> list[dict[str, Any]]:
        """Tickets whose title contains the query (case-insensitive)."""
        return [t for t in TICKETS.values() if query.lower() in t["title"].lower()]

    @mcp.tool()
    def create_ticket(title: str, priority: int = 3) -> dict[str, Any]:
        """Open a ticket; priority 1 (urgent) to 4 (low)."""
        ticket = {"id": f"T-{next(ids)}", "title": title, "priority": priority, "status": "open"}
        TICKETS[ticket["id"]] = ticket
        return ticket

    @mcp.tool()
    async def close_ticket(ticket_id: str, ctx: Context) -> str:
        """Close a ticket, once the user confirms (MCP elicitation)."""
        answer = await ctx.elicit(f"Close ticket {ticket_id}?", schema=Confirm)
        if answer.action != "accept" or not answer.data.confirm:
            return f"{ticket_id} left open"
        if ticket_id in TICKETS:
            TICKETS[ticket_id]["status"] = "closed"
        return f"closed {ticket_id}"

    @mcp.tool()
    def delete_ticket(ticket_id: str) -> str:
        """Delete a ticket for good."""
        TICKETS.pop(ticket_id, None)
        return f"deleted {ticket_id}"

    @mcp.resource("helpdesk://queues")
    def queues() -> str:
        """The helpdesk's queues."""
        return "hardware, network, access"

    @mcp.resource("helpdesk://tickets/{ticket_id}")
    def ticket(ticket_id: str) -> dict[str, Any]:
        """One ticket."""
        return TICKETS.get(ticket_id, {})

    @mcp.prompt()
    def triage(ticket_id: str) -> str:
        """Ask the model to triage a ticket."""
        return f"Triage ticket {ticket_id}: pick a queue and a priority, and say why."

    return mcp


def main() -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9110)
    ap.add_argument("--cert", help="serve HTTPS with this certificate chain (PEM)")
    ap.add_argument("--key", help="the certificate's private key (PEM)")
    args = ap.parse_args()
    app = build_server(args.host, args.port).streamable_http_app()
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.cert, ssl_keyfile=args.key, log_level="warning")


if __name__ == "__main__":
    main()
