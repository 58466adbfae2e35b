"""Verify agent JWTs: allow-listed algorithms, required iss/aud/exp, bounded leeway and size.

Verified tokens are cached by their SHA-256 until they expire, so steady-state
requests skip the signature check (an RSA/ECDSA verify costs tens of
microseconds); expiry, and that the signing key is still in the issuer's key
set, are re-checked on every use.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import jwt
from jwt import PyJWK
from jwt.algorithms import get_default_algorithms

from ..config import IdentityConfig, IssuerConfig
from ..core.model import AgentIdentity
from .errors import AuthError
from .jwks import FileKeySource, KeySource, shared_url_source

MAX_AGENT_ID_LENGTH = 256
_JWS_ALGORITHMS = frozenset(get_default_algorithms())  # HS256, RS256, ES256, EdDSA, ... (and "none")


@dataclass
class _Issuer:
    config: IssuerConfig
    keys: KeySource


@dataclass(frozen=True)
class _Verified:
    """A verified token, and the key that verified it (checked again on cache hits)."""

    identity: AgentIdentity
    keys: KeySource
    kid: str | None
    key: PyJWK


def _key_source(cfg: IssuerConfig) -> KeySource:
    if cfg.jwks_file is not None:
        return FileKeySource(cfg.jwks_file)
    assert cfg.jwks_url is not None
    return shared_url_source(
        cfg.jwks_url,
        cache_seconds=cfg.jwks_cache_seconds,
        min_refetch_seconds=cfg.jwks_min_refetch_seconds,
        ca_file=cfg.jwks_ca_file,
    )


def _valid_agent_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_AGENT_ID_LENGTH
        and value.isprintable()
        and value.strip() == value
    )


class TokenVerifier:
    def __init__(self, issuers: list[IssuerConfig], settings: IdentityConfig) -> None:
        self.settings = settings
        self._issuers = {cfg.issuer: _Issuer(cfg, _key_source(cfg)) for cfg in issuers}
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()

    def looks_like_agent_token(self, token: str) -> bool:
        """Unverified check: is this a JWT naming one of our trusted issuers?

        Used only to decide what to strip before forwarding (never to authenticate).
        """
        if token.count(".") != 2 or len(token) > self.settings.max_token_bytes or not token.isascii():
            return False
        try:
            iss = jwt.decode(token, options={"verify_signature": False}).get("iss")
        except Exception:
            return False
        return isinstance(iss, str) and iss in self._issuers

    async def verify(self, token: str) -> AgentIdentity:
        s = self.settings
        raw = token.encode("utf-8", "surrogateescape")
        if len(raw) > s.max_token_bytes:
            raise AuthError(f"token is larger than {s.max_token_bytes} bytes")
        # A compact JWS is base64url segments and dots: pure ASCII. Anything else
        # (including undecodable header bytes, which arrive as surrogates) is not a token.
        if not token.isascii():
            raise AuthError("token is not a well-formed JWT")
        digest = hashlib.sha256(raw).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            exp = cached.identity.expires_at
            if exp is not None and time.time() > exp + s.leeway_seconds:
                self._cache.pop(digest, None)
                raise AuthError("token has expired")
            # The key must still be the issuer's (a key removed from the JWKS
            # revokes the tokens it signed, cached or not). A refetched but
            # otherwise unchanged key set simply re-verifies once.
            try:
                current = await cached.keys.get_key(cached.kid)
            except AuthError:
                self._cache.pop(digest, None)
                raise
            if current is cached.key:
                self._cache.move_to_end(digest)
                return cached.identity
            self._cache.pop(digest, None)
        verified = await self._verify_uncached(token)
        if s.cache_size:
            self._cache[digest] = verified
            while len(self._cache) > s.cache_size:
                self._cache.popitem(last=False)
        return verified.identity

    async def _verify_uncached(self, token: str) -> _Verified:
        s = self.settings
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.DecodeError:
            raise AuthError("token is not a well-formed JWT") from None
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError, RecursionError) as e:
            # e.g. a non-string `kid` or an unsupported `crit` header (InvalidTokenError):
            # still the agent's bad credential (401/407), never an internal error.
            raise AuthError(f"token is not a well-formed JWT ({type(e).__name__})") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or not alg:
            raise AuthError("token header has no algorithm (alg)")
        if alg.lower() == "none":
            raise AuthError("token algorithm 'none' is not accepted")
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("token issuer is not trusted")
        cfg = issuer.config
        if alg not in cfg.algorithms:
            # named only when it is a JWS algorithm: the header is the token's text (in transparent
            # mode, a file's), and refusals, /readyz and logs never echo a token's contents
            named = alg if alg in _JWS_ALGORITHMS else "(not a JWS algorithm name)"
            raise AuthError(f"token algorithm {named} is not allowed for this issuer")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("token key id (kid) is malformed")
        key = await issuer.keys.get_key(kid)
        required = ["iss", "aud", s.principal.agent_id_claim]
        if s.require_exp:
            required.append("exp")
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=cfg.audience,
                issuer=cfg.issuer,
                leeway=s.leeway_seconds,
                options={"require": required, "verify_signature": True},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience is not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer is not trusted") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"token lacks the required claim {e.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("token algorithm does not match the issuer's key") from None
        except jwt.PyJWTError as e:
            raise AuthError(f"token is invalid ({type(e).__name__})") from None
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            raise AuthError(f"token is invalid ({type(e).__name__})") from None
        agent_id = claims.get(s.principal.agent_id_claim)
        if not _valid_agent_id(agent_id):
            raise AuthError(f"token claim {s.principal.agent_id_claim!r} is not a valid agent id")
        exp = claims.get("exp")
        expires_at: float | None = None
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            try:
                expires_at = float(exp)
            except OverflowError:  # an integer beyond float range: effectively never
                expires_at = float("inf")
            if math.isnan(expires_at):  # NaN never compares as expired: refuse it
                raise AuthError("token claim 'exp' is not a valid time")
        elif exp is not None:
            raise AuthError("token claim 'exp' is not a valid time")
        identity = AgentIdentity(
            agent_id=agent_id,
            issuer=cfg.issuer,
            claims=claims,
            expires_at=expires_at,
        )
        return _Verified(identity, issuer.keys, kid, key)
