"""The authentication stage: who is calling.

A request announcing a body is authenticated from its head (`on_head`), before
the body is read; its `on_request` then reuses that identity instead of
verifying the token again. A request inside a CONNECT tunnel carries the
identity the CONNECT proved. Either way the agent's own credential is removed
before forwarding (`Proxy-Authorization`, and any `Authorization` that carries
the agent token or a token from a trusted issuer).

A transparent request (redirected by the network) is attributed to the sidecar's
workload identity (identity/workload.py) and to nothing else: it never selects
an identity by what it carries (a `Proxy-Authorization` is refused), and no
other listener ever falls back to the workload identity.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from dataclasses import dataclass

from ..config import IdentityConfig
from ..core.chain import Stage
from ..core.exchange import Exchange
from ..core.model import AgentIdentity, AgentRequest, Refusal
from .credentials import AUTHORIZATION, PROXY_AUTHORIZATION, extract_credential
from .errors import AuthError, IdentityUnavailable
from .verifier import TokenVerifier
from .workload import WorkloadIdentity, WorkloadUnavailable

_PROVEN = "authenticate"  # stage_data key: the Authentication proven from the head


@dataclass(frozen=True, slots=True)
class Authentication:
    identity: AgentIdentity | None
    refusal: Refusal | None
    strip_headers: tuple[str, ...] = (PROXY_AUTHORIZATION,)
    token_digest: bytes | None = None  # SHA-256 of the agent's token (to bind and strip it)


def _credential(header_value: str) -> str | None:
    """The credential in one Authorization value: a Bearer token or a Basic password."""
    scheme, _, param = header_value.strip().partition(" ")
    param = param.strip()
    if not param:
        return None
    if scheme.lower() == "basic":
        try:
            param = base64.b64decode(param, validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
    return param


class Authenticator:
    """Verifies the credential a request (or its connection) carries."""

    def __init__(self, verifier: TokenVerifier, settings: IdentityConfig,
                 workload: WorkloadIdentity | None = None) -> None:
        self.verifier = verifier
        self.settings = settings
        self.workload = workload  # transparent mode's one identity (None: transparent mode is off)

    def refusal(self, req: AgentRequest, detail: str) -> Refusal:
        if req.mode == "transparent":
            return workload_refusal(detail)
        if req.mode == "reverse":
            return Refusal(401, "Agent authentication required", detail,
                           headers={"WWW-Authenticate": 'Bearer realm="proctor"'}, kind="authentication")
        return Refusal(407, "Proxy authentication required", detail,
                       headers={"Proxy-Authenticate": 'Basic realm="proctor", Bearer realm="proctor"'},
                       kind="authentication")

    async def authenticate(self, req: AgentRequest) -> Authentication:
        """The verified identity (or a refusal) and the headers that carried the agent's credential."""
        if req.mode == "transparent":
            return await self.authenticate_workload(req)
        if req.connection_identity is not None:
            return self.reuse(req, req.connection_identity, req.connection_token_digest)
        try:
            cred = extract_credential(req.headers, reverse_mode=req.mode == "reverse")
            identity = await self.verifier.verify(cred.token)
        except AuthError as e:
            return Authentication(None, self.refusal(req, str(e)))
        except IdentityUnavailable as e:
            return Authentication(None, Refusal(503, "Identity provider unavailable", str(e), kind="fail-closed"))
        if cred.username is not None and self.settings.proxy_username == "must_match" and cred.username != identity.agent_id:
            return Authentication(
                None, self.refusal(req, "the proxy username must equal the agent id in the token (subject)")
            )
        digest = hashlib.sha256(cred.token.encode()).digest()
        strip = [PROXY_AUTHORIZATION]
        if cred.header.lower() == AUTHORIZATION or self.carries_agent_token(req.headers.get(AUTHORIZATION, ""), digest):
            strip.append(AUTHORIZATION)
        return Authentication(identity, None, tuple(strip), digest)

    async def authenticate_workload(self, req: AgentRequest) -> Authentication:
        """A transparent request: the workload identity, whatever the request carries. A
        `Proxy-Authorization` is refused (identities never mix); an `Authorization` carrying
        the workload token or a trusted issuer's token is stripped."""
        if PROXY_AUTHORIZATION in req.headers:
            return Authentication(None, Refusal(
                400, "Proxy credentials refused",
                "this connection was redirected to Proctor by the network (transparent mode): every request on it "
                "is attributed to this workload's identity, never to credentials it carries; remove "
                "Proxy-Authorization (and any HTTP(S)_PROXY setting: none is needed here)",
                reasons=["transparent-proxy-credentials"], kind="authentication"))
        if self.workload is None:
            return Authentication(None, workload_refusal("transparent mode has no workload identity configured"))
        try:
            identity, digest = await self.workload.current()
        except WorkloadUnavailable as e:
            return Authentication(None, workload_refusal(str(e)))
        except IdentityUnavailable as e:
            return Authentication(None, Refusal(503, "Identity provider unavailable", str(e), kind="fail-closed"))
        strip = [PROXY_AUTHORIZATION]
        if self.carries_agent_token(req.headers.get(AUTHORIZATION, ""), digest):
            strip.append(AUTHORIZATION)
        return Authentication(identity, None, tuple(strip), digest)

    def reuse(self, req: AgentRequest, identity: AgentIdentity, digest: bytes | None) -> Authentication:
        """An identity proven earlier (the CONNECT, or this request's head): expiry is re-checked,
        and an Authorization header carrying the same token is still stripped (by its digest)."""
        strip = [PROXY_AUTHORIZATION]
        # The proven token must not reach the upstream even if the agent also sends it as Authorization.
        if self.carries_agent_token(req.headers.get(AUTHORIZATION, ""), digest):
            strip.append(AUTHORIZATION)
        leeway = self.settings.leeway_seconds
        if identity.expires_at is not None and time.time() > identity.expires_at + leeway:
            return Authentication(
                None,
                self.refusal(req, "the workload identity's token has expired" if req.mode == "transparent" else
                             "the token this connection was authenticated with has expired; reconnect with a fresh token"),
                tuple(strip),
            )
        return Authentication(identity, None, tuple(strip), digest)

    def carries_agent_token(self, authorization: str, digest: bytes | None) -> bool:
        """Does any credential in an Authorization value (repeated fields are joined with ", ")
        equal the authenticating token, or look like a token from an issuer Proctor trusts?

        Such a value is an agent credential, never an upstream one: it is removed
        (with every Authorization field) before forwarding.
        """
        if not authorization:
            return False
        for piece in authorization.split(","):
            token = _credential(piece)
            if token is None:
                continue
            if digest is not None and hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest() == digest:
                return True
            if self.verifier.looks_like_agent_token(token):
                return True
        return False


