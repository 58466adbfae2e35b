"""Who is calling the control API: one verifier for people (approvers and operators).

Approvers and operators present a Bearer JWT for the approver audience
(`approvals.approver_audience`) from the same trusted issuers as agents; their
groups come from `approvals.approver_groups_claim`; operators are the members
of `control.admin_group`. One verifier (one JWKS cache) serves every route.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..approvals.service import Approver
from ..config import ProctorConfig
from ..identity.errors import AuthError, IdentityUnavailable
from ..identity.verifier import TokenVerifier


def problem(status: int, title: str, detail: str, headers: dict[str, str] | None = None,
            extra: dict[str, Any] | None = None) -> web.Response:
    """RFC 9457 problem details; `extra` adds members (e.g. `errors` for a rejected input)."""
    return web.json_response(
        {"type": "about:blank", "title": title, "status": status, "detail": detail, **(extra or {})},
        status=status, content_type="application/problem+json", headers=headers,
    )


def bearer(request: web.Request, header: str = "Authorization") -> str | None:
    scheme, _, token = request.headers.get(header, "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def foreign_origin(request: web.Request) -> bool:
    """A state-changing call from another site (CSRF defence in depth; tokens never ride in cookies)."""
    origin = request.headers.get("Origin")
    return origin is not None and origin.rstrip("/") != f"{request.scheme}://{request.host}"


class ControlAuth:
    def __init__(self, config: ProctorConfig) -> None:
        issuers = [i.model_copy(update={"audience": config.approvals.approver_audience}) for i in config.effective_issuers()]
        self.verifier = TokenVerifier(issuers, config.identity_settings())
        self.groups_claim = config.approvals.approver_groups_claim
        self.admin_group = config.control.admin_group

    async def person(self, request: web.Request, who: str = "Approver", realm: str = "proctor-control") -> Approver | web.Response:
        """The verified approver/operator, or the 401/503 answer to send."""
        token = bearer(request)
        if token is None:
            return problem(401, f"{who} authentication required", f"send an {who.lower()} token as Authorization: Bearer",
                           {"WWW-Authenticate": f'Bearer realm="{realm}"'})
        try:
            ident = await self.verifier.verify(token)
        except AuthError as e:
            return problem(401, f"{who} authentication failed", str(e),
                           {"WWW-Authenticate": f'Bearer realm="{realm}", error="invalid_token"'})
        except IdentityUnavailable as e:
            return problem(503, "Identity provider unavailable", str(e))
        groups = ident.claims.get(self.groups_claim, [])
        groups = [groups] if isinstance(groups, str) else groups if isinstance(groups, list) else []
        return Approver(ident.agent_id, frozenset(g for g in groups if isinstance(g, str) and g), ident.issuer)

    async def operator(self, request: web.Request) -> Approver | web.Response:
        who = await self.person(request, "Operator")
        if isinstance(who, web.Response):
            return who
        if self.admin_group not in who.groups:
            return problem(403, "Not an operator", f"{who.id} is not in the {self.admin_group!r} group")
        return who


AUTH_KEY = web.AppKey("control_auth", ControlAuth)


def control_auth(app: web.Application, config: ProctorConfig) -> ControlAuth:
    if AUTH_KEY not in app:
        app[AUTH_KEY] = ControlAuth(config)
    return app[AUTH_KEY]
