"""Classify a request: which connector, Cedar action and resource it means.

Paths are matched segment by segment after strict normalisation: each segment
is percent-decoded once, and a request whose path cannot be read unambiguously
(dot segments, encoded slashes or backslashes, empty segments, control
characters, `;` path parameters) is refused rather than matched, so no spelling
of a path can reach a laxer route than its plain form would.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from ..core.hosts import canonical_host
from ..core.model import Classification
from .manifest import ConnectorManifest, RouteSpec
from .values import path_values, query_values

_TEMPLATE_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*|\*)\}")

GENERIC_CONNECTOR = "generic-http"
GENERIC_ACTION = "http.request"
GENERIC_RESOURCE_TYPE = "HttpHost"


class PathRejected(Exception):
    """The request path is ambiguous or malicious; the message says why."""


def normalise_path(raw_path: str) -> list[str]:
    """Split a raw request path into decoded segments, refusing anything ambiguous."""
    if not raw_path.startswith("/"):
        raise PathRejected("request path must start with '/'")
    body = raw_path[1:]
    if body == "":
        return []
    if body.endswith("/"):
        # A trailing slash is tolerated once: /a/b/ is /a/b.
        body = body[:-1]
    segments = []
    for raw in body.split("/"):
        if raw == "":
            raise PathRejected("empty path segment (double slash)")
        if ";" in raw:
            raise PathRejected("';' path parameters are not accepted")
        lowered = raw.lower()
        if "%2f" in lowered or "%5c" in lowered or "\\" in raw:
            raise PathRejected("encoded slash or backslash in path")
        try:
            seg = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise PathRejected("percent-encoding in path is not valid UTF-8") from None
        if seg in (".", ".."):
            raise PathRejected("dot segment in path")
        if "%" in seg and unquote(seg) != seg:
            # double encoding such as %252e%252e
            raise PathRejected("double percent-encoding in path")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in seg):
            raise PathRejected("control character in path")
        segments.append(seg)
    return segments


@dataclass
class _CompiledRoute:
    connector: str
    spec: RouteSpec
    # per segment: a literal string, None for a whole-segment {param}, or a compiled
    # pattern for literal text around placeholders (OData keys: A_PurchaseOrder('{po}'))
    segments: list[str | re.Pattern | None]
    params: list[str | None]
    wildcard_tail: bool
    risk: str
    approval: Any = None  # ApprovalWait merged from the route and its connector
    # Routes with more literal segments win, then more partly-literal ones; exact
    # before wildcard tails; ties go to declaration order.
    specificity: tuple[int, int, int] = (0, 0, 0)

    def match(self, segs: list[str]) -> dict[str, str] | None:
        n = len(self.segments)
        if self.wildcard_tail:
            if len(segs) < n:
                return None
        elif len(segs) != n:
            return None
        values: dict[str, str] = {}
        for i, matcher in enumerate(self.segments):
            if matcher is None:
                name = self.params[i]
                if name is not None:
                    values[name] = segs[i]
            elif isinstance(matcher, str):
                if matcher != segs[i]:
                    return None
            else:
                m = matcher.fullmatch(segs[i])
                if m is None:
                    return None
                values.update(m.groupdict())
        if self.wildcard_tail:
            values["*"] = "/".join(segs[n:])
        return values


def _segment_pattern(segment: str) -> re.Pattern:
    """Literal text around {name} placeholders; a placeholder never spans a quote or paren."""
    out, pos = [], 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", segment):
        out.append(re.escape(segment[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>[^'()]+)")
        pos = m.end()
    out.append(re.escape(segment[pos:]))
    return re.compile("".join(out))


def _compile(connector: ConnectorManifest, spec: RouteSpec, index: int) -> _CompiledRoute:
    parts = [p for p in spec.path.strip("/").split("/") if p != ""]
    wildcard = bool(parts) and parts[-1] == "{*}"
    if wildcard:
        parts = parts[:-1]
    segments: list[str | re.Pattern | None] = []
    params: list[str | None] = []
    for p in parts:
        if re.fullmatch(r"\{[A-Za-z_][A-Za-z0-9_]*\}", p):
            segments.append(None)
            params.append(p[1:-1])
        elif "{" in p:
            segments.append(_segment_pattern(p))
            params.append(None)
        else:
            segments.append(p)
            params.append(None)
    literals = sum(1 for s in segments if isinstance(s, str))
    partial = sum(1 for s in segments if isinstance(s, re.Pattern))
    return _CompiledRoute(
        connector=connector.name,
        spec=spec,
        segments=segments,
        params=params,
        wildcard_tail=wildcard,
        risk=spec.risk or connector.risk,
        approval=_merge_wait(connector.approval, spec.approval),
        specificity=(literals, partial, 0 if wildcard else 1),
    )


def _merge_wait(connector_wait: Any, route_wait: Any) -> Any:
    if connector_wait is None or route_wait is None:
        return route_wait or connector_wait
    return connector_wait.model_copy(update={k: v for k, v in route_wait.model_dump().items() if v is not None})


def split_host_pattern(pattern: str) -> tuple[str, int | None]:
    """'host', 'host:port', '[v6]' or '[v6]:port' -> (host, port or None)."""
    if pattern.startswith("["):
        end = pattern.index("]")
        host, rest = pattern[1:end], pattern[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") else None
    if pattern.count(":") == 1:
        host, port = pattern.split(":")
        return host, int(port)
    return pattern, None


def host_matches(pattern: str, host: str, port: int) -> bool:
    """`pattern` is host or host:port; `*` globs one or more labels (e.g. *.service-now.com)."""
    pat_host, pat_port = split_host_pattern(pattern)
    if pat_port is not None and pat_port != port:
        return False
    if "*" in pat_host:
        return fnmatch.fnmatchcase(host, pat_host) and host.count(".") >= pat_host.count(".")
    # `host` is canonical (core/hosts.py); so is the pattern, e.g. [::ffff:7f00:1] -> 127.0.0.1
    return host == canonical_host(pat_host)


@dataclass
class Classifier:
    connectors: list[ConnectorManifest]
    unclassified_hosts: list[str] = field(default_factory=list)
    generic_default: bool = False
    generic_opaque_bodies: bool = False  # egress.opaque_bodies: generic egress forwards unreadable bodies
    _routes: dict[str, list[_CompiledRoute]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for c in self.connectors:
            compiled = [_compile(c, r, i) for i, r in enumerate(c.routes)]
            # stable sort: most literal segments first, exact before wildcard tails
            compiled.sort(key=lambda r: r.specificity, reverse=True)
            self._routes[c.name] = compiled

    @property
    def has_generic_egress(self) -> bool:
        """Can any request be classified as generic egress (egress.default generic or unclassified_hosts)?"""
        return self.generic_default or bool(self.unclassified_hosts)

    def connector_for(self, host: str, port: int) -> ConnectorManifest | None:
        for c in self.connectors:
            if any(host_matches(p, host, port) for p in c.hosts):
                return c
        return None

    def knows_host(self, host: str, port: int) -> bool:
        """Could any request to host:port be classified? (CONNECT is refused early otherwise.)"""
        host = canonical_host(host)
        return (
            self.connector_for(host, port) is not None
            or self.generic_default
            or any(host_matches(p, host, port) for p in self.unclassified_hosts)
        )

    def classify(self, method: str, host: str, port: int, raw_path: str, query: str = "") -> Classification | None:
        """The request's meaning, or None if nothing classifies it (egress default-deny).

        Raises PathRejected for an ambiguous path, ValueRejected for a declared value
        of the wrong type (both are refusals, never a fall-through to another route)."""
        host = canonical_host(host)  # raises HostRejected (a refusal) for an invalid host
        method = method.upper()
        connector = self.connector_for(host, port)
        if connector is not None:
            segs = normalise_path(raw_path)
            for route in self._routes[connector.name]:
                if route.spec.method not in ("*", method):
                    continue
                values = route.match(segs)
                if values is None:
                    continue
                if route.spec.jsonrpc is not None:
                    return Classification(
                        connector=connector.name,
                        action="",  # decided by the JSON-RPC operation in the body
                        resource_type="",
                        resource_id="",
                        risk=route.risk,
                        approval_mode=route.approval,
                        route=f"{route.spec.method} {route.spec.path}",
                        params=path_values(route.spec.params, values),
                        query_params=query_values(route.spec.query, query),
                        rpc_ops=route.spec.jsonrpc,
                    )
                template = route.spec.resource.id
                if template is None:  # default: the request path itself
                    resource_id = "/" + "/".join(segs)
                else:
                    # one pass, so a parameter value that looks like "{other}" stays literal
                    resource_id = _TEMPLATE_RE.sub(lambda m, v=values: v.get(m.group(1), m.group(0)), template)
                spec = route.spec
                params = path_values(spec.params, values)
                query_params = query_values(spec.query, query)
                attrs = dict(spec.attributes)
                for name in spec.resource_attributes:
                    if name in params:
                        attrs[name] = params[name]
                    elif name in query_params:
                        attrs[name] = query_params[name]
                # The path of one of the connector's JSON-RPC endpoints, reached with another method
                # (an MCP GET stream or DELETE): its body would be no call any policy judged.
                endpoint = next((f"{r.spec.method} {r.spec.path}" for r in self._routes[connector.name]
                                 if r.spec.jsonrpc is not None and r.match(segs) is not None), "")
                return Classification(
                    connector=connector.name,
                    action=spec.action,
                    resource_type=spec.resource.type,
                    resource_id=resource_id,
                    resource_attrs=attrs,
                    risk=route.risk,
                    route=f"{spec.method} {spec.path}",
                    params=params,
                    query_params=query_params,
                    body_specs=spec.body,
                    resource_attribute_names=tuple(spec.resource_attributes),
                    spec=spec,
                    approval_mode=route.approval,
                    opaque_body=spec.opaque_body,
                    jsonrpc_endpoint=endpoint,
                )
            return None
        if self.generic_default or any(host_matches(p, host, port) for p in self.unclassified_hosts):
            normalise_path(raw_path)
            return Classification(
                connector=GENERIC_CONNECTOR,
                action=GENERIC_ACTION,
                resource_type=GENERIC_RESOURCE_TYPE,
                resource_id=host,
                resource_attrs={},
                risk="medium",
                route="*",
                opaque_body=self.generic_opaque_bodies,
            )
        return None


def build_classifier(manifests: list[ConnectorManifest], egress: Any) -> Classifier:
    """The classifier for `manifests` and the config's `egress` section (one place for proxy and explain)."""
    return Classifier(
        manifests,
        unclassified_hosts=egress.unclassified_hosts,
        generic_default=egress.default == "generic",
        generic_opaque_bodies=egress.opaque_bodies,
    )


def attrs_for_record(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if isinstance(v, (str, int, bool))}