def workload_refusal(detail: str) -> Refusal:
    """Transparent mode without a usable workload identity: nothing is attributed, nothing passes.
    503 (the agent cannot fix it: the sidecar's token file must be), retried after a check."""
    return Refusal(503, "Workload identity unavailable",
                   f"{detail}; requests redirected to Proctor are refused until the sidecar's token file holds a "
                   "valid token (nothing was forwarded)",
                   reasons=["workload-identity-unavailable"], headers={"Retry-After": "5"}, kind="fail-closed")


class Authenticate(Stage):
    name = "authenticate"

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator

    async def on_head(self, ex: Exchange) -> None:
        assert ex.request is not None
        auth = await self.authenticator.authenticate(ex.request)
        if auth.refusal is not None:
            ex.refuse(auth.refusal)
            return
        ex.identity, ex.credential_digest = auth.identity, auth.token_digest  # a body refusal names the agent
        ex.stage_data[_PROVEN] = auth

    async def on_request(self, ex: Exchange) -> None:
        req = ex.request
        assert req is not None
        proven = ex.stage_data.pop(_PROVEN, None)
        if proven is not None and req.connection_identity is None:
            auth = self.authenticator.reuse(req, proven.identity, proven.token_digest)
        else:
            auth = await self.authenticator.authenticate(req)
        ex.plan.remove(*auth.strip_headers)
        ex.identity = auth.identity
        ex.credential_digest = auth.token_digest
        if auth.refusal is not None:
            ex.refuse(auth.refusal)
