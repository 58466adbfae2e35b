"""A recording upstream that does "work" for the duplicate-suppression tests.

Every request is appended to a JSONL log (method, path, body) before it is
answered, so a test counts exactly how many times the work was done. Request
headers steer the answer: `X-Test-Delay` (seconds to wait first),
`X-Test-Status` (the status), `X-Test-Size` (a body of that many bytes),
`X-Test-Header: Name: value` (a header the answer carries).
A 2xx answer carries a fresh `Location` and a counter, so a replay is told
apart from a second execution.

    python work_upstream.py --port 9000 --log received.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json

from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    log = open(args.log, "a", buffering=1)
    counter = itertools.count(1)

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        n = next(counter)
        log.write(json.dumps({"method": request.method, "path": request.raw_path,
                              "body": body.decode("utf-8", "replace"), "n": n}) + "\n")
        delay = float(request.headers.get("X-Test-Delay", "0"))
        if delay:
            await asyncio.sleep(delay)
        status = int(request.headers.get("X-Test-Status", "201"))
        size = request.headers.get("X-Test-Size")
        headers = {"Location": f"/work/{n}", "Set-Cookie": f"session=s{n}; Path=/nowhere"}  # (clients do not send it back)
        for extra in request.headers.getall("X-Test-Header", []):  # "Name: value": a header the answer carries
            name, _, value = extra.partition(":")
            headers[name.strip()] = value.strip()
        if size is not None:
            return web.Response(status=status, body=b"x" * int(size), headers=headers, content_type="text/plain")
        return web.json_response({"n": n, "path": request.raw_path}, status=status, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
