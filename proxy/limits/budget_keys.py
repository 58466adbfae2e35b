"""Budget ledger keys read back: the reverse of `budget_table.budget_key` (docs/limits.md,
"Seeing budgets").

A ledger key is `limit_key("bg", name, dim, "=value" | "-", ...)`: the parts joined with `:`
after `%`, `:` and control characters in each were percent-encoded (proxy/limits/keys.py),
so splitting on `:` and decoding each part gives the budget's name and every dimension
with its value (`-`: none) back exactly.

A key longer than MAX_KEY_LENGTH was stored as its first characters plus `#` and a SHA-256
of the whole (limit_key): only the dimensions wholly inside that prefix can be read back;
`ParsedBudgetKey.hashed` says the others are missing.

Pure and light (no request-path imports): the Redis backend uses `unescape` too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..store.counters import MAX_KEY_LENGTH
from .keys import limit_key

_HASH_TAIL = 65  # "#" + 64 hex digits (keys.py)
_HEX_TAIL = re.compile(r"#[0-9a-f]{64}$")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")


def unescape(part: str) -> str:
    """One key part as it was before limit_key encoded `%`, `:` and control characters."""
    return _PERCENT.sub(lambda m: chr(int(m.group(1), 16)), part)


def is_hashed(key: str) -> bool:
    """Whether limit_key shortened this key to a prefix plus a digest."""
    return len(key) == MAX_KEY_LENGTH and _HEX_TAIL.search(key) is not None


@dataclass(frozen=True)
class ParsedBudgetKey:
    name: str
    values: dict[str, str | None] = field(default_factory=dict)  # dimension -> value (None: none), in key order
    hashed: bool = False  # shortened: dimensions past its prefix are not in `values`


def parse_budget_key(key: str) -> ParsedBudgetKey | None:
    """The budget name and key values of a ledger key; None when it is not a budget key."""
    hashed = is_hashed(key)
    parts = (key[:-_HASH_TAIL] if hashed else key).split(":")
    if hashed:
        parts = parts[:-1]  # (cut by the shortening, or the empty part after a final ':')
    if len(parts) < 2 or parts[0] != "bg":
        return None
    rest = parts[2:]
    if len(rest) % 2 and not hashed:
        return None
    values: dict[str, str | None] = {}
    for i in range(0, len(rest) - 1, 2):
        dim, value = unescape(rest[i]), rest[i + 1]
        if value == "-":
            values[dim] = None
        elif value.startswith("="):
            values[dim] = unescape(value[1:])
        else:
            return None
    return ParsedBudgetKey(unescape(parts[1]), values, hashed)


# A prefix longer than this is not used to narrow a listing (a shortened key keeps only its first
# MAX_KEY_LENGTH - 65 characters, so a longer prefix could miss it): the filter is applied after.
MAX_PREFIX = 400


def listing_prefix(name: str, dims: Sequence[str], given: dict[str, str]) -> str:
    """The key prefix shared by every ledger of budget `name` whose leading key dimensions have
    the values `given` (as many leading dimensions as are given); `budget_key` builds the keys."""
    parts = ["bg", name]
    prefix = limit_key(*parts) + ":"
    for dim in dims[:-1]:  # (all of them given: the caller reads that one key)
        if dim not in given:
            break
        parts += [dim, "=" + given[dim]]
        longer = limit_key(*parts) + ":"
        if len(longer) > MAX_PREFIX:
            break
        prefix = longer
    return prefix
