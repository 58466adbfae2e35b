"""The request head as every engine hands it to the stages.

One function for all engine adapters, so the target check and the policies see
the same request whichever engine parsed it.
"""

from __future__ import annotations

from collections.abc import Iterable

_BAD_HEADER_BYTES = (b"\r", b"\n", b"\x00")

# Response headers that carry Proctor's own word to the agent (claims, workflows, replays).
# An upstream's answer never gets to set them: the engines drop them from what the upstream
# sent (a stage's value, if any, is added after), so an agent cannot be told it holds a claim,
# is on a workflow instance or got a replay by anyone but Proctor.
PROCTOR_RESPONSE_HEADERS = frozenset({
    "proctor-claim", "proctor-workflow", "proctor-workflow-retry", "x-proctor-original-decision-id",
})


def flatten_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[dict[str, str], str | None, frozenset[str]]:
    """Lower-cased header names with repeated fields joined by ", " (one pass over the raw
    fields), a problem description if any value carries CR, LF or NUL (obs-fold, bare CR:
    refused by the target stage), and the names that were repeated."""
    out: dict[str, str] = {}
    repeated: set[str] = set()
    problem = None
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1").lower()
        if problem is None and any(b in raw_value for b in _BAD_HEADER_BYTES):
            problem = f"the {name} header value contains CR, LF or NUL (folded or smuggled header lines are refused)"
        value = raw_value.decode("latin-1")
        if name in out:
            repeated.add(name)
            out[name] = f"{out[name]}, {value}"
        else:
            out[name] = value
    return out, problem, frozenset(repeated)
