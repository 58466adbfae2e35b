"""A small stateful mock of the Salesforce REST API (sObjects and SOQL), for the demo and tests.

    python -m proxy.demo.mock_crm --port 9102

Accounts, Contacts and Opportunities under `/services/data/v60.0/sobjects/<Type>`,
and a minimal `SELECT ... FROM <Type> [WHERE Field = 'value'] [LIMIT n]` at
`/services/data/v60.0/query`. No authentication; the last `Authorization`
header seen is kept in `app["last_authorization"]` so tests can check what
Proctor injected.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re

from aiohttp import web

BASE = "/services/data/v60.0"
PREFIXES = {"Account": "001", "Contact": "003", "Opportunity": "006"}
_ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_SOQL = re.compile(
    r"^\s*SELECT\s+(?P<fields>[A-Za-z_][\w.]*(?:\s*,\s*[A-Za-z_][\w.]*)*)\s+FROM\s+(?P<type>[A-Za-z_]\w*)"
    r"(?:\s+WHERE\s+(?P<wfield>[A-Za-z_]\w*)\s*=\s*'(?P<wvalue>(?:[^'\\]|\\.)*)')?"
    r"(?:\s+LIMIT\s+(?P<limit>\d+))?\s*$",
    re.IGNORECASE | re.DOTALL,
)


def _checksum(short: str) -> str:
    """The suffix that makes a 15-character id an 18-character one (one bit per upper-case letter)."""
    out = ""
    for chunk in (short[0:5], short[5:10], short[10:15]):
        bits = sum(1 << i for i, c in enumerate(chunk) if "A" <= c <= "Z")
        out += "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"[bits]
    return out


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response([{"errorCode": code, "message": message}], status=status)


def _not_found() -> web.Response:
    return _error(404, "NOT_FOUND", "The requested resource does not exist")


def build_app() -> web.Application:
    store: dict[str, dict[str, dict]] = {t: {} for t in PREFIXES}
    counter = itertools.count(1)

    def new_id(sobject: str) -> str:
        # key prefix + 12 characters + the 3-character case checksum, e.g. 0015g000AC00001AYA
        n, tail = next(counter), ""
        for _ in range(5):
            n, r = divmod(n, len(_ALNUM))
            tail = _ALNUM[r] + tail
        short = PREFIXES[sobject] + "5g000" + sobject[:2].upper() + tail
        return short + _checksum(short)

    def insert(sobject: str, fields: dict) -> str:
        rid = new_id(sobject)
        store[sobject][rid] = {**fields, "Id": rid}
        return rid

    def shaped(sobject: str, rec: dict, fields: list[str] | None = None) -> dict:
        out = {"attributes": {"type": sobject, "url": f"{BASE}/sobjects/{sobject}/{rec['Id']}"}}
        if fields is None:
            return out | rec
        return out | {f: rec.get(f) for f in fields}

    acme = insert("Account", {"Name": "Acme Corporation", "Industry": "Manufacturing", "AnnualRevenue": 12500000.0})
    globex = insert("Account", {"Name": "Globex Inc", "Industry": "Technology", "AnnualRevenue": 4200000.0})
    insert("Contact", {"FirstName": "Wile", "LastName": "Coyote", "Email": "wile@acme.example", "AccountId": acme})
    insert("Contact", {"FirstName": "Hank", "LastName": "Scorpio", "Email": "hank@globex.example", "AccountId": globex})
    insert("Opportunity", {"Name": "Acme rockets renewal", "StageName": "Prospecting", "Amount": 75000.0, "CloseDate": "2026-12-31", "AccountId": acme})

    @web.middleware
    async def remember_auth(request: web.Request, handler):
        if "Authorization" in request.headers:
            # app[...] = ... warns once the app runs; a test-only value, so write the state directly
            request.app._state["last_authorization"] = request.headers["Authorization"]
        return await handler(request)

    def sobject_of(request: web.Request) -> str | None:
        t = request.match_info["sobject"]
        return t if t in store else None

    def find(request: web.Request) -> tuple[str, dict] | tuple[None, None]:
        """The record the path names; like Salesforce, a 15-character id finds its 18-character form."""
        t, rid = sobject_of(request), request.match_info["id"]
        if t is None:
            return None, None
        rec = store[t].get(rid + _checksum(rid) if len(rid) == 15 else rid)
        return (t, rec) if rec is not None else (None, None)

    async def read_body(request: web.Request) -> dict | web.Response:
        try:
            body = json.loads(await request.text())
        except ValueError as e:
            return _error(400, "JSON_PARSER_ERROR", f"Unexpected character in request body: {e}")
        if not isinstance(body, dict):
            return _error(400, "JSON_PARSER_ERROR", "Expected a JSON object")
        return {k: v for k, v in body.items() if k not in ("Id", "attributes")}

    async def describe(request: web.Request) -> web.Response:
        t = sobject_of(request)
        if t is None:
            return _not_found()
        recent = [shaped(t, r, ["Id", "Name"]) for r in list(store[t].values())[-5:]]
        return web.json_response({"objectDescribe": {"name": t, "label": t, "keyPrefix": PREFIXES[t], "createable": True, "updateable": True}, "recentItems": recent})

    async def get(request: web.Request) -> web.Response:
        t, rec = find(request)
        if rec is None:
            return _not_found()
        fields = request.query.get("fields")
        return web.json_response(shaped(t, rec, ["Id", *(f.strip() for f in fields.split(","))] if fields else None))

    async def create(request: web.Request) -> web.Response:
        t = sobject_of(request)
        if t is None:
            return _not_found()
        body = await read_body(request)
        if isinstance(body, web.Response):
            return body
        return web.json_response({"id": insert(t, body), "success": True, "errors": []}, status=201)

    async def update(request: web.Request) -> web.Response:
        _, rec = find(request)
        if rec is None:
            return _not_found()
        body = await read_body(request)
        if isinstance(body, web.Response):
            return body
        rec.update(body)
        return web.Response(status=204)

    async def query(request: web.Request) -> web.Response:
        m = _SOQL.match(request.query.get("q", ""))
        if m is None:
            return _error(400, "MALFORMED_QUERY", "unexpected token: this mock understands SELECT f1, f2 FROM Type [WHERE Field = 'value'] [LIMIT n]")
        t = next((name for name in store if name.lower() == m["type"].lower()), None)
        if t is None:
            return _error(400, "INVALID_TYPE", f"sObject type '{m['type']}' is not supported.")
        records = list(store[t].values())
        if m["wfield"]:
            value = re.sub(r"\\(.)", r"\1", m["wvalue"])
            records = [r for r in records if str(r.get(m["wfield"], "")) == value]
        if m["limit"]:
            records = records[: int(m["limit"])]
        fields = [f.strip() for f in m["fields"].split(",")]
        out = [shaped(t, r, fields) for r in records]
        return web.json_response({"totalSize": len(out), "done": True, "records": out})

    app = web.Application(middlewares=[remember_auth])
    app._state["last_authorization"] = None  # read it as app["last_authorization"]
    app.router.add_get(BASE + "/query", query)
    app.router.add_get(BASE + "/sobjects/{sobject}", describe)
    app.router.add_post(BASE + "/sobjects/{sobject}", create)
    app.router.add_get(BASE + "/sobjects/{sobject}/{id}", get)
    app.router.add_patch(BASE + "/sobjects/{sobject}/{id}", update)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9102)
    args = ap.parse_args()
    web.run_app(build_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
