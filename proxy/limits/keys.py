"""Counter keys built from request values (agent ids, claims, fields), unambiguous and safe.

`limit_key("agent", agent_id, "action", action)` joins its parts with `:` after
percent-encoding `%`, `:` and control characters in each part, so no two
different part lists give the same key (an agent named `a:b` cannot borrow the
counter of agent `a` on action `b`), and every backend accepts it (no control
characters, at most MAX_KEY_LENGTH characters; a longer key is shortened to a
prefix plus a SHA-256 of the whole, still unique in practice).
"""

from __future__ import annotations

import hashlib

from ..store.counters import MAX_KEY_LENGTH

_SAFE_TAIL = 64 + 1  # ":" + the hex digest


def _escape(part: str) -> str:
    out = []
    for c in part:
        if c in "%:" or ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"%{ord(c):02X}")
        else:
            out.append(c)
    return "".join(out)


def limit_key(*parts: str) -> str:
    """One key for the tuple `parts` (each a str; empty parts allowed, but at least one part)."""
    if not parts:
        raise ValueError("a counter key needs at least one part")
    for p in parts:
        if not isinstance(p, str):
            raise ValueError(f"counter key parts are strings, not {type(p).__name__}")
    key = ":".join(_escape(p) for p in parts)
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        key = key[: MAX_KEY_LENGTH - _SAFE_TAIL] + "#" + digest
    return key or "%"
