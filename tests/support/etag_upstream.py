"""A records API with ETags and conditional writes (RFC 9110), for the If-Match tests.

    GET    /{kind}/{id}   200 {"id", "version", "data"} with ETag (a record exists once asked for)
    PATCH  /{kind}/{id}   merges the JSON body into data, version + 1; 412 if If-Match does not match
    PUT    /{kind}/{id}   replaces data, version + 1; same preconditions
    DELETE /{kind}/{id}   204; the next GET starts again at version 1

`kind` steers the ETag: `records` and `plain` send strong ones ("<id>-v<version>"),
`weak` sends weak ones (W/"..."), which never match If-Match (strong comparison).
If-Match `*` matches any existing record; If-None-Match and If-Unmodified-Since are
honoured too (412), so a test sees exactly which precondition reached the upstream.
Every request is logged (JSONL: method, path, the precondition headers, status)
before it is answered.

    python etag_upstream.py --port 9000 --log received.jsonl
"""

from __future__ import annotations

import argparse
import json

from aiohttp import web


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--log", required=True)
    args = ap.parse_args()
    log = open(args.log, "a", buffering=1)
    records: dict[str, dict] = {}

    def etag(kind: str, rec: dict) -> str:
        tag = f'"{rec["id"]}-v{rec["version"]}"'
        return f"W/{tag}" if kind == "weak" else tag

    async def handle(request: web.Request) -> web.StreamResponse:
        kind, rid = request.match_info["kind"], request.match_info["id"]
        key = f"{kind}/{rid}"
        body = await request.read()
        rec = records.setdefault(key, {"id": rid, "version": 1, "data": {}})
        current = etag(kind, rec)
        status = 200
        if_match = request.headers.get("If-Match")
        if_none = request.headers.get("If-None-Match")
        if request.method in ("PATCH", "PUT", "DELETE"):
            strong = current if not current.startswith("W/") else None
            if if_match is not None and if_match.strip() != "*" and (strong is None or if_match.strip() != strong):
                status = 412
            elif if_none is not None and (if_none.strip() == "*" or if_none.strip() == current):
                status = 412
            elif request.headers.get("If-Unmodified-Since") is not None:
                status = 412  # (no Last-Modified here: any such condition fails)
        log.write(json.dumps({"method": request.method, "path": request.raw_path, "if_match": if_match,
                              "if_none_match": if_none,
                              "if_unmodified_since": request.headers.get("If-Unmodified-Since"),
                              "status": status}) + "\n")
        if status == 412:
            return web.json_response({"error": "precondition failed", "current": rec["version"]}, status=412)
        if request.method == "GET":
            if if_none is not None and if_none.strip() == current:
                return web.Response(status=304, headers={"ETag": current})
            return web.json_response(rec, headers={"ETag": current})
        if request.method == "DELETE":
            records.pop(key, None)
            return web.Response(status=204)
        change = json.loads(body or b"{}")
        rec["data"] = {**rec["data"], **change} if request.method == "PATCH" else change
        rec["version"] += 1
        return web.json_response(rec, headers={"ETag": etag(kind, rec)})

    app = web.Application()
    app.router.add_route("*", "/{kind}/{id}", handle)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
