"""Names a server may read differently from how they are spelled.

Frameworks let a request ask to be treated as another method (`_method=DELETE`
in Rails, Laravel, Symfony, Express's method-override; Salesforce's
`_HttpMethod`), merge query parameters into body parameters (Flask's
`request.values`, Rails `params`, PHP `$_REQUEST`, Spring binding), and
rewrite parameter names (PHP drops leading spaces, cuts at NUL, turns `.` and
` ` into `_`; many match names without regard to case). Proctor judges the
method and body it sees, so anything that would make the upstream act on
another method or another body value is refused. `server_name()` is the name
as the most permissive of those servers reads it.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

# Headers that tell an upstream (or a framework in front of it) which host, scheme
# or path the request is "really" for: they change what the same bytes do.
ROUTING_HEADERS = ("forwarded", "x-forwarded-host", "x-forwarded-proto", "x-original-url", "x-rewrite-url")

# Parameters (query or top-level body) that ask for another HTTP method.
OVERRIDE_PARAMS = frozenset({"_method", "_httpmethod"})
# Headers that do the same (matched after folding "_" to "-": CGI-style servers
# such as Rack and Puma read X_HTTP_METHOD_OVERRIDE as X-HTTP-Method-Override).
OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")


def server_name(name: str) -> str:
    """`name` as a permissive server reads it: cut at NUL, leading spaces dropped,
    `.`/` ` as `_`, a `[...]` suffix ignored, case folded."""
    name = name.split("\x00", 1)[0].lstrip(" \t")
    name = name.split("[", 1)[0]
    return name.replace(" ", "_").replace(".", "_").casefold()


def query_names(query: str) -> list[str]:
    """The decoded parameter names of a query string (unreadable ones as they are)."""
    try:
        return [k for k, _ in parse_qsl(query, keep_blank_values=True)]
    except ValueError:
        return [part.split("=", 1)[0] for part in query.split("&")]


def override_in(names: list[str]) -> str | None:
    """The first name that asks for another method, if any."""
    return next((n for n in names if server_name(n) in OVERRIDE_PARAMS), None)
