"""The approvals web console: static files on the control port.

The console is a dependency-free single page (proxy/control/console/) that
talks to the approvals API on the same origin with the approver's token in
the Authorization header (never a cookie), so it needs no CSRF token. Served:

- `/console` -> redirect to `/console/`;
- `/console/` and `/console/approvals/{id}` (the link in approval
  notifications) -> index.html; the page routes on its own path;
- `/console/static/{name}` for the three console files only (a whitelist: no
  other file, and no path, is ever read).

Every answer carries a strict Content-Security-Policy (no inline script or
style, no external origin), nosniff, no referrer and no caching.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

CONSOLE_DIR = Path(__file__).resolve().parent / "console"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
# name -> content type: the only files ever served.
STATIC_FILES = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}


def _read(name: str) -> bytes | None:
    if name not in STATIC_FILES:
        return None
    try:
        return (CONSOLE_DIR / name).read_bytes()
    except OSError:
        return None


def _file_response(name: str) -> web.Response:
    body = _read(name)
    if body is None:
        return web.Response(status=404, text="not found\n", headers=SECURITY_HEADERS, content_type="text/plain")
    return web.Response(body=body, headers={**SECURITY_HEADERS, "Content-Type": STATIC_FILES[name]})


def add_console_routes(app: web.Application) -> None:
    async def redirect(_: web.Request) -> web.Response:
        raise web.HTTPFound("/console/", headers=SECURITY_HEADERS)

    async def index(_: web.Request) -> web.Response:
        return _file_response("index.html")

    async def static(request: web.Request) -> web.Response:
        return _file_response(request.match_info["name"])

    app.router.add_get("/console", redirect)
    app.router.add_get("/console/", index)
    app.router.add_get("/console/approvals/{id}", index)
    app.router.add_get("/console/static/{name}", static)
