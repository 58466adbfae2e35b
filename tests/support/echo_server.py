"""A recording upstream for tests: answers every request with a JSON echo and
appends what it received (method, path, headers, body) to a JSONL file, so a
test can assert on exactly what reached the upstream.

    python echo_server.py --port 9000 --log received.jsonl [--cert c.pem --key k.pem]
"""

from __future__ import annotations

import argparse
import json
import ssl

from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()

    log = open(args.log, "a", buffering=1)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        entry = {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[a.decode("latin-1"), b.decode("latin-1")] for a, b in request.raw_headers],
            "body": body.decode("utf-8", "replace"),
            "scheme": request.scheme,
        }
        log.write(json.dumps(entry) + "\n")
        if request.path.endswith("/__status/500"):
            return web.json_response({"error": "boom"}, status=500)
        return web.json_response({"echo": True, "method": request.method, "path": request.raw_path})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    ssl_ctx = None
    if args.cert:
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_ctx.load_cert_chain(args.cert, args.key)
    web.run_app(app, host=args.host, port=args.port, ssl_context=ssl_ctx, print=None, access_log=None)


if __name__ == "__main__":
    main()
