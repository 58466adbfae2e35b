"""The example helpdesk MCP server (examples/mcp/server.py) as a recording test upstream.

    python mcp_upstream.py --port 9110 --log seen.jsonl [--cert c.pem --key k.pem]

Every HTTP request that reaches the server is appended to the log before the MCP SDK
handles it: method, path, the MCP headers, and the JSON-RPC method, id and tool of a
POST, so a test can tell exactly what got past Proctor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "mcp"))
from server import build_server  # noqa: E402


def recording(app: Any, log_path: str) -> Any:
    log = open(log_path, "a", buffering=1)

    async def wrapped(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more and scope["method"] == "POST":
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        entry: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "session": headers.get("mcp-session-id"),
            "accept": headers.get("accept"),
            "authorization": headers.get("authorization"),
            "proxy_authorization": headers.get("proxy-authorization"),
        }
        if body:
            try:
                doc = json.loads(body)
                entry["rpc"] = doc.get("method")
                entry["id"] = doc.get("id")
                params = doc.get("params") or {}
                entry["tool"] = params.get("name") if isinstance(params, dict) else None
            except ValueError:
                entry["rpc"] = None
        log.write(json.dumps(entry) + "\n")
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if scope["method"] == "POST" and not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send)

    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    app = recording(build_server("127.0.0.1", args.port).streamable_http_app(), args.log)
    uvicorn.run(app, host="127.0.0.1", port=args.port, ssl_certfile=args.cert, ssl_keyfile=args.key,
                log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
