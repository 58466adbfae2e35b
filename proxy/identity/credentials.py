"""Find the agent's credential in a request's headers.

Accepted forms (ARCHITECTURE.md, agent side):
- forward proxy: `Proxy-Authorization: Basic base64(<agent-id>:<jwt>)` (what
  clients send for `http://<agent-id>:<jwt>@proxy:8080`), or
  `Proxy-Authorization: Bearer <jwt>`;
- reverse (gateway) mode: `Authorization: Bearer <jwt>` or
  `Proxy-Authorization: Bearer <jwt>`.

Error messages never include the credential itself.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from .errors import AuthError

PROXY_AUTHORIZATION = "proxy-authorization"
AUTHORIZATION = "authorization"


@dataclass(frozen=True, slots=True)
class PresentedCredential:
    token: str
    username: str | None  # from Basic; None for Bearer
    header: str  # which header carried it (lower-case)


def _parse(header_name: str, value: str, allow_basic: bool) -> PresentedCredential:
    scheme, _, param = value.strip().partition(" ")
    scheme = scheme.lower()
    param = param.strip()
    if not param:
        raise AuthError(f"{header_name} header has no credentials")
    if scheme == "bearer":
        return PresentedCredential(token=param, username=None, header=header_name)
    if scheme == "basic" and allow_basic:
        try:
            decoded = base64.b64decode(param, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise AuthError(f"{header_name} Basic credentials are not valid base64") from None
        username, sep, password = decoded.partition(":")
        if not sep or not password:
            raise AuthError(
                f"{header_name} Basic credentials must be <agent-id>:<jwt> (the token goes in the password)"
            )
        return PresentedCredential(token=password, username=username, header=header_name)
    raise AuthError(f"{header_name} uses an unsupported scheme; use Bearer <jwt> or Basic <agent-id>:<jwt>")


def extract_credential(headers: dict[str, str], reverse_mode: bool) -> PresentedCredential:
    """The credential from lower-cased `headers`, or AuthError saying what is missing."""
    proxy_auth = headers.get(PROXY_AUTHORIZATION)
    if proxy_auth:
        return _parse("Proxy-Authorization", proxy_auth, allow_basic=True)
    if reverse_mode:
        auth = headers.get(AUTHORIZATION)
        if auth:
            return _parse("Authorization", auth, allow_basic=False)
        # (no "Name: value" in a detail: refusal details are redacted, and that reads as a header value)
        raise AuthError("no agent credential: send an Authorization header with Bearer <jwt>")
    raise AuthError(
        "no agent credential: set HTTPS_PROXY/HTTP_PROXY to http://<agent-id>:<jwt>@<proxy> "
        "or send a Proxy-Authorization header with Bearer <jwt>"
    )
