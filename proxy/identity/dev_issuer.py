"""The embedded dev issuer: an ES256 key pair made on first run, for the default config.

Production deployments trust the enterprise IdP's JWKS instead; the dev issuer
can be disabled with `dev_issuer.enabled: false`.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from ..config import DevIssuerConfig

_TTL_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """'90s', '15m', '1h', '2d' or plain seconds -> seconds."""
    m = _TTL_RE.match(text)
    if not m:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 15m, 1h, 2d")
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise ValueError("duration must be positive")
    return seconds


class DevIssuer:
    def __init__(self, directory: Path, config: DevIssuerConfig) -> None:
        self.dir = Path(directory)
        self.config = config
        self.key_path = self.dir / "key.pem"
        self.jwks_path = self.dir / "jwks.json"

    def ensure(self) -> None:
        """Create the key pair and JWKS on first run; later runs reuse them."""
        if self.key_path.exists() and self.jwks_path.exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
        jwk.update({"kid": f"dev-{uuid.uuid4().hex[:12]}", "use": "sig", "alg": "ES256"})
        tmp = self.jwks_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"keys": [jwk]}, indent=2))
        tmp.replace(self.jwks_path)

    def _kid(self) -> str:
        return json.loads(self.jwks_path.read_text())["keys"][0]["kid"]

    def issue(
        self, agent_id: str, claims: dict[str, Any] | None = None, ttl: str | None = None, audience: str | None = None
    ) -> str:
        self.ensure()
        seconds = parse_ttl(ttl or self.config.default_ttl)
        if seconds > parse_ttl(self.config.max_ttl):
            raise ValueError(f"ttl exceeds the dev issuer's max_ttl ({self.config.max_ttl})")
        now = int(time.time())
        payload: dict[str, Any] = dict(claims or {})
        payload.update(
            {
                "iss": self.config.issuer,
                "aud": audience or self.config.audience,
                "sub": agent_id,
                "iat": now,
                "nbf": now,
                "exp": now + seconds,
                "jti": uuid.uuid4().hex,
            }
        )
        key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        return jwt.encode(payload, key, algorithm="ES256", headers={"kid": self._kid()})
