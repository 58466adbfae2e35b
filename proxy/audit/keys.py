"""The secret that keys the audit hash chain (HMAC-SHA256), and where it comes from.

A plain SHA-256 chain shows edits only to someone who did not recompute the
hashes; whoever can write the file can rewrite an event and every hash after
it. Keyed with a secret the intruder does not hold, the chain cannot be
re-signed: `proctor audit verify` with the key finds every rewritten event.

The key is text (at least 32 characters; the generated one is 64 hex digits),
read from a file or an environment variable. Its bytes (UTF-8, surrounding
whitespace removed) are the HMAC key. Events name the key by `kid`, an HMAC of
a fixed label under the key: it tells keys apart without revealing anything
about them. The key itself is never logged, written into an event, or shown.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("proctor.audit")

MIN_KEY_CHARS = 32
_KID_LABEL = b"proctor-audit-chain-key-id"


@dataclass(frozen=True)
class ChainKey:
    secret: bytes = field(repr=False)
    source: str  # where it came from (a path or `env:NAME`), for messages; never the key

    @property
    def kid(self) -> str:
        return hmac.digest(self.secret, _KID_LABEL, "sha256").hex()[:16]

    def mac(self, data: bytes) -> str:
        return hmac.digest(self.secret, data, "sha256").hex()

    @classmethod
    def from_text(cls, text: str, source: str) -> "ChainKey":
        value = text.strip()
        if len(value) < MIN_KEY_CHARS:
            raise ValueError(f"audit chain key from {source} is too short: at least {MIN_KEY_CHARS} characters")
        return cls(value.encode(), source)


def read_key_file(path: Path) -> ChainKey:
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"audit chain key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"audit chain key file {path} cannot be read: {e}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("audit chain key file %s is accessible by group or others (mode %o); make it 0600",
                    path, stat.S_IMODE(st.st_mode))
    return ChainKey.from_text(text, str(path))


def read_key_env(name: str) -> ChainKey:
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"audit.chain_key_env names {name}, which is not set")
    return ChainKey.from_text(value, f"env:{name}")


def generate_key_file(path: Path) -> ChainKey:
    """Create `path` (mode 0600) with a new random key; an existing file is read instead."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = secrets.token_hex(32)
    data = (text + "\n").encode()
    # Written whole to a private temporary file, then linked into place: a failed
    # write (a full disk) never leaves an empty key file behind, and a second
    # process starting at the same moment sees either no key or the whole key.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces an existing key
        except FileExistsError:
            return read_key_file(path)  # another process created it first
    finally:
        tmp.unlink(missing_ok=True)
    log.info("generated a new audit chain key in %s (keep a copy where `proctor audit verify` runs)", path)
    return ChainKey.from_text(text, str(path))

