"""A small stateful mock of a ServiceNow-style Table API (incidents), for the demo and tests.

States are ServiceNow's codes as strings: "1" New, "2" In Progress, "3" On Hold,
"6" Resolved, "7" Closed. `sysparm_fields` narrows a single-record answer.

    python -m proxy.demo.mock_ticketing --port 9101
"""

from __future__ import annotations

import argparse
import itertools
import time
import uuid

from aiohttp import web

TABLE = "/api/now/table/incident"


def build_app() -> web.Application:
    incidents: dict[str, dict] = {}
    numbers = itertools.count(10001)

    def seed(short: str, group: str) -> None:
        sys_id = uuid.uuid4().hex
        incidents[sys_id] = {
            "sys_id": sys_id,
            "number": f"INC{next(numbers)}",
            "short_description": short,
            "assignment_group": group,
            "state": "1",
            "opened_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }

    seed("Email delivery delayed", "service-desk")
    seed("VPN drops every hour", "network")

    async def list_(request: web.Request) -> web.Response:
        return web.json_response({"result": list(incidents.values())})

    async def get(request: web.Request) -> web.Response:
        inc = incidents.get(request.match_info["sys_id"])
        if inc is None:
            return web.json_response({"error": {"message": "No Record found"}}, status=404)
        fields = request.query.get("sysparm_fields")
        if fields:
            wanted = set(fields.split(","))
            inc = {k: v for k, v in inc.items() if k in wanted}
        return web.json_response({"result": inc})

    async def create(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
        sys_id = uuid.uuid4().hex
        inc = {
            "sys_id": sys_id,
            "number": f"INC{next(numbers)}",
            "state": "1",
            "opened_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            **{k: v for k, v in body.items() if k not in ("sys_id", "number")},
        }
        incidents[sys_id] = inc
        return web.json_response({"result": inc}, status=201)

    async def update(request: web.Request) -> web.Response:
        inc = incidents.get(request.match_info["sys_id"])
        if inc is None:
            return web.json_response({"error": {"message": "No Record found"}}, status=404)
        body = await request.json()
        inc.update({k: v for k, v in body.items() if k not in ("sys_id", "number")})
        return web.json_response({"result": inc})

    async def delete(request: web.Request) -> web.Response:
        if incidents.pop(request.match_info["sys_id"], None) is None:
            return web.json_response({"error": {"message": "No Record found"}}, status=404)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get(TABLE, list_)
    app.router.add_post(TABLE, create)
    app.router.add_get(TABLE + "/{sys_id}", get)
    app.router.add_patch(TABLE + "/{sys_id}", update)
    app.router.add_put(TABLE + "/{sys_id}", update)
    app.router.add_delete(TABLE + "/{sys_id}", delete)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9101)
    args = ap.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
